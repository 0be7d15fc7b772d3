package quota

import (
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	natsgo "github.com/nats-io/nats.go"
)

// TestExact: members on one NATS share a hard limit exactly, whatever their number,
// and the bucket's grants add up to what was used.
func TestExact(t *testing.T) {
	for _, n := range []int{1, 3} {
		t.Run(map[int]string{1: "one member", 3: "three members"}[n], func(t *testing.T) {
			nats := testutil.StartNATS(t)
			var ms []*member
			var snaps []*limiter.Snapshot
			for range n {
				ms = append(ms, newMember(t, nats, nil))
				snaps = append(snaps, snap(t, "cust_x", 1000, 1))
			}
			got := hammer(t, ms, snaps, 16, 3000)
			if sum(got) != 1000 {
				t.Errorf("admitted %v = %d, want exactly 1000", got, sum(got))
			}
			v := ms[0].value(ms[0].counter(snaps[0]).Key)
			if v.Granted != 1000 || v.Limit != 1000 || v.LimitRevision != 1 {
				t.Errorf("value %+v", v)
			}
			for i, mb := range ms {
				if g := v.Sidecars[mb.m.SidecarID()]; g != got[i] {
					t.Errorf("member %d used %d and holds a grant of %d", i, got[i], g)
				}
			}
		})
	}
}

// TestRestart: a member that crashes holding a lease and restarts with the same data
// directory spends what it held and no more, whether NATS is there at restart or not,
// and whether its saved lease survived or only the bucket remembers it.
func TestRestart(t *testing.T) {
	for _, tc := range []struct {
		name        string
		natsDown    bool // NATS is away when the member restarts
		forgetSaved bool // the q/ entries are lost: the bucket's entry is the only record
	}{
		{"nats up", false, false},
		{"nats down", true, false},
		{"saved lease lost", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nats := testutil.StartNATS(t)
			a := newMember(t, nats, func(o *Options) { o.MinLease = 100 })
			b := newMember(t, nats, func(o *Options) { o.MinLease = 100 })
			sa, sb := snap(t, "cust_r", 1000, 1), snap(t, "cust_r", 1000, 1)
			for range 30 {
				if d := a.do(sa, 1, false); d.Reason != limiter.OK {
					t.Fatal(d)
				}
			}
			c := a.counter(sa)
			k, end := c.Key, c.End
			eventually(t, "a's refills to settle", func() bool {
				g, _ := a.m.Grant(k)
				return a.value(k).Sidecars[a.m.SidecarID()] == g && c.Lease() == g-30
			})
			grant, _ := a.m.Grant(k)
			id := a.m.SidecarID()
			a.crash()
			if tc.forgetSaved {
				st, err := store.Open(store.Options{Dir: a.dir, GCInterval: -1})
				if err != nil {
					t.Fatal(err)
				}
				if err := st.DB().DropPrefix([]byte(store.PrefixQuota)); err != nil {
					t.Fatal(err)
				}
				st.Close()
			}
			if tc.natsDown {
				nats.Shutdown()
			}
			// The usage recorder restores the 30 committed units before the leases load.
			a.start(func(o *Options) { o.MinLease = 100; o.Wait = 200 * time.Millisecond },
				map[limiter.CounterKey][2]int64{k: {end, 30}})
			if a.m.SidecarID() != id {
				t.Fatalf("the sidecar id changed")
			}
			c = a.counter(sa)
			want := grant - 30
			if tc.forgetSaved {
				want = 0 // known again at the first refill
			}
			if c.Lease() != want {
				t.Errorf("restored lease %d, want %d (grant %d less 30 used)", c.Lease(), want, grant)
			}
			if tc.natsDown {
				admitted := 0
				for range grant {
					if a.do(sa, 1, false).Reason == limiter.OK {
						admitted++
					}
				}
				if admitted != int(grant-30) {
					t.Errorf("without NATS the restarted member admitted %d, want its lease of %d", admitted, grant-30)
				}
				if d := a.do(sa, 1, false); d.Reason != limiter.QuotaUnavailable {
					t.Errorf("lease spent, NATS away: %+v", d)
				}
				nats.Restart()
				used := int64(30 + admitted)
				for i, mb := range []*member{a, b} {
					eventually(t, "the quota to be reachable again", func() bool {
						d := mb.do([]*limiter.Snapshot{sa, sb}[i], 1, false)
						if d.Reason == limiter.OK {
							used++
						}
						return d.Reason != limiter.QuotaUnavailable
					})
				}
				got := hammer(t, []*member{a, b}, []*limiter.Snapshot{sa, sb}, 8, 3000)
				if total := used + sum(got); total != 1000 {
					t.Errorf("admitted %d before, %v after: %d in all, want 1000", used, got, total)
				}
				return
			}
			got := hammer(t, []*member{a, b}, []*limiter.Snapshot{sa, sb}, 8, 3000)
			if total := 30 + sum(got); total != 1000 {
				t.Errorf("admitted 30 before the crash and %v after: %d in all, want 1000", got, total)
			}
		})
	}
}

// TestLowered: a limit lowered below what the fleet already used stops every
// admission, and the members give back what they held.
func TestLowered(t *testing.T) {
	nats := testutil.StartNATS(t)
	// Leases larger than the 400 used, so that the members surely hold more than they
	// used when the limit drops.
	a := newMember(t, nats, func(o *Options) { o.MinLease = 1000 })
	b := newMember(t, nats, func(o *Options) { o.MinLease = 1000 })
	sa, sb := snap(t, "cust_l", 10000, 1), snap(t, "cust_l", 10000, 1)
	got := hammer(t, []*member{a, b}, []*limiter.Snapshot{sa, sb}, 8, 400)
	if sum(got) != 400 {
		t.Fatalf("admitted %v before lowering", got)
	}
	k := a.counter(sa).Key
	before := a.value(k)
	if before.Granted <= 400 {
		t.Fatalf("the members hold no more than they used (%d): nothing to lower below", before.Granted)
	}
	na, nb := snap(t, "cust_l", 300, 2), snap(t, "cust_l", 300, 2)
	a.m.OnChange(sa, na)
	b.m.OnChange(sb, nb)
	eventually(t, "leases to be returned", func() bool {
		v := a.value(k)
		return v.Granted == 400 && v.Limit == 300 && v.LimitRevision == 2
	})
	got = hammer(t, []*member{a, b}, []*limiter.Snapshot{na, nb}, 8, 400)
	if sum(got) != 0 {
		t.Errorf("admitted %v under a limit lowered below the usage", got)
	}
	// Raised again: the members take the difference, and exactly that.
	ra, rb := snap(t, "cust_l", 500, 3), snap(t, "cust_l", 500, 3)
	a.m.OnChange(na, ra)
	b.m.OnChange(nb, rb)
	got = hammer(t, []*member{a, b}, []*limiter.Snapshot{ra, rb}, 8, 400)
	if sum(got) != 100 {
		t.Errorf("admitted %v after raising to 500, want 100", got)
	}
}

// TestStaleLimit: a member that has not seen the lowered limit yet still cannot take
// quota beyond it, because the bucket's value carries the newer revision's limit.
func TestStaleLimit(t *testing.T) {
	nats := testutil.StartNATS(t)
	a := newMember(t, nats, func(o *Options) { o.MinLease = 1; o.MaxLease = 1 })
	b := newMember(t, nats, func(o *Options) { o.MinLease = 1; o.MaxLease = 1 })
	sa, sb := snap(t, "cust_s", 1000, 1), snap(t, "cust_s", 1000, 1)
	hammer(t, []*member{a, b}, []*limiter.Snapshot{sa, sb}, 2, 20)
	na := snap(t, "cust_s", 25, 2)
	a.m.OnChange(sa, na)
	a.do(na, 1, false) // writes the new limit with its refill
	k := a.counter(sa).Key
	eventually(t, "the new limit in the bucket", func() bool { return a.value(k).Limit == 25 })
	admitted := 0
	for range 50 {
		if b.do(sb, 1, false).Reason == limiter.OK { // b still has revision 1: 1000
			admitted++
		}
	}
	if v := a.value(k); v.Granted > 25 || admitted > 5 {
		t.Errorf("stale member admitted %d; bucket %+v", admitted, v)
	}
}

// leasedThenCutOff starts a member whose leases are all of size lease, has it take a
// lease of customer id's "calls" (limit limit) with one request, then stops NATS and
// waits for the member to notice.
func leasedThenCutOff(t *testing.T, id string, limit, lease int64) (*testutil.NATS, *member, *limiter.Snapshot, *limiter.Counter) {
	t.Helper()
	nats := testutil.StartNATS(t)
	a := newMember(t, nats, func(o *Options) { o.MinLease, o.MaxLease = lease, lease; o.Wait = 300 * time.Millisecond })
	s := snap(t, id, limit, 1)
	a.do(s, 1, false)
	c := a.counter(s)
	eventually(t, "the lease to settle", func() bool { g, _ := a.m.Grant(c.Key); return g > 0 && c.Lease() == g-1 })
	nats.Shutdown()
	eventually(t, "the client to notice", func() bool { return !a.m.connected() })
	return nats, a, s, c
}

// TestUnreachable: with NATS away, a member spends the lease in hand, then refuses
// (QuotaUnavailable) or, failing open, admits and counts.
func TestUnreachable(t *testing.T) {
	_, a, s, c := leasedThenCutOff(t, "cust_u", 1000, 50)
	held := c.Lease()
	for range held {
		if d := a.do(s, 1, false); d.Reason != limiter.OK {
			t.Fatalf("lease in hand refused: %+v", d)
		}
	}
	if d := a.do(s, 1, false); d.Reason != limiter.QuotaUnavailable || d.Limit != 1000 {
		t.Errorf("lease spent, NATS away: %+v, want quota_unavailable", d)
	}
	if d := a.do(s, 3, true); d.Reason != limiter.OK {
		t.Errorf("fail open: %+v", d)
	}
	if c.Committed() != 1+held+3 {
		t.Errorf("committed %d, want %d", c.Committed(), 1+held+3)
	}
	if a.m.Stats().RefillErrors == 0 && a.m.Stats().Refills == 0 {
		t.Errorf("stats %+v", a.m.Stats())
	}
}

// TestReturns: unused quota goes back on Close and after sitting idle.
func TestReturns(t *testing.T) {
	nats := testutil.StartNATS(t)
	t.Run("close", func(t *testing.T) {
		a := newMember(t, nats, func(o *Options) { o.MinLease = 100 })
		s := snap(t, "cust_c", 1000, 1)
		for range 7 {
			a.do(s, 1, false)
		}
		k := a.counter(s).Key
		a.stop()
		b := newMember(t, nats, nil)
		if v := b.value(k); v.Granted != 7 {
			t.Errorf("after close the bucket holds %+v, want a grant of the 7 used", v)
		}
	})
	t.Run("idle", func(t *testing.T) {
		a := newMember(t, nats, func(o *Options) { o.MinLease = 100; o.IdleReturn = 200 * time.Millisecond })
		s := snap(t, "cust_i", 1000, 1)
		for range 7 {
			a.do(s, 1, false)
		}
		k := a.counter(s).Key
		eventually(t, "the idle lease to go back", func() bool { return a.value(k).Granted == 7 && a.m.Stats().Returns > 0 })
		if held, ok := a.m.Held(k); !ok || held != 0 || a.m.Stats().Returned != 93 {
			t.Errorf("held %d %v, stats %+v", held, ok, a.m.Stats())
		}
		if d := a.do(s, 1, false); d.Reason != limiter.OK {
			t.Errorf("after an idle return: %+v", d)
		}
	})
}

// TestWindowEnd: at the end of its window a lease goes back, and Retention later the
// key leaves the bucket (by its TTL) and the saved lease leaves Badger.
func TestWindowEnd(t *testing.T) {
	nats := testutil.StartNATS(t)
	a := newMember(t, nats, func(o *Options) { o.MinLease = 100; o.Retention = time.Second })
	s := snap(t, "cust_w", 1000, 1)
	end := time.Now().Add(1500 * time.Millisecond)
	k := limiter.CounterKey{Customer: "cust_w", Feature: "calls", WindowStart: time.Now().Add(-time.Hour).UnixNano()}
	c := a.lim.Counter(k, end.UnixNano())
	if r := a.m.Acquire(s, s.Feature("calls"), c, 1, time.Now()); r != limiter.QuotaGranted {
		t.Fatalf("acquire: %v", r)
	}
	c.TakeLease(5) // 5 units used
	eventually(t, "the lease to go back at the window's end", func() bool {
		v := a.value(k)
		return v != nil && v.Granted == 5 && time.Now().After(end)
	})
	eventually(t, "the key to expire", func() bool { return a.value(k) == nil })
	eventually(t, "the lease to be forgotten", func() bool { _, ok := a.m.Held(k); return !ok })
	a.stop()
	st, err := store.Open(store.Options{Dir: a.dir, GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var saved int
	st.DB().View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(store.PrefixQuota)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			saved++
		}
		return nil
	})
	if saved != 0 {
		t.Errorf("%d saved leases left", saved)
	}
}

// TestShadow: a shadow-mode sidecar, which never waits for quota, still takes leases
// ahead of need, so that what it would have refused is known fleet-wide.
func TestShadow(t *testing.T) {
	nats := testutil.StartNATS(t)
	a := newMember(t, nats, nil)
	s := snap(t, "cust_sh", 1000, 1)
	var r limiter.Reservation
	if d := a.lim.Reserve(s, []limiter.Use{{Feature: "calls", Cost: 1}}, time.Now(), true, &r); d.Reason != limiter.OK {
		t.Fatalf("shadow: %+v", d)
	}
	a.lim.Commit(&r, nil)
	k := a.counter(s).Key
	eventually(t, "a lease taken ahead of need", func() bool { g, ok := a.m.Grant(k); return ok && g > 0 })
	r.Reset()
	a.lim.Reserve(s, []limiter.Use{{Feature: "calls", Cost: 1}}, time.Now(), true, &r)
	a.lim.Commit(&r, nil)
	if c := a.counter(s); c.Committed() != 2 || c.Lease() <= 0 {
		t.Errorf("committed %d, lease %d", c.Committed(), c.Lease())
	}
}

// TestAskAgain: an ask for a refill ahead of need that the refill loop turns down (here
// because NATS is away) must not stop the counter from asking again: once NATS is back,
// the next request below the low water refills the lease ahead of need, before it runs
// dry.
func TestAskAgain(t *testing.T) {
	nats, a, s, c := leasedThenCutOff(t, "cust_a", 100_000, 40)
	// Below the low water: the request path asks, and the refill loop turns it down.
	for c.Lease() >= c.LeaseLow() {
		if d := a.do(s, 1, false); d.Reason != limiter.OK {
			t.Fatalf("lease in hand refused: %+v", d)
		}
	}
	left := c.Lease()
	if left < 2 {
		t.Fatalf("lease %d: the test needs two requests left in it", left)
	}
	refills := a.m.Stats().Refills
	nats.Restart()
	eventually(t, "the client to reconnect", func() bool { return a.m.connected() })
	time.Sleep(3 * a.m.tick) // past any backoff and a maintenance tick
	if d := a.do(s, 1, false); d.Reason != limiter.OK {
		t.Fatalf("after NATS returned: %+v", d)
	}
	eventually(t, "a refill ahead of need", func() bool { return c.Lease() > left-1 })
	if got := a.m.Stats().Refills; got <= refills {
		t.Errorf("refills %d, want more than the %d before NATS returned", got, refills)
	}
}

// TestAskAgainAfterDrop: an ask that found the refill queue full is lost; the next
// maintenance tick lets every counter ask again, so the lease is still refilled ahead
// of need.
func TestAskAgainAfterDrop(t *testing.T) {
	nats := testutil.StartNATS(t)
	a := newMember(t, nats, func(o *Options) { o.MinLease, o.MaxLease = 40, 40 })
	s, other := snap(t, "cust_d", 100_000, 1), snap(t, "cust_o", 100_000, 1)
	a.do(s, 1, false)
	a.do(other, 1, false)
	c, oc := a.counter(s), a.counter(other)
	eventually(t, "the first leases", func() bool {
		g, _ := a.m.Grant(c.Key)
		og, _ := a.m.Grant(oc.Key)
		return g > 0 && c.Lease() == g-1 && og > 0 && oc.Lease() == og-1
	})
	// With the manager's lock held the refill loop cannot take asks: fill its queue
	// with another customer's, then take s below its low water, whose ask is dropped.
	a.m.mu.Lock()
	f := other.Feature("calls")
	for range cap(a.m.refills) + 1 {
		a.m.Refill(other, f, oc)
	}
	for c.Lease() >= c.LeaseLow() {
		if d := a.do(s, 1, false); d.Reason != limiter.OK {
			a.m.mu.Unlock()
			t.Fatalf("lease in hand refused: %+v", d)
		}
	}
	dropped := a.m.dropped.Load()
	a.m.mu.Unlock()
	if !dropped {
		t.Fatal("no ask was dropped: the test did not test")
	}
	left := c.Lease()
	time.Sleep(3 * a.m.tick) // the queue drains; a tick clears every counter's ask
	if d := a.do(s, 1, false); d.Reason != limiter.OK {
		t.Fatalf("after the queue drained: %+v", d)
	}
	eventually(t, "a refill ahead of need", func() bool { return c.Lease() > left-1 })
}

// TestPendingReturn: units taken back for a return that cannot reach the bucket are
// neither held nor usable, and Pending says where they are until the retry lands.
func TestPendingReturn(t *testing.T) {
	nats := testutil.StartNATS(t)
	a := newMember(t, nats, func(o *Options) {
		o.MinLease, o.MaxLease, o.IdleReturn = 100, 100, 200*time.Millisecond
	})
	s := snap(t, "cust_p", 1000, 1)
	for range 7 {
		a.do(s, 1, false)
	}
	k := a.counter(s).Key
	if p, ok := a.m.Pending(k); !ok || p != 0 {
		t.Fatalf("pending %d %v before any return, want 0 true", p, ok)
	}
	nats.Shutdown()
	eventually(t, "the client to notice", func() bool { return !a.m.connected() })
	eventually(t, "the idle lease to be taken back, its return failing", func() bool {
		p, _ := a.m.Pending(k)
		return p == 93
	})
	if held, _ := a.m.Held(k); held != 0 {
		t.Errorf("held %d while its return is pending, want 0", held)
	}
	nats.Restart()
	eventually(t, "the retried return to land", func() bool {
		p, _ := a.m.Pending(k)
		v := a.value(k)
		return p == 0 && v != nil && v.Granted == 7
	})
	if _, ok := a.m.Pending(limiter.CounterKey{Customer: "nobody", Feature: "calls"}); ok {
		t.Error("Pending of a counter without a lease: ok true")
	}
}

// TestFreedDuringRefill: a refill that ends exhausted marks the key so (requests are
// refused without reading the bucket for a recheck period), unless another sidecar
// announced units of the key freed while it ran: its last read may predate the
// return, and the units would sit free in the bucket while requests are refused.
func TestFreedDuringRefill(t *testing.T) {
	nats := testutil.StartNATS(t)
	a := newMember(t, nats, nil)
	s := snap(t, "cust_f", 100, 1)
	a.do(s, 1, false)
	k := a.counter(s).Key
	a.m.mu.Lock()
	l := a.m.leases[k]
	a.m.mu.Unlock()
	if l == nil {
		t.Fatal("no lease after a request")
	}
	exhausted := func(freedMeanwhile bool) bool {
		a.m.mu.Lock()
		l.exhaustedUntil = 0
		j := &job{done: make(chan struct{}), freed: l.freed}
		j.need.Store(1) // a request waits
		a.m.mu.Unlock()
		if freedMeanwhile {
			msg, err := json.Marshal(freedMsg{Key: Key(k), Sidecar: "sc-other000", Returned: 3})
			if err != nil {
				t.Fatal(err)
			}
			a.m.onFreed(&natsgo.Msg{Data: msg})
		}
		a.m.mu.Lock()
		defer a.m.mu.Unlock()
		a.m.finishLocked(l, j, limiter.QuotaExhausted, 100)
		return a.m.now().UnixNano() < l.exhaustedUntil
	}
	if !exhausted(false) {
		t.Error("a refill that found the fleet exhausted did not mark the key")
	}
	if exhausted(true) {
		t.Error("a refill that ended exhausted marked the key although units were freed while it ran")
	}
}

// TestRereadWhenFreedDuringRefill: another sidecar returns units, and announces it,
// after a refill read the bucket and found nothing left, while requests wait for that
// refill. The requests must get the units (the refill reads again), not be refused
// while they sit in the bucket. The other sidecar is played by the test: it holds the
// whole limit in the bucket and answers no ask. Control: with nothing freed, the
// request is refused.
func TestRereadWhenFreedDuringRefill(t *testing.T) {
	const limit, other = 10, "sc-other000"
	nats := testutil.StartNATS(t)
	for _, freed := range []bool{false, true} {
		t.Run(map[bool]string{false: "nothing freed", true: "freed while the refill ran"}[freed], func(t *testing.T) {
			a := newMember(t, nats, nil)
			s := snap(t, fmt.Sprintf("cust_r_%v", freed), limit, 1)
			k := a.playGrants(s, map[string]int64{other: limit})
			var hooked atomic.Bool
			a.m.afterTake = func(l *lease, n int64) {
				if !freed || n != 0 || hooked.Swap(true) {
					return
				}
				// The other sidecar returns its grant and tells the fleet, after this
				// refill read the value.
				a.setPlayed(s, map[string]int64{other: 0})
				msg, _ := json.Marshal(freedMsg{Key: Key(k), Sidecar: other, Returned: limit})
				if err := a.m.nc.Publish(a.m.freedSubject(), msg); err != nil {
					t.Error(err)
					return
				}
				// The hook runs in the refill's goroutine, where t.Fatal must not be
				// called: wait with Error.
				heard := func() bool {
					a.m.mu.Lock()
					defer a.m.mu.Unlock()
					return l.freed > 0
				}
				for deadline := time.Now().Add(10 * time.Second); !heard(); time.Sleep(time.Millisecond) {
					if time.Now().After(deadline) {
						t.Error("the freed message was never heard")
						return
					}
				}
			}
			d := a.do(s, 1, false)
			if freed && !hooked.Load() {
				t.Fatal("the refill never found the bucket exhausted")
			}
			switch {
			case freed && d.Reason != limiter.OK:
				t.Errorf("refused (%s) while the units freed during its refill sat in the bucket: %+v", d.Reason, a.value(k))
			case !freed && d.Reason == limiter.OK:
				t.Errorf("admitted with the whole limit granted to another sidecar: %+v", a.value(k))
			}
			if got := a.value(k); got.Granted > limit {
				t.Errorf("bucket over the limit: %+v", got)
			}
		})
	}
}

// TestAskAgainWhenHoldersWereSilent: a refill finds the bucket fully granted and asks
// the holders. One gives back a unit at once, which another sidecar takes before the
// asker's refill; the other holder gives back its units a little later (a real one
// waits for its lease to go unused first). The asker must ask again and get them, not
// refuse its request while they sit in the bucket. The holders and the other sidecar
// are played by the test, which announces no return on the freed subject, so that
// only a second ask can find the units.
func TestAskAgainWhenHoldersWereSilent(t *testing.T) {
	const limit = 3
	const h1, h2, taker = "sc-holder01", "sc-holder02", "sc-taker001"
	nats := testutil.StartNATS(t)
	a := newMember(t, nats, nil)
	s := snap(t, "cust_silent", limit, 1)
	k := a.playGrants(s, map[string]int64{h1: 1, h2: 2})
	set := func(grants map[string]int64) { a.setPlayed(s, grants) }
	answer := func(reply, id string, returned int64) {
		msg, _ := json.Marshal(answerMsg{Sidecar: id, Returned: returned})
		if err := a.m.nc.Publish(reply, msg); err != nil {
			t.Error(err)
		}
	}
	var (
		mu       sync.Mutex
		asks     int
		h2Gave   bool
		h2Askers []string
	)
	sub, err := a.m.nc.Subscribe(a.m.wantSubject(), func(msg *natsgo.Msg) {
		mu.Lock()
		defer mu.Unlock()
		asks++
		answer(msg.Reply, taker, 0) // it spends what it takes
		if asks == 1 {
			// h1 gives its unit back, and the taker takes it before the asker can.
			set(map[string]int64{h1: 0})
			set(map[string]int64{taker: 1})
			answer(msg.Reply, h1, 1)
			// h2 gives back 40 ms later, answering every ask made meanwhile.
			time.AfterFunc(40*time.Millisecond, func() {
				mu.Lock()
				defer mu.Unlock()
				set(map[string]int64{h2: 0})
				for _, r := range append(h2Askers, msg.Reply) {
					answer(r, h2, 2)
				}
				h2Gave = true
			})
			return
		}
		answer(msg.Reply, h1, 0)
		if h2Gave {
			answer(msg.Reply, h2, 0)
		} else {
			h2Askers = append(h2Askers, msg.Reply)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()

	if d := a.do(s, 1, false); d.Reason != limiter.OK {
		t.Errorf("refused (%s) while a holder gave back 2 units during the ask: %+v", d.Reason, a.value(k))
	}
	eventually(t, "the second holder to give back", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return h2Gave
	})
	mu.Lock()
	if asks < 2 {
		t.Errorf("asked %d times, want a second ask after the units given first were taken", asks)
	}
	mu.Unlock()
	if got := a.value(k); got.Granted > limit {
		t.Errorf("bucket over the limit: %+v", got)
	}
}

// TestAskedTakesOnlyWhatWaits: a sidecar that another sidecar asked for a key's unused
// units refills that key with only what its waiting request needs, not a lease sized by
// its rate or by what is left, so that it does not sit on units the asker's requests
// wait for. Control: before the ask, a refill takes more than one unit.
func TestAskedTakesOnlyWhatWaits(t *testing.T) {
	nats := testutil.StartNATS(t)
	a := newMember(t, nats, nil)
	s := snap(t, "cust_asked", 1000, 1)
	k := a.counter(s).Key
	if d := a.do(s, 1, false); d.Reason != limiter.OK {
		t.Fatalf("first request: %+v", d)
	}
	settle(t, []*member{a})
	if g, _ := a.m.Grant(k); g <= 1 {
		t.Fatalf("before any ask the first lease is %d units, want more than the request's one", g)
	}
	// Another sidecar asks; a's lease is unused, so a gives it back (yield).
	inbox := a.m.nc.NewInbox()
	answers, err := a.m.nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := json.Marshal(wantMsg{Key: Key(k), Sidecar: "sc-asker001"})
	if err := a.m.nc.PublishMsg(&natsgo.Msg{Subject: a.m.wantSubject(), Reply: inbox, Data: msg}); err != nil {
		t.Fatal(err)
	}
	if _, err := answers.NextMsg(5 * time.Second); err != nil {
		t.Fatalf("no answer to the ask: %v", err)
	}
	if held, _ := a.m.Held(k); held != 0 {
		t.Fatalf("after the ask a holds %d unused, want 0 (given back)", held)
	}
	for i := range 3 {
		if d := a.do(s, 1, false); d.Reason != limiter.OK {
			t.Fatalf("request %d after the ask: %+v", i, d)
		}
		settle(t, []*member{a})
		if held, _ := a.m.Held(k); held != 0 {
			t.Errorf("request %d after the ask: a holds %d unused units, want only what its request needed", i, held)
		}
	}
	if g, _ := a.m.Grant(k); g != 4 {
		t.Errorf("a's grant %d, want the 4 units it used", g)
	}
}
