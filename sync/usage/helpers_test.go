package usage

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// env is one sidecar's world: an embedded nats-server and a data directory.
type env struct {
	t    testing.TB
	nats *testutil.NATS
	js   jetstream.JetStream
	dir  string
	st   *store.Store
}

func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{t: t, nats: testutil.StartNATS(t), dir: t.TempDir()}
	e.js = connect(t, e.nats)
	e.open()
	return e
}

// connect returns a JetStream client that reconnects forever, as serve's is.
func connect(t testing.TB, n *testutil.NATS) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(n.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(20*time.Millisecond),
		nats.RetryOnFailedConnect(true))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// open opens the store of the data directory.
func (e *env) open() {
	e.t.Helper()
	st, err := store.Open(store.Options{Dir: e.dir, Log: testutil.Logger(e.t), GCInterval: -1})
	if err != nil {
		e.t.Fatal(err)
	}
	e.st = st
	e.t.Cleanup(func() { st.Close() })
}

// reopen closes the store and opens it again, as a restarted process does.
func (e *env) reopen() {
	e.t.Helper()
	if err := e.st.Close(); err != nil {
		e.t.Fatal(err)
	}
	e.open()
}

// recorder returns a started recorder with short intervals; it is closed at the end.
func (e *env) recorder(opt ...func(*Options)) *Recorder {
	e.t.Helper()
	r := e.build(opt...)
	e.start(r)
	return r
}

// build returns a recorder with short intervals and backoffs, not started yet.
func (e *env) build(opt ...func(*Options)) *Recorder {
	e.t.Helper()
	opts := Options{Store: e.st, JS: e.js, Log: testutil.Logger(e.t), FlushInterval: 20 * time.Millisecond}
	for _, f := range opt {
		f(&opts)
	}
	r, err := New(opts)
	if err != nil {
		e.t.Fatal(err)
	}
	r.minBackoff, r.maxBackoff, r.conflictBackoff = 10*time.Millisecond, 100*time.Millisecond, 200*time.Millisecond
	r.requestTimeout = time.Second
	r.settleAfter = 50 * time.Millisecond // several messages per settling pass, soon enough for eventually
	return r
}

func (e *env) start(r *Recorder) {
	e.t.Helper()
	if err := r.Start(context.Background()); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { r.Close(expired()) })
}

// expired is a context whose deadline has passed: Close publishes nothing more.
func expired() context.Context {
	ctx, cancel := context.WithDeadline(context.Background(), time.Unix(1, 0))
	cancel()
	return ctx
}

func within(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func flush(t testing.TB, r *Recorder) {
	t.Helper()
	if err := r.Flush(within(t, 20*time.Second)); err != nil {
		t.Fatalf("flush: %v (stats %+v)", err, r.Stats())
	}
}

// eventually polls cond until it holds or 10 s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

var window0 = time.Date(2026, 11, 5, 0, 0, 0, 0, time.UTC)

// use is one usage record of customer c, feature f, in the window starting day days
// after window0 and lasting a day (or until 2100 when days < 0).
func use(c, f string, days int, qty, over int64) limiter.Usage {
	start, end := window0, time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC)
	if days >= 0 {
		start = window0.AddDate(0, 0, days)
		end = start.AddDate(0, 0, 1)
	}
	return limiter.Usage{Key: limiter.CounterKey{Customer: c, Feature: f, WindowStart: start.UnixNano()},
		End: end.UnixNano(), Quantity: qty, Overage: over}
}

// ledger is what tests recorded, summed like Totals sums the stream.
type ledger struct {
	mu sync.Mutex
	m  map[string]Total
}

func newLedger() *ledger { return &ledger{m: make(map[string]Total)} }

func (l *ledger) add(us ...limiter.Usage) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, u := range us {
		k := u.Key.Customer + "|" + u.Key.Feature + "|" + strconv.FormatInt(u.Key.WindowStart, 10)
		t := l.m[k]
		t.CustomerID, t.Feature, t.WindowStart = u.Key.Customer, u.Key.Feature, time.Unix(0, u.Key.WindowStart).UTC()
		t.Quantity += u.Quantity
		t.Overage += u.Overage
		l.m[k] = t
	}
}

func (l *ledger) totals() []Total {
	l.mu.Lock()
	defer l.mu.Unlock()
	keys := slices.Sorted(maps.Keys(l.m))
	out := make([]Total, 0, len(keys))
	for _, k := range keys {
		out = append(out, l.m[k])
	}
	slices.SortFunc(out, func(a, b Total) int {
		if c := strings.Compare(a.CustomerID, b.CustomerID); c != 0 {
			return c
		}
		if c := strings.Compare(a.Feature, b.Feature); c != 0 {
			return c
		}
		return a.WindowStart.Compare(b.WindowStart)
	})
	return out
}

// checkTotals asserts that the stream's totals equal what was recorded.
func checkTotals(t testing.TB, js jetstream.JetStream, want *ledger) {
	t.Helper()
	got, err := Totals(within(t, 20*time.Second), js)
	if err != nil {
		t.Fatal(err)
	}
	exp := want.totals()
	if len(got) != len(exp) {
		t.Fatalf("totals: %d keys, want %d\n got %v\nwant %v", len(got), len(exp), got, exp)
	}
	for i := range exp {
		if !got[i].WindowStart.Equal(exp[i].WindowStart) || got[i].CustomerID != exp[i].CustomerID ||
			got[i].Feature != exp[i].Feature || got[i].Quantity != exp[i].Quantity || got[i].Overage != exp[i].Overage {
			t.Fatalf("totals[%d] = %+v, want %+v", i, got[i], exp[i])
		}
	}
}

// streamMsg is one message as stored.
type streamMsg struct {
	seq uint64
	id  string
	m   Message
}

func readStream(t testing.TB, js jetstream.JetStream) []streamMsg {
	t.Helper()
	var out []streamMsg
	err := eachMessage(within(t, 20*time.Second), js, func(seq uint64, id string, m *Message) error {
		out = append(out, streamMsg{seq, id, *m})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// checkOnce asserts that every message is stored once: ids are unique, match the body,
// and each (sidecar, epoch) numbers its messages 1, 2, 3... without gaps.
func checkOnce(t testing.TB, js jetstream.JetStream) []streamMsg {
	t.Helper()
	msgs := readStream(t, js)
	next := map[string]uint64{}
	for _, sm := range msgs {
		if sm.id != sm.m.ID() {
			t.Fatalf("stream seq %d: Nats-Msg-Id %q, body says %q", sm.seq, sm.id, sm.m.ID())
		}
		k := sm.m.SidecarID + ":" + sm.m.Epoch
		if next[k]++; sm.m.Seq != next[k] {
			t.Fatalf("stream seq %d: message %s, want seq %d of %s (a duplicate or a gap)", sm.seq, sm.id, next[k], k)
		}
		// One delta per key: settling adds a message's deltas to the counters in key order.
		keys := map[Delta]bool{}
		for _, d := range sm.m.Deltas {
			key := Delta{CustomerID: d.CustomerID, Feature: d.Feature, WindowStart: d.WindowStart}
			if keys[key] {
				t.Fatalf("message %s holds two deltas of %s %s %v", sm.id, d.CustomerID, d.Feature, d.WindowStart)
			}
			keys[key] = true
		}
	}
	return msgs
}

// hammer records from n goroutines until stop is closed, each Record a request with
// two features, and adds what was recorded to l. It returns when all have stopped.
func hammer(r *Recorder, l *ledger, n int, stop <-chan struct{}) (wait func() error) {
	return hammerAt(r, l, n, 0, stop)
}

// hammerAt is hammer at about perSecond Records a second in all (0: as fast as they go).
func hammerAt(r *Recorder, l *ledger, n, perSecond int, stop <-chan struct{}) (wait func() error) {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for g := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if perSecond > 0 && i%64 == 0 {
					time.Sleep(time.Until(start.Add(time.Duration(i) * time.Second * time.Duration(n) / time.Duration(perSecond))))
				}
				us := []limiter.Usage{
					use(fmt.Sprintf("cust_%d", (g+i)%7), "api_calls", -1, 1, int64(i%2)),
					use(fmt.Sprintf("cust_%d", g%7), "tokens", i%2, int64(i%50+1), 0),
				}
				if err := r.Record(us); err != nil {
					errs <- err
					return
				}
				l.add(us...)
			}
		}()
	}
	return func() error {
		wg.Wait()
		close(errs)
		return <-errs
	}
}
