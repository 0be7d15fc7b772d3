package lowprio

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The test binary's main goroutine keeps the main thread, as cmd/gatehouse's does.
func init() { runtime.LockOSThread() }

// threadNice reads a thread's nice value from /proc (field 19 of its stat).
func threadNice(t *testing.T, tid int) (int, bool) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH) { // the thread is gone
		return 0, false
	}
	if err != nil {
		t.Fatal(err)
	}
	// The command name, in parentheses, may hold spaces: count fields after it.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	n, err := strconv.Atoi(f[16]) // field 19 of the whole line
	if err != nil {
		t.Fatal(err)
	}
	return n, true
}

func TestLower(t *testing.T) {
	mainNice, _ := threadNice(t, syscall.Getpid())
	tids := make(chan int)
	errs := make(chan error, 1)
	release := make(chan struct{})
	go func() {
		if err := Lower(5); err != nil {
			errs <- err
			close(tids)
			return
		}
		tids <- syscall.Gettid()
		<-release
		tids <- syscall.Gettid() // still the same thread: the goroutine stays locked
	}()
	tid, ok := <-tids
	if !ok {
		t.Fatal(<-errs)
	}
	if tid == syscall.Getpid() {
		t.Fatal("lowered the main thread")
	}
	if n, _ := threadNice(t, tid); n != min(mainNice+5, MaxNice) {
		t.Fatalf("thread %d: nice %d, want %d", tid, n, min(mainNice+5, MaxNice))
	}
	if n, _ := threadNice(t, syscall.Getpid()); n != mainNice {
		t.Fatalf("main thread: nice %d, want it left at %d", n, mainNice)
	}
	// Other goroutines keep running at the process's priority, whatever thread they
	// land on.
	for range 50 {
		done := make(chan int)
		go func() { done <- syscall.Gettid() }()
		if other := <-done; other == tid {
			t.Fatalf("another goroutine ran on the lowered thread %d", tid)
		}
	}
	close(release)
	if again := <-tids; again != tid {
		t.Fatalf("the goroutine moved from thread %d to %d", tid, again)
	}
	// It returned locked: the runtime ends its thread rather than reuse it.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, alive := threadNice(t, tid); !alive {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("thread %d still exists after its goroutine returned", tid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLowerNothing(t *testing.T) {
	done := make(chan int)
	go func() {
		if err := Lower(0); err != nil {
			t.Error(err)
		}
		n, _ := threadNice(t, syscall.Gettid())
		done <- n
	}()
	mainNice, _ := threadNice(t, syscall.Getpid())
	if n := <-done; n != mainNice {
		t.Fatalf("Lower(0) changed the nice value to %d (process %d)", n, mainNice)
	}
}
