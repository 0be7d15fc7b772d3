package proxy

import (
	"syscall"
	"time"
)

// chkThreadCPU is the CPU time the calling OS thread has used (lock the goroutine to
// its thread around a measurement). Benchmarks report it next to wall time, which on a
// shared machine counts the time spent waiting for a CPU.
func chkThreadCPU() (time.Duration, bool) {
	const rusageThread = 1 // RUSAGE_THREAD
	var ru syscall.Rusage
	if err := syscall.Getrusage(rusageThread, &ru); err != nil {
		return 0, false
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), true
}
