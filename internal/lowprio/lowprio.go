// Package lowprio runs background work at a lower CPU priority than the request path.
//
// A sidecar shares its machine with the API it guards, and its own request path is
// what a client waits for. Its background work (publishing usage) comes in bursts of
// milliseconds that, at equal priority, take a core from the requests queued behind
// them, which is what a latency tail reads. Lower gives the
// calling goroutine an OS thread of its own at a higher nice value, so that when the
// cores are busy the kernel runs the request path first, as RocksDB lowers the
// priority of its compaction threads.
//
// It must not lower a goroutine that holds, for long, a lock the request path takes:
// a low-priority thread preempted inside it would make the request path wait on the
// kernel's view of fairness (priority inversion).
package lowprio

import (
	"errors"

	"go.uber.org/zap"
)

// MaxNice is the highest nice value; Lower never goes past it.
const MaxNice = 19

// ErrMainThread is returned when the goroutine runs on the process's main thread,
// whose priority Lower leaves alone: ps and top show it as the process's, and the
// runtime never ends that thread. A program keeps other goroutines off the main thread
// by locking its main goroutine to it in an init function (cmd/gatehouse does).
var ErrMainThread = errors.New("lowprio: the goroutine runs on the main thread")

// Lower locks the calling goroutine to its OS thread and raises that thread's nice
// value by nice (capped at MaxNice). On systems other than Linux, and for nice <= 0, it
// does nothing.
//
// The goroutine must stay locked until it returns, then the runtime ends the thread:
// no other goroutine ever runs at the lowered priority. A goroutine that calls Lower
// must therefore never call runtime.UnlockOSThread. On an error the goroutine is left
// unlocked, at the priority it had.
func Lower(nice int) error {
	if nice <= 0 {
		return nil
	}
	return lower(nice)
}

// Background is Lower for a goroutine's background loop: a failure is logged (it only
// leaves the work at the process's priority) rather than returned.
func Background(log *zap.Logger, nice int) {
	err := Lower(nice)
	switch {
	case err == nil:
	case errors.Is(err, ErrMainThread):
		log.Debug("background work stays at the process's priority", zap.Error(err))
	default:
		log.Warn("background work stays at the process's priority", zap.Error(err))
	}
}
