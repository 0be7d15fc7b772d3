package store

import (
	"bufio"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"go.uber.org/zap"
)

func open(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := Open(Options{Dir: dir, Log: testutil.Logger(t), GCInterval: -1})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	return s
}

func TestIdentityStableAcrossRestarts(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := open(t, dir)
	id, epoch := s.SidecarID(), s.Epoch()
	if !regexp.MustCompile(`^sc-[0-9a-f]{8}$`).MatchString(id) {
		t.Errorf("sidecar id %q: want sc- and 8 hex digits", id)
	}
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(epoch) {
		t.Errorf("epoch %q: want 32 hex digits", epoch)
	}
	if err := s.DB().Update(func(txn *badger.Txn) error { return txn.Set([]byte("e/x"), []byte("v")) }); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "sidecar-id"))
	if strings.TrimSpace(string(b)) != id {
		t.Errorf("sidecar-id file holds %q, want %q", b, id)
	}

	s = open(t, dir)
	if s.SidecarID() != id || s.Epoch() != epoch || s.Rebuilt() {
		t.Errorf("reopen: id %q epoch %q rebuilt %v; want %q %q false", s.SidecarID(), s.Epoch(), s.Rebuilt(), id, epoch)
	}
	s.Close()

	// A wiped database keeps the sidecar id and starts a fresh epoch.
	if err := os.RemoveAll(filepath.Join(dir, badgerDir)); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir)
	defer s.Close()
	if s.SidecarID() != id {
		t.Errorf("sidecar id changed after wipe: %q, want %q", s.SidecarID(), id)
	}
	if s.Epoch() == epoch {
		t.Errorf("epoch unchanged after wipe: %q", epoch)
	}
}

func TestCorruptDirectoryMovedAside(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		match func(file string) bool
	}{
		{"every file", func(string) bool { return true }},
		// Badger panics in its own goroutine on these unless Open checks them first.
		{"table files", func(f string) bool { return strings.HasSuffix(f, ".sst") }},
		{"manifest", func(f string) bool { return f == "MANIFEST" }},
		{"value log", func(f string) bool { return strings.HasSuffix(f, ".vlog") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			s := open(t, dir)
			epoch := s.Epoch()
			// Close flushes the memtable to a table file; the large value goes to the
			// value log.
			wb := s.DB().NewWriteBatch()
			for j := 0; j < 2000; j++ {
				if err := wb.Set(fmt.Appendf(nil, "k/%d", j), make([]byte, 100)); err != nil {
					t.Fatal(err)
				}
			}
			if err := wb.Set([]byte("k/big"), make([]byte, 100<<10)); err != nil {
				t.Fatal(err)
			}
			if err := wb.Flush(); err != nil {
				t.Fatal(err)
			}
			s.Close()

			bdir := filepath.Join(dir, badgerDir)
			files, _ := os.ReadDir(bdir)
			n := 0
			for _, f := range files {
				if f.Name() == "LOCK" || !tc.match(f.Name()) {
					continue
				}
				fi, _ := f.Info()
				garbage := []byte(strings.Repeat("not badger\x00\xff", int(fi.Size()/12)+1))
				if err := os.WriteFile(filepath.Join(bdir, f.Name()), garbage, 0o644); err != nil {
					t.Fatal(err)
				}
				n++
			}
			if n == 0 {
				t.Fatal("no file to damage")
			}

			s = open(t, dir)
			defer s.Close()
			if !s.Rebuilt() {
				t.Fatal("Rebuilt() = false after garbage in the files")
			}
			if s.Epoch() == epoch {
				t.Error("a rebuilt database kept the old epoch")
			}
			aside, _ := filepath.Glob(bdir + ".corrupt-*")
			if len(aside) != 1 {
				t.Fatalf("moved-aside directories: %v, want one", aside)
			}
			if err := s.DB().View(func(txn *badger.Txn) error {
				_, err := txn.Get([]byte(KeyEpoch))
				return err
			}); err != nil {
				t.Errorf("fresh database unusable: %v", err)
			}
		})
	}
}

func TestLockedDirectoryIsNotMoved(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := open(t, dir)
	defer s.Close()
	_, err := Open(Options{Dir: dir, Log: testutil.Logger(t), GCInterval: -1})
	if err == nil {
		t.Fatal("second Open on a locked directory succeeded")
	}
	if aside, _ := filepath.Glob(filepath.Join(dir, badgerDir) + ".corrupt-*"); len(aside) != 0 {
		t.Fatalf("a locked database was moved aside: %v", aside)
	}
}

func TestBadSidecarIDFileReplaced(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "sidecar-id"), []byte("not a valid id!\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s := open(t, dir)
	defer s.Close()
	if !strings.HasPrefix(s.SidecarID(), "sc-") {
		t.Errorf("sidecar id %q", s.SidecarID())
	}
}

func TestGCLoopStops(t *testing.T) {
	t.Parallel()
	s, err := Open(Options{Dir: t.TempDir(), Log: testutil.Logger(t), GCInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestUnlistedTableSkipped opens a database beside a table file that the MANIFEST does
// not list and that is not a table: what a kill during a memtable flush or a compaction
// leaves. The database opens as it was; Badger deletes the file.
func TestUnlistedTableSkipped(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := open(t, dir)
	epoch := s.Epoch()
	if err := s.DB().Update(func(txn *badger.Txn) error { return txn.Set([]byte("e/x"), []byte("v")) }); err != nil {
		t.Fatal(err)
	}
	s.Close() // flushes the memtable to a listed table
	bdir := filepath.Join(dir, badgerDir)
	listed, _ := filepath.Glob(filepath.Join(bdir, "*.sst"))
	if len(listed) == 0 {
		t.Fatal("no table file after close")
	}
	stray := filepath.Join(bdir, "999999.sst")
	if err := os.WriteFile(stray, make([]byte, 64<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := checkTable(stray); err == nil {
		t.Fatal("checkTable passed a zero-filled table")
	}

	s = open(t, dir)
	defer s.Close()
	if s.Rebuilt() || s.Epoch() != epoch {
		t.Fatalf("rebuilt %v, epoch %q (was %q): the stray table was taken for damage", s.Rebuilt(), s.Epoch(), epoch)
	}
	if err := s.DB().View(func(txn *badger.Txn) error {
		_, err := txn.Get([]byte("e/x"))
		return err
	}); err != nil {
		t.Errorf("key written before the stray table: %v", err)
	}
	if exists(stray) {
		t.Error("Badger left the unlisted table in place")
	}
}

// killChildEnv makes the test binary, run again by TestKilledAtRandomReopens, open the
// store in the directory it names and write until it is killed.
const killChildEnv = "GATEHOUSE_STORE_KILL_CHILD"

// TestKilledAtRandomReopens kills a process that opens the store and writes to it,
// again and again at random moments (in Badger's open, in memtable flushes and
// compactions, in writes), and checks that each run opens the same database: never moved
// aside, the epoch unchanged, and every batch acknowledged before a kill still there.
func TestKilledAtRandomReopens(t *testing.T) {
	if dir := os.Getenv(killChildEnv); dir != "" {
		killChild(dir)
		return
	}
	t.Parallel()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var epoch string
	acked := -1
	run := func(i int) {
		cmd := exec.Command(exe, "-test.run=^TestKilledAtRandomReopens$")
		cmd.Env = append(os.Environ(), killChildEnv+"="+dir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			cmd.Process.Kill() // an error only says it has exited already
			cmd.Wait()
		}()
		lines := bufio.NewScanner(out)
		if !lines.Scan() {
			cmd.Wait()
			t.Fatalf("run %d printed nothing:\n%s", i, stderr.String())
		}
		first := strings.Fields(lines.Text()) // "open <epoch> <rebuilt> <last batch>"
		if len(first) != 4 || first[0] != "open" {
			t.Fatalf("run %d: %q\n%s", i, lines.Text(), stderr.String())
		}
		if first[2] != "false" {
			t.Fatalf("run %d: the database was moved aside and rebuilt:\n%s", i, stderr.String())
		}
		if epoch == "" {
			epoch = first[1]
		} else if first[1] != epoch {
			t.Fatalf("run %d: epoch %s, was %s", i, first[1], epoch)
		}
		if found, _ := strconv.Atoi(first[3]); found < acked {
			t.Fatalf("run %d: batch %d acknowledged before the last kill is missing (last found %d)", i, acked, found)
		}
		// Kill at a random moment: the writer reports each acknowledged batch.
		deadline := time.Now().Add(time.Duration(rand.Int64N(int64(150 * time.Millisecond))))
		for time.Now().Before(deadline) && lines.Scan() {
			n, _ := strconv.Atoi(lines.Text())
			acked = max(acked, n)
		}
		cmd.Process.Kill()
		for lines.Scan() { // acknowledged after the deadline, before the kill landed
			n, _ := strconv.Atoi(lines.Text())
			acked = max(acked, n)
		}
	}
	for i := range 40 {
		run(i)
	}
	if acked < 0 {
		t.Fatal("no run acknowledged a write")
	}
}

// killChild is the killed process: it opens the store, prints its epoch, whether it was
// rebuilt and the last batch number it holds, then writes batches in order until it is
// killed, printing each batch's number once Badger acknowledged it. A batch overwrites
// 100 of 10,000 keys (one value big enough for the value log, the rest filling
// memtables, so that tables are flushed and compacted) and records its number.
func killChild(dir string) {
	log, err := zap.NewProduction() // to stderr, which the test prints when it fails
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	s, err := Open(Options{Dir: dir, Log: log, MemoryBudget: 16 << 20, GCInterval: 50 * time.Millisecond})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	last := -1
	err = s.DB().View(func(txn *badger.Txn) error {
		item, err := txn.Get([]byte("batch"))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return item.Value(func(v []byte) error {
			last, err = strconv.Atoi(string(v))
			return err
		})
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Printf("open %s %v %d\n", s.Epoch(), s.Rebuilt(), last)
	small, big := make([]byte, 2<<10), make([]byte, valueThreshold+1)
	for b := last + 1; ; b++ {
		wb := s.DB().NewWriteBatch()
		for i := range 100 {
			value := small
			if i == 0 {
				value = big
			}
			if err := wb.Set(fmt.Appendf(nil, "k/%d", (b*100+i)%10_000), value); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
		}
		if err := wb.Set([]byte("batch"), strconv.AppendInt(nil, int64(b), 10)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		if err := wb.Flush(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		fmt.Println(b)
	}
}
