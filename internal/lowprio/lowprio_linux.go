package lowprio

import (
	"fmt"
	"runtime"
	"syscall"
)

func lower(nice int) error {
	runtime.LockOSThread()
	tid := syscall.Gettid()
	if tid == syscall.Getpid() {
		runtime.UnlockOSThread()
		return ErrMainThread
	}
	// getpriority(2) returns 20 - nice on Linux, to keep the value positive.
	raw, err := syscall.Getpriority(syscall.PRIO_PROCESS, tid)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("lowprio: getpriority of thread %d: %w", tid, err)
	}
	// On Linux, PRIO_PROCESS with a thread id sets that thread alone.
	if err := syscall.Setpriority(syscall.PRIO_PROCESS, tid, min(20-raw+nice, MaxNice)); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("lowprio: setpriority of thread %d: %w", tid, err)
	}
	return nil
}
