package limiter

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// poolQuota is a Quota over one in-memory pool: the fleet's quota as one KV value would
// hold it. Acquire grants chunk units (at least need) while the pool lasts; result,
// when set, is returned instead.
type poolQuota struct {
	mu     sync.Mutex // protects pool
	pool   int64
	chunk  int64
	low    int64
	result atomic.Int32 // a QuotaResult other than QuotaGranted to force, plus 1; 0: grant

	acquires, refills atomic.Int64
}

func (q *poolQuota) Acquire(s *Snapshot, f *Feature, c *Counter, need int64, now time.Time) QuotaResult {
	q.acquires.Add(1)
	if r := q.result.Load(); r != 0 {
		return QuotaResult(r - 1)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	n := min(max(q.chunk, need), q.pool)
	if n < need {
		return QuotaExhausted
	}
	q.pool -= n
	c.GrantLease(n, q.low, f.Limit)
	return QuotaGranted
}

func (q *poolQuota) Refill(s *Snapshot, f *Feature, c *Counter) { q.refills.Add(1) }

func (q *poolQuota) force(r QuotaResult) { q.result.Store(int32(r) + 1) }

// TestLeaseConcurrent has 64 goroutines make 3,000 attempts against a hard limit of
// 1,000 whose fleet pool holds 700 (the rest is another sidecar's): exactly 700 are
// admitted, in leases of 7, and refunds go back to the lease for others to take.
func TestLeaseConcurrent(t *testing.T) {
	for _, refundEvery := range []int{0, 4} {
		t.Run(fmt.Sprintf("refund every %d", refundEvery), func(t *testing.T) {
			l := New()
			q := &poolQuota{pool: 700, chunk: 7, low: 2}
			l.SetQuota(q)
			s := testSnap(t, "cust_c", `"calls": {"type": "metered", "usage_limit": 1000}`)
			uses := []Use{{Feature: "calls", Cost: 1}}
			var committed, next atomic.Int64
			var wg sync.WaitGroup
			for range 64 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var r Reservation
					for n := next.Add(1); n <= 3000; n = next.Add(1) {
						r.Reset()
						d := l.Reserve(s, uses, testNow, false, &r)
						if d.Reason != OK {
							if d.Reason != UsageLimitExceeded {
								t.Errorf("refusal %+v", d)
							}
							continue
						}
						if refundEvery > 0 && n%int64(refundEvery) == 0 {
							l.Refund(&r)
							continue
						}
						l.Commit(&r, nil)
						committed.Add(1)
					}
				}()
			}
			wg.Wait()
			// A refund after the last attempt leaves its units in the lease: take them.
			for {
				var r Reservation
				if d := l.Reserve(s, uses, testNow, false, &r); d.Reason != OK {
					break
				}
				l.Commit(&r, nil)
				committed.Add(1)
			}
			c := countersOf(l, "cust_c", "calls")[0]
			if committed.Load() != 700 || c.Committed() != 700 || c.Held() != 700 || c.Lease() != 0 {
				t.Errorf("committed %d (counter %d, held %d, lease %d), want exactly the pool's 700",
					committed.Load(), c.Committed(), c.Held(), c.Lease())
			}
			if q.acquires.Load() < 100 {
				t.Errorf("%d acquires for 100 leases", q.acquires.Load())
			}
		})
	}
}

func TestLeaseOutcomes(t *testing.T) {
	// A snapshot caches its features' counters, so each case takes a fresh one.
	var s *Snapshot
	setup := func(pool int64) (*Limiter, *poolQuota) {
		s = testSnap(t, "cust_q", `"calls": {"type": "metered", "usage_limit": 100},
			"soft": {"type": "metered", "usage_limit": 1, "is_soft_limit": true},
			"free": {"type": "metered"}`)
		l := New()
		q := &poolQuota{pool: pool, chunk: 10, low: 3}
		l.SetQuota(q)
		return l, q
	}
	reserve := func(l *Limiter, u Use) (Decision, *Reservation) {
		var r Reservation
		return l.Reserve(s, []Use{u}, testNow, false, &r), &r
	}
	counter := func(l *Limiter) *Counter { return countersOf(l, "cust_q", "calls")[0] }

	t.Run("soft and unlimited take no lease", func(t *testing.T) {
		l, q := setup(0)
		for _, f := range []string{"soft", "free"} {
			if d, _ := reserve(l, Use{Feature: f, Cost: 5}); d.Reason != OK {
				t.Errorf("%s: %+v", f, d)
			}
		}
		if q.acquires.Load() != 0 {
			t.Errorf("%d acquires", q.acquires.Load())
		}
	})
	t.Run("refill asked once below low water", func(t *testing.T) {
		l, q := setup(100)
		for range 9 {
			if d, r := reserve(l, Use{Feature: "calls", Cost: 1}); d.Reason != OK {
				t.Fatal(d)
			} else {
				l.Commit(r, nil)
			}
		}
		// 10 granted, 9 taken: below the low water of 3 after the 8th, asked once.
		if q.acquires.Load() != 1 || q.refills.Load() != 1 || counter(l).Lease() != 1 {
			t.Errorf("acquires %d refills %d lease %d", q.acquires.Load(), q.refills.Load(), counter(l).Lease())
		}
		counter(l).RefillDone()
		reserve(l, Use{Feature: "calls", Cost: 1})
		if q.refills.Load() != 2 {
			t.Errorf("refills %d after RefillDone, want 2", q.refills.Load())
		}
	})
	t.Run("exhausted is over the limit", func(t *testing.T) {
		l, _ := setup(5)
		d, _ := reserve(l, Use{Feature: "calls", Cost: 6})
		if d.Reason != UsageLimitExceeded || d.Limit != 100 || d.Used != 100 {
			t.Errorf("%+v", d)
		}
		if c := counter(l); c.Held() != 0 || c.Lease() != 0 {
			t.Errorf("held %d lease %d after a refusal", c.Held(), c.Lease())
		}
	})
	t.Run("unreachable denies or fails open", func(t *testing.T) {
		l, q := setup(100)
		q.force(QuotaUnreachable)
		d, _ := reserve(l, Use{Feature: "calls", Cost: 2})
		if d.Reason != QuotaUnavailable || !d.Metered || d.Limit != 100 {
			t.Errorf("deny: %+v", d)
		}
		d, r := reserve(l, Use{Feature: "calls", Cost: 2, FailOpen: true})
		if d.Reason != OK {
			t.Fatalf("fail open: %+v", d)
		}
		if out := l.Commit(r, nil); len(out) != 1 || out[0].Quantity != 2 {
			t.Errorf("fail-open usage %+v", out)
		}
		if c := counter(l); c.Committed() != 2 || c.Lease() != 0 {
			t.Errorf("committed %d lease %d", c.Committed(), c.Lease())
		}
		// A refund of a fail-open reservation gives nothing to the lease.
		_, r = reserve(l, Use{Feature: "calls", Cost: 3, FailOpen: true})
		l.Refund(r)
		if c := counter(l); c.Held() != 2 || c.Lease() != 0 {
			t.Errorf("after refund: held %d lease %d", c.Held(), c.Lease())
		}
	})
	t.Run("refund and actual cost settle with the lease", func(t *testing.T) {
		l, _ := setup(100)
		_, r := reserve(l, Use{Feature: "calls", Cost: 4})
		l.Refund(r)
		if c := counter(l); c.Lease() != 10 || c.Held() != 0 {
			t.Errorf("refund: lease %d held %d", c.Lease(), c.Held())
		}
		_, r = reserve(l, Use{Feature: "calls", Deferred: true})
		r.SetActual(0, 13)
		l.Commit(r, nil)
		if c := counter(l); c.Lease() != -3 || c.Held() != 13 {
			t.Errorf("overrun: lease %d held %d, want -3 and 13", c.Lease(), c.Held())
		}
		// The debt is covered first: a chunk of 10 leaves 7.
		if d, _ := reserve(l, Use{Feature: "calls", Cost: 1}); d.Reason != OK || counter(l).Lease() != 6 {
			t.Errorf("after the debt: %+v, lease %d", d, counter(l).Lease())
		}
	})
	t.Run("a lowered limit stops using the lease", func(t *testing.T) {
		l, q := setup(100)
		reserve(l, Use{Feature: "calls", Cost: 1})
		lower := testSnap(t, "cust_q", `"calls": {"type": "metered", "usage_limit": 50}`)
		before := q.acquires.Load()
		var r Reservation
		if d := l.Reserve(lower, []Use{{Feature: "calls", Cost: 1}}, testNow, false, &r); d.Reason != OK {
			t.Fatal(d)
		}
		if q.acquires.Load() != before+1 {
			t.Errorf("the lease granted under 100 was used under 50 without asking")
		}
	})
	t.Run("shadow takes what it can", func(t *testing.T) {
		l, q := setup(100)
		var r Reservation
		d := l.Reserve(s, []Use{{Feature: "calls", Cost: 7}}, testNow, true, &r)
		if d.Reason != OK || q.acquires.Load() != 0 || q.refills.Load() != 1 || counter(l).Held() != 7 {
			t.Errorf("%+v acquires %d refills %d held %d", d, q.acquires.Load(), q.refills.Load(), counter(l).Held())
		}
		counter(l).GrantLease(10, 3, 100)
		r.Reset()
		l.Reserve(s, []Use{{Feature: "calls", Cost: 7}}, testNow, true, &r)
		l.Refund(&r)
		if c := counter(l); c.Lease() != 10 || c.Held() != 7 {
			t.Errorf("lease %d held %d", c.Lease(), c.Held())
		}
	})
	t.Run("take lease", func(t *testing.T) {
		c := &Counter{}
		c.GrantLease(10, 2, 100)
		if c.TakeLease(4) != 4 || c.TakeLease(-1) != 6 || c.TakeLease(-1) != 0 || c.Lease() != 0 {
			t.Errorf("take: lease %d", c.Lease())
		}
		c.GrantLease(-2, 2, 100)
		if c.TakeLease(-1) != 0 || c.Lease() != -2 {
			t.Errorf("a debt was taken: lease %d", c.Lease())
		}
	})
}

// TestLeaseAllocs: with a lease in hand, a decision allocates nothing.
func TestLeaseAllocs(t *testing.T) {
	l := New()
	l.SetQuota(&poolQuota{pool: 1 << 40, chunk: 1 << 30, low: 1})
	s := testSnap(t, "cust_a", `"calls": {"type": "metered", "usage_limit": 4611686018427387904}`)
	uses := []Use{{Feature: "calls", Cost: 1}}
	var r Reservation
	out := make([]Usage, 0, MaxRouteFeatures)
	l.Reserve(s, uses, testNow, false, &r)
	l.Commit(&r, out[:0])
	if n := testing.AllocsPerRun(1000, func() {
		r.Reset()
		if d := l.Reserve(s, uses, testNow, false, &r); d.Reason != OK {
			t.Fatal(d)
		}
		out = l.Commit(&r, out[:0])
	}); n != 0 {
		t.Errorf("%v allocations per decision with a lease in hand, want 0", n)
	}
}

// BenchmarkDecisionLeased is BenchmarkDecision with every counter's lease in hand.
func BenchmarkDecisionLeased(b *testing.B) {
	benchDecision(b, &poolQuota{pool: 1 << 60, chunk: 1 << 40, low: 1})
}
