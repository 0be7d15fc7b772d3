package quota

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// member is one sidecar's share of the fleet, without HTTP: its data directory, store,
// limiter, NATS connection and quota manager.
type member struct {
	t   testing.TB
	dir string
	url string
	st  *store.Store
	lim *limiter.Limiter
	nc  *nats.Conn
	m   *Manager
}

// newMember starts a member on a new data directory.
func newMember(t testing.TB, n *testutil.NATS, opt func(*Options)) *member {
	mb := &member{t: t, dir: t.TempDir(), url: n.URL()}
	mb.start(opt, nil)
	return mb
}

// start opens the store, restores committed usage (restore, by counter) and the saved
// leases, and starts the manager, as a sidecar does.
func (mb *member) start(opt func(*Options), restore map[limiter.CounterKey][2]int64) {
	t := mb.t
	t.Helper()
	st, err := store.Open(store.Options{Dir: mb.dir, Log: testutil.Logger(t), GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(mb.url, nats.MaxReconnects(-1), nats.ReconnectWait(20*time.Millisecond), nats.RetryOnFailedConnect(true))
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	o := Options{JS: js, Store: st, Log: testutil.Logger(t), MinLease: 10, Wait: 2 * time.Second}
	if opt != nil {
		opt(&o)
	}
	m, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	m.tick = 20 * time.Millisecond
	lim := limiter.New()
	for k, v := range restore {
		lim.Restore(k, v[0], v[1])
	}
	if err := m.Load(lim, true); err != nil {
		t.Fatal(err)
	}
	lim.SetQuota(m)
	m.Start(context.Background())
	mb.st, mb.nc, mb.m, mb.lim = st, nc, m, lim
	t.Cleanup(mb.stop)
}

// stop closes the member as a sidecar shuts down: leases go back.
func (mb *member) stop() {
	if mb.m == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	mb.m.Close(ctx)
	mb.nc.Close()
	mb.st.Close()
	mb.m = nil
}

// crash stops the member as SIGKILL would: nothing is returned, what Badger holds stays.
func (mb *member) crash() {
	m := mb.m
	m.once.Do(func() {
		m.mu.Lock()
		m.closed.Store(true)
		m.mu.Unlock()
		close(m.stop)
		mb.nc.Close() // no further word reaches the bucket
		m.loops.Wait()
		m.jobs.Wait()
		m.cancel()
	})
	mb.st.Close()
	mb.m = nil
}

// snap returns a snapshot of customer id with a monthly hard limit on "calls" (and a
// soft "extra"), billed from yesterday, at KV revision rev.
func snap(t testing.TB, id string, limit int64, rev uint64) *limiter.Snapshot {
	t.Helper()
	start := time.Now().UTC().Add(-24 * time.Hour).Truncate(time.Hour).Format(time.RFC3339)
	s, err := limiter.ParseSnapshot(fmt.Appendf(nil, `{"customer_id":%q,
		"billing":{"period_start":%q,"interval":"MONTHLY","timezone":"UTC"},
		"features":{"calls":{"type":"metered","usage_limit":%d},
			"extra":{"type":"metered","usage_limit":1,"is_soft_limit":true}}}`, id, start, limit))
	if err != nil {
		t.Fatal(err)
	}
	s.Revision = rev
	return s
}

// do makes one request of cost units on "calls" and commits it when admitted.
func (mb *member) do(s *limiter.Snapshot, cost int64, failOpen bool) limiter.Decision {
	var r limiter.Reservation
	d := mb.lim.Reserve(s, []limiter.Use{{Feature: "calls", Cost: cost, FailOpen: failOpen}}, time.Now(), false, &r)
	if d.Reason == limiter.OK {
		mb.lim.Commit(&r, nil)
	}
	return d
}

// counter is the member's counter of "calls" in s's current window.
func (mb *member) counter(s *limiter.Snapshot) *limiter.Counter {
	f := s.Feature("calls")
	start, end := limiter.WindowAt(&s.Billing, f.Reset, time.Now())
	return mb.lim.Counter(limiter.CounterKey{Customer: s.CustomerID, Feature: "calls", WindowStart: start.UnixNano()}, end.UnixNano())
}

// hammer has workers goroutines make attempts requests of cost 1 against the members in
// turn (each member gets its own snapshot from snaps), and returns how many each admitted.
func hammer(t testing.TB, members []*member, snaps []*limiter.Snapshot, workers, attempts int) []int64 {
	admitted := make([]atomic.Int64, len(members))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := next.Add(1); n <= int64(attempts); n = next.Add(1) {
				i := int(n) % len(members)
				switch d := members[i].do(snaps[i], 1, false); d.Reason {
				case limiter.OK:
					admitted[i].Add(1)
				case limiter.UsageLimitExceeded:
				default:
					t.Errorf("member %d: %+v", i, d)
				}
			}
		}()
	}
	wg.Wait()
	out := make([]int64, len(members))
	for i := range admitted {
		out[i] = admitted[i].Load()
	}
	return out
}

func sum(xs []int64) int64 {
	var s int64
	for _, x := range xs {
		s += x
	}
	return s
}

// value reads the bucket's value of a counter.
func (mb *member) value(k limiter.CounterKey) *Value {
	mb.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := mb.m.openBucket(ctx)
	if err != nil {
		mb.t.Fatal(err)
	}
	v, _, err := mb.m.read(ctx, b, Key(k))
	if err != nil {
		mb.t.Fatal(err)
	}
	return v
}

// playGrants writes the bucket's value of s's "calls" counter with s's limit and the
// grants of sidecars that the test plays, and returns the counter's key.
func (mb *member) playGrants(s *limiter.Snapshot, grants map[string]int64) limiter.CounterKey {
	mb.t.Helper()
	c := mb.counter(s)
	v := newValue(c.Key, c.End)
	v.Limit, v.LimitRevision = s.Feature("calls").Limit, s.Revision
	for id, g := range grants {
		v.setGrant(id, g)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := mb.m.openBucket(ctx)
	if err != nil {
		mb.t.Fatal(err)
	}
	if _, err := mb.m.write(ctx, b, Key(c.Key), v, 0, c.End); err != nil {
		mb.t.Fatal(err)
	}
	return c.Key
}

// setPlayed changes grants of sidecars that the test plays in the bucket's value of s's
// "calls" counter, by compare-and-set as a sidecar would. It may run off the test's
// goroutine: it reports failures with Error.
func (mb *member) setPlayed(s *limiter.Snapshot, grants map[string]int64) {
	c := mb.counter(s)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	b, err := mb.m.openBucket(ctx)
	if err != nil {
		mb.t.Error(err)
		return
	}
	for {
		v, rev, err := mb.m.read(ctx, b, Key(c.Key))
		if err != nil {
			mb.t.Error(err)
			return
		}
		for id, g := range grants {
			v.setGrant(id, g)
		}
		if _, err = mb.m.write(ctx, b, Key(c.Key), v, rev, c.End); !errors.Is(err, errConflict) {
			if err != nil {
				mb.t.Error(err)
			}
			return
		}
	}
}

// eventually polls cond until it holds or 10s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
