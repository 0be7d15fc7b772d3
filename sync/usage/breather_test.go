package usage

import (
	"testing"
	"time"
)

func TestBreather(t *testing.T) {
	t.Run("pauses once a burst ran breathWork", func(t *testing.T) {
		var b breather
		b.since = time.Now().Add(-3 * breathWork / 2)
		start := time.Now()
		b.yield()
		// time.Sleep sleeps at least as long as asked: a lower bound, not a timing.
		if slept := time.Since(start); slept < 3*breathWork/2 {
			t.Fatalf("yield returned after %v, want a pause as long as the burst (%v)", slept, 3*breathWork/2)
		}
		if !b.since.After(start) {
			t.Fatalf("the next burst starts at %v, before the pause ended", b.since)
		}
	})
	t.Run("a short burst and a held one do not pause", func(t *testing.T) {
		b := breather{since: time.Now().Add(time.Hour)} // ran "negative" time: under breathWork
		since := b.since
		b.yield()
		if b.since != since {
			t.Fatal("a yield under breathWork restarted the burst")
		}
		b.hold()
		b.yield()
		if !b.since.IsZero() {
			t.Fatal("a held breather started pausing")
		}
		var nilB *breather
		nilB.yield() // only Gosched
	})
	t.Run("breathe holds while behind or flushing", func(t *testing.T) {
		r := &Recorder{}
		r.breathe()
		if r.p.br.since.IsZero() {
			t.Fatal("a publisher that keeps up is not paced")
		}
		r.p.backlog = true
		r.breathe()
		if !r.p.br.since.IsZero() {
			t.Fatal("a publisher with a backlog is paced")
		}
		r.p.backlog = false
		r.st.atBound.Store(true)
		r.breathe()
		if !r.p.br.since.IsZero() {
			t.Fatal("a publisher at the outbox bound is paced")
		}
		r.st.atBound.Store(false)
		r.p.waiters = append(r.p.waiters, &flushWaiter{})
		r.breathe()
		if !r.p.br.since.IsZero() {
			t.Fatal("a publisher with a Flush waiting is paced")
		}
	})
}
