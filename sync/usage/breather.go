package usage

import (
	"runtime"
	"time"
)

// breather spreads the publisher's bursts of work (a cut, the start of a settling
// pass: 10–30 ms at 5,000 requests a second over 10,000 customers) so that they do not
// hold a core that long while the requests need it.
//
// runtime.Gosched, all the publisher did before, lets run only the goroutines already
// queued on its P: it neither polls the network for requests that arrived meanwhile
// nor gives the core back to the kernel, so on a machine whose cores the requests,
// the upstream and the API keep busy, the requests the kernel queues behind a burst
// wait for all of it, which is what a latency tail reads. So once a burst has run
// breathWork, a yield also sleeps as long as it ran, at most breathMax: a cut takes two
// to three times as long, and nothing waits for it but the next message. Pausing stops
// while the publisher is behind or someone waits on it (Recorder.breathe). The zero
// breather, and a nil one, only yield.
type breather struct {
	since time.Time // when the work since the last pause began; zero: do not pause
}

const (
	breathWork = time.Millisecond
	breathMax  = 2 * time.Millisecond
)

// begin marks the start of a burst: the time before it was spent waiting, not working.
func (b *breather) begin() { b.since = time.Now() }

// hold makes yields not pause until the next begin.
func (b *breather) hold() { b.since = time.Time{} }

// breathe starts the publisher's next burst: paced while it keeps up, not while it is
// behind (a backlog after an outage, an outbox at its bound: pausing would slow the
// drain, or let the outbox grow past the bound) nor while a Flush waits (Close's
// among them, under the shutdown deadline).
func (r *Recorder) breathe() {
	if r.p.backlog || r.st.atBound.Load() || len(r.p.waiters) > 0 {
		r.p.br.hold()
		return
	}
	r.p.br.begin()
}

// yield lets other goroutines run, pausing when the burst has run long enough.
func (b *breather) yield() {
	if b == nil || b.since.IsZero() {
		runtime.Gosched()
		return
	}
	d := time.Since(b.since)
	if d < breathWork {
		runtime.Gosched()
		return
	}
	time.Sleep(min(d, breathMax))
	b.since = time.Now()
}
