package flexprice

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/flexpricetest"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// fakeClock is a Clock that moves only when told to.
type fakeClock struct {
	mu      sync.Mutex
	now     time.Time
	waiters []fakeWaiter
}

type fakeWaiter struct {
	at time.Time
	ch chan time.Time
}

func newFakeClock(t time.Time) *fakeClock { return &fakeClock{now: t} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Until(t time.Time) <-chan time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan time.Time, 1)
	if !t.After(c.now) {
		ch <- c.now
		return ch
	}
	c.waiters = append(c.waiters, fakeWaiter{t, ch})
	return ch
}

// Advance moves the clock and fires the waiters it passes.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.waiters[:0]
	for _, w := range c.waiters {
		if w.at.After(c.now) {
			kept = append(kept, w)
			continue
		}
		w.ch <- c.now
	}
	c.waiters = kept
}

// t0 is the tests' starting instant.
var t0 = time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)

// env is a Flexprice test server, an embedded nats-server and a bridge between them.
type env struct {
	t     *testing.T
	fp    *flexpricetest.Server
	nats  *testutil.NATS
	nc    *nats.Conn
	js    jetstream.JetStream
	store snapshotStore
	clock *fakeClock
	opts  Options
	b     *Bridge
	stop  func()
}

// newEnv builds the environment; the bridge is not started (see run).
func newEnv(t *testing.T, srv flexpricetest.Options) *env {
	t.Helper()
	e := &env{t: t, clock: newFakeClock(t0)}
	if srv.Now == nil {
		srv.Now = e.clock.Now
	}
	e.fp = flexpricetest.New(srv)
	if err := e.fp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.fp.Close)
	e.nats = testutil.StartNATS(t)
	nc, err := nats.Connect(e.nats.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	e.nc = nc
	if e.js, err = jetstream.New(nc); err != nil {
		t.Fatal(err)
	}
	e.opts = Options{
		APIURL: e.fp.URL(), APIKey: Secret(e.fp.APIKey()), JetStream: e.js,
		WebhookListen: "127.0.0.1:0", AdminListen: "127.0.0.1:0",
		Logger: testutil.Logger(t), Clock: e.clock, SyncInterval: time.Hour,
		RequestTimeout: 2 * time.Second, Backoff: 5 * time.Millisecond, MaxBackoff: 100 * time.Millisecond,
		FetchWait: 100 * time.Millisecond, AckWait: 3 * time.Second, BoundaryDelay: time.Second,
		Features: map[string]FeatureEvents{
			"api_calls": {EventName: "api_request", Mode: ModeCount},
			"tokens":    {EventName: "llm_usage", Mode: ModeSum, Property: "tokens"},
		},
	}
	return e
}

// run starts the bridge with e.opts, after edit, and waits until it is ready.
func (e *env) run(edit func(*Options)) *Bridge {
	e.t.Helper()
	o := e.opts
	if edit != nil {
		edit(&o)
	}
	b, err := New(o)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := b.Listen(); err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	var once sync.Once
	e.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				e.t.Errorf("Run: %v", err)
			}
		})
	}
	e.t.Cleanup(e.stop)
	e.b = b
	e.eventually(30*time.Second, "bridge ready", b.Ready)
	if e.store == nil {
		if e.store, err = openStore(ctx, e.js); err != nil {
			e.t.Fatal(err)
		}
	}
	return b
}

func (e *env) eventually(d time.Duration, what string, cond func() bool) {
	e.t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// snap reads a customer's snapshot from KV; nil when there is none.
func (e *env) snap(id string) *limiter.SnapshotDoc {
	e.t.Helper()
	d, err := e.store.get(context.Background(), id)
	if err != nil {
		e.t.Fatal(err)
	}
	return d
}

// limit returns a metered feature's limit in a snapshot: -1 unlimited, -2 absent.
func limit(d *limiter.SnapshotDoc, key string) int64 {
	if d == nil {
		return -2
	}
	f, ok := d.Features[key]
	switch {
	case !ok:
		return -2
	case f.UsageLimit == nil:
		return -1
	}
	return *f.UsageLimit
}

// fire sends a webhook to the bridge.
func (e *env) fire(eventType string, entity any) {
	e.t.Helper()
	if err := flexpricetest.Fire(context.Background(), e.b.WebhookURL(), eventType, entity); err != nil {
		e.t.Fatal(err)
	}
}

// metric returns the sum of a metric's samples on /metrics whose line holds every filter.
func (e *env) metric(name string, filters ...string) float64 {
	e.t.Helper()
	text := e.get("/metrics")
	var sum float64
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name) || (len(line) > len(name) && line[len(name)] != '{' && line[len(name)] != ' ') {
			continue
		}
		ok := true
		for _, f := range filters {
			ok = ok && strings.Contains(line, f)
		}
		if ok {
			var v float64
			fmt.Sscanf(line[strings.LastIndexByte(line, ' ')+1:], "%g", &v)
			sum += v
		}
	}
	return sum
}

func (e *env) get(path string) string {
	e.t.Helper()
	resp, err := http.Get("http://" + e.b.AdminAddr().String() + path)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	var sb strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return sb.String()
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}
