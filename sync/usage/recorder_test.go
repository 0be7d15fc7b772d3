package usage

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/nats-io/nats.go/jetstream"
)

func TestRecordFlushPublishesExactDeltas(t *testing.T) {
	e := newEnv(t)
	r := e.recorder(func(o *Options) { o.FlushInterval = time.Hour }) // only Flush publishes
	want := newLedger()
	requests := [][]limiter.Usage{
		{use("cust_acme", "api_calls", -1, 1, 0), use("cust_acme", "tokens", 0, 120, 0)},
		{use("cust_acme", "api_calls", -1, 1, 0)},
		{use("cust_acme", "exports", 0, 3, 2)},    // soft limit: 2 of 3 over
		{use("cust_acme", "tokens", 1, 7, 0)},     // next day's window
		{use("cust_beta", "api_calls", -1, 5, 5)}, // all over
		{use("cust_beta", "api_calls", -1, 0, 0)}, // a zero record is harmless
		{use("cust_acme", "tokens", 0, 30, 0)},
	}
	for _, req := range requests {
		if err := r.Record(req); err != nil {
			t.Fatal(err)
		}
		want.add(req...)
	}
	flush(t, r)

	msgs := checkOnce(t, e.js)
	if len(msgs) != 1 {
		t.Fatalf("%d messages, want 1 (one per flush)", len(msgs))
	}
	m := msgs[0].m
	if m.SidecarID != e.st.SidecarID() || m.Epoch != e.st.Epoch() || m.Seq != 1 {
		t.Fatalf("message header %s/%s/%d, want %s/%s/1", m.SidecarID, m.Epoch, m.Seq, e.st.SidecarID(), e.st.Epoch())
	}
	if msgs[0].id != MsgID(e.st.SidecarID(), e.st.Epoch(), 1) {
		t.Fatalf("Nats-Msg-Id %q", msgs[0].id)
	}
	exp := want.totals()
	if len(m.Deltas) != len(exp) {
		t.Fatalf("deltas %+v, want %+v", m.Deltas, exp)
	}
	for i, d := range m.Deltas {
		w := exp[i]
		if d.CustomerID != w.CustomerID || d.Feature != w.Feature || !d.WindowStart.Equal(w.WindowStart) ||
			d.Quantity != w.Quantity || d.Overage != w.Overage {
			t.Fatalf("delta %d = %+v, want %+v", i, d, w)
		}
	}
	if m.From.IsZero() || m.To.Before(m.From) {
		t.Fatalf("from %v to %v", m.From, m.To)
	}
	checkTotals(t, e.js, want)

	s := r.Stats()
	if s.Records != 8 || s.Published != 1 || s.PublishedRecords != 8 || s.PublishedDeltas != uint64(len(exp)) ||
		s.OutboxBytes != 0 || s.OutboxRecords != 0 || s.PendingSeq != 0 || s.AckedSeq != 1 || s.LastPublish.IsZero() || !s.StreamReady {
		t.Fatalf("stats %+v", s)
	}

	// The stream was created as documented.
	st, err := e.js.Stream(context.Background(), Stream)
	if err != nil {
		t.Fatal(err)
	}
	cfg := st.CachedInfo().Config
	if len(cfg.Subjects) != 1 || cfg.Subjects[0] != "gatehouse.usage.>" || cfg.Replicas != 1 || cfg.Retention != jetstream.LimitsPolicy {
		t.Fatalf("stream config %+v", cfg)
	}

	// A second flush with nothing new publishes nothing.
	flush(t, r)
	if n := len(readStream(t, e.js)); n != 1 {
		t.Fatalf("%d messages after an empty flush", n)
	}
}

// 64 concurrent callers: every unit is published once, and the recorder writes to Badger
// far less often than once per record (only the publisher writes).
func TestConcurrentRecords(t *testing.T) {
	e := newEnv(t)
	r := e.recorder(func(o *Options) { o.FlushInterval = 50 * time.Millisecond })
	const goroutines, each = 64, 1000
	want := newLedger()
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			u := make([]limiter.Usage, 1)
			for i := range each {
				u[0] = use([]string{"cust_a", "cust_b", "cust_c"}[(g+i)%3], "api_calls", i%3-1, int64(i%5+1), int64(i%2))
				if err := r.Record(u); err != nil {
					t.Error(err)
					return
				}
				want.add(u[0])
			}
		}()
	}
	wg.Wait()
	flush(t, r)
	s := r.Stats()
	t.Logf("records %d, appends %d, Badger writes %d (%.1f records per write), messages %d",
		s.Records, s.Appends, s.BadgerWrites, float64(s.Records)/float64(s.BadgerWrites), s.Published)
	if s.Records != goroutines*each {
		t.Fatalf("records %d", s.Records)
	}
	if s.BadgerWrites*10 >= s.Records {
		t.Fatalf("Badger writes %d for %d records: usage is not written in batches", s.BadgerWrites, s.Records)
	}
	checkTotals(t, e.js, want)
	checkOnce(t, e.js)
}

func TestCountersSurviveRestart(t *testing.T) {
	e := newEnv(t)
	now := window0.Add(time.Hour)
	clock := func() time.Time { return now }
	snap, err := limiter.ParseSnapshot([]byte(`{"customer_id": "cust_acme",
		"billing": {"period_start": "2026-11-05T00:00:00Z", "period_end": "2026-12-05T00:00:00Z", "interval": "MONTHLY"},
		"features": {"api_calls": {"type": "metered", "usage_limit": 5, "usage_reset_period": "DAILY"},
		             "exports": {"type": "metered", "usage_limit": 2, "is_soft_limit": true, "usage_reset_period": "DAILY"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	serve := func(l *limiter.Limiter, r *Recorder, feature string) limiter.Reason {
		var res limiter.Reservation
		d := l.Reserve(snap, []limiter.Use{{Feature: feature, Cost: 1}}, clock(), false, &res)
		if d.Reason != limiter.OK {
			return d.Reason
		}
		if err := r.Record(l.Commit(&res, nil)); err != nil {
			t.Fatal(err)
		}
		return limiter.OK
	}

	l := limiter.New()
	r := e.recorder(func(o *Options) { o.Now = clock })
	if err := r.Restore(l); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		if got := serve(l, r, "api_calls"); got != limiter.OK {
			t.Fatalf("request %d refused: %v", i, got)
		}
		if i == 2 {
			flush(t, r) // part of the usage published (cut into counters), part in the outbox
		}
	}
	for range 3 {
		serve(l, r, "exports")
	}
	if got := serve(l, r, "api_calls"); got != limiter.UsageLimitExceeded {
		t.Fatalf("6th request: %v", got)
	}
	// A stale counter of a window that ended days ago, to be deleted by Restore.
	if err := r.Record([]limiter.Usage{use("cust_old", "api_calls", -1, 1, 0)}); err != nil {
		t.Fatal(err)
	}
	old := use("cust_old", "api_calls", 0, 1, 0)
	old.Key.WindowStart, old.End = window0.AddDate(0, 0, -10).UnixNano(), window0.AddDate(0, 0, -9).UnixNano()
	if err := r.Record([]limiter.Usage{old}); err != nil {
		t.Fatal(err)
	}
	r.Close(expired()) // nothing published: the counters alone must hold
	e.reopen()

	l2 := limiter.New()
	r2 := e.recorder(func(o *Options) { o.Now = clock })
	if err := r2.Restore(l2); err != nil {
		t.Fatal(err)
	}
	if got := serve(l2, r2, "api_calls"); got != limiter.UsageLimitExceeded {
		t.Fatalf("after restart the hard limit was handed out again: %v", got)
	}
	got := map[string]int64{}
	l2.Counters("", func(c *limiter.Counter) { got[c.Key.Customer+"/"+c.Key.Feature] = c.Committed() })
	if got["cust_acme/api_calls"] != 5 || got["cust_acme/exports"] != 3 || got["cust_old/api_calls"] != 1 || len(got) != 3 {
		t.Fatalf("restored counters %v", got)
	}
	// The expired counter is gone from Badger: a third start restores the same three.
	r2.Close(expired())
	e.reopen()
	l3 := limiter.New()
	if err := e.build(func(o *Options) { o.Now = clock }).Restore(l3); err != nil {
		t.Fatal(err)
	}
	n := 0
	l3.Counters("", func(*limiter.Counter) { n++ })
	if n != 3 {
		t.Fatalf("%d counters after the expired one was deleted, want 3", n)
	}
	// In a later window the limit is available again.
	now = now.AddDate(0, 0, 1)
	r3 := e.recorder(func(o *Options) { o.Now = clock })
	if got := serve(l3, r3, "api_calls"); got != limiter.OK {
		t.Fatalf("next day: %v", got)
	}
}

func TestLifecycle(t *testing.T) {
	e := newEnv(t)
	r := e.build()
	u := []limiter.Usage{use("c", "f", -1, 1, 0)}
	if err := r.Record(u); !errors.Is(err, ErrNotStarted) {
		t.Fatalf("Record before Start: %v", err)
	}
	if err := r.Flush(context.Background()); !errors.Is(err, ErrNotStarted) {
		t.Fatalf("Flush before Start: %v", err)
	}
	e.start(r)
	if err := r.Start(context.Background()); err == nil {
		t.Fatal("second Start succeeded")
	}
	if err := r.Record(nil); err != nil {
		t.Fatal(err)
	}
	if err := r.Record(u); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(within(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(context.Background()); err != nil {
		t.Fatal("second Close:", err)
	}
	if err := r.Record(u); !errors.Is(err, ErrClosed) {
		t.Fatalf("Record after Close: %v", err)
	}
	if ok, detail := r.Readiness(); ok || !strings.Contains(detail, "not running") {
		t.Fatalf("readiness after close: %v %q", ok, detail)
	}
	// Close published what was committed.
	want := newLedger()
	want.add(u...)
	checkTotals(t, e.js, want)

	// A recorder never started closes at once.
	if err := e.build().Close(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestStartWithNATSDown(t *testing.T) {
	e := newEnv(t)
	e.nats.Shutdown()
	r := e.recorder()
	want := newLedger()
	for i := range 50 {
		u := []limiter.Usage{use("cust_a", "api_calls", -1, int64(i), 0)}
		if err := r.Record(u); err != nil { // durable without NATS
			t.Fatal(err)
		}
		want.add(u...)
	}
	if s := r.Stats(); s.StreamReady || s.Records != 50 {
		t.Fatalf("stats with NATS down: %+v", s)
	}
	if ok, _ := r.Readiness(); !ok {
		t.Fatal("not ready while NATS is down; usage is kept locally")
	}
	e.nats.Restart()
	flush(t, r)
	checkTotals(t, e.js, want)
	checkOnce(t, e.js)
}

func TestTotalsReadsTheStream(t *testing.T) {
	e := newEnv(t)
	ctx := within(t, 10*time.Second)
	if got, err := Totals(ctx, e.js); err != nil || len(got) != 0 {
		t.Fatalf("no stream: %v %v", got, err)
	}
	_, err := e.js.CreateStream(ctx, jetstream.StreamConfig{Name: Stream, Subjects: []string{SubjectPrefix + ">"}})
	if err != nil {
		t.Fatal(err)
	}
	w1, w2 := window0, window0.AddDate(0, 1, 0)
	msgs := []Message{
		{SidecarID: "sc-1", Epoch: "e1", Seq: 1, Deltas: []Delta{
			{CustomerID: "b", Feature: "api_calls", WindowStart: w1, Quantity: 10, Overage: 0},
			{CustomerID: "a", Feature: "tokens", WindowStart: w1, Quantity: 500, Overage: 20}}},
		{SidecarID: "sc-2", Epoch: "e9", Seq: 1, Deltas: []Delta{
			{CustomerID: "a", Feature: "tokens", WindowStart: w1.In(time.FixedZone("x", 3600)), Quantity: 5, Overage: 5}}},
		{SidecarID: "sc-1", Epoch: "e1", Seq: 2, Deltas: []Delta{
			{CustomerID: "a", Feature: "tokens", WindowStart: w2, Quantity: 1}}},
	}
	for i := range 600 { // more than one fetch
		msgs = append(msgs, Message{SidecarID: "sc-3", Epoch: "e", Seq: uint64(i + 1), Deltas: []Delta{
			{CustomerID: "c", Feature: "api_calls", WindowStart: w1, Quantity: 2, Overage: 1}}})
	}
	for _, m := range msgs {
		data, _ := json.Marshal(m)
		if _, err := e.js.Publish(ctx, Subject(m.SidecarID), data, jetstream.WithMsgID(m.ID())); err != nil {
			t.Fatal(err)
		}
	}
	got, err := Totals(ctx, e.js)
	if err != nil {
		t.Fatal(err)
	}
	want := []Total{
		{"a", "tokens", w1, 505, 25},
		{"a", "tokens", w2, 1, 0},
		{"b", "api_calls", w1, 10, 0},
		{"c", "api_calls", w1, 1200, 600},
	}
	if len(got) != len(want) {
		t.Fatalf("totals %+v", got)
	}
	for i := range want {
		if got[i].CustomerID != want[i].CustomerID || got[i].Feature != want[i].Feature || !got[i].WindowStart.Equal(want[i].WindowStart) ||
			got[i].Quantity != want[i].Quantity || got[i].Overage != want[i].Overage || got[i].WindowStart.Location() != time.UTC {
			t.Fatalf("totals[%d] = %+v, want %+v", i, got[i], want[i])
		}
	}

	var text, js bytes.Buffer
	if err := PrintTotals(&text, got, false); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(text.String()), "\n")
	if len(lines) != 5 || !strings.HasPrefix(lines[0], "CUSTOMER") ||
		strings.Join(strings.Fields(lines[1]), " ") != "a tokens 2026-11-05T00:00:00Z 505 25" {
		t.Fatalf("table:\n%s", text.String())
	}
	if err := PrintTotals(&js, got, true); err != nil {
		t.Fatal(err)
	}
	var back []Total
	if err := json.Unmarshal(js.Bytes(), &back); err != nil || len(back) != 4 || back[3].Quantity != 1200 ||
		!strings.Contains(js.String(), `"customer_id": "a"`) {
		t.Fatalf("json %v:\n%s", err, js.String())
	}
	js.Reset()
	PrintTotals(&js, nil, true)
	if strings.TrimSpace(js.String()) != "[]" {
		t.Fatalf("empty json: %q", js.String())
	}
}

// Record allocates nothing per call, from one caller or from many at once.
func TestRecordAllocatesNothing(t *testing.T) {
	e := newEnv(t)
	r := e.build(hourly)
	r.readAheadEvery = time.Hour // the publisher's reading allocates, and would count here
	e.start(r)
	u := []limiter.Usage{use("cust_a", "api_calls", -1, 1, 0), use("cust_a", "tokens", 0, 42, 0)}
	if n := testing.AllocsPerRun(1000, func() {
		if err := r.Record(u); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("%v allocations per Record", n)
	}
	// From many callers at once, counted over the whole process: the embedded NATS
	// server, Badger and the runtime allocate in the background too, so the phase is
	// long enough to amortise that, and the best of three attempts counts.
	const goroutines, each = 64, 2000
	best := math.Inf(1)
	for range 3 {
		start := make(chan struct{})
		var wg sync.WaitGroup
		for g := range goroutines {
			wg.Add(1)
			go func() {
				defer wg.Done()
				u := []limiter.Usage{use("cust_"+strconv.Itoa(g%8), "api_calls", -1, 1, 0)}
				<-start
				for range each {
					if err := r.Record(u); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		close(start)
		wg.Wait()
		runtime.ReadMemStats(&after)
		best = min(best, float64(after.Mallocs-before.Mallocs)/(goroutines*each))
	}
	// A per-record allocation would show as about one per record.
	if best > 0.05 {
		t.Fatalf("%.3f allocations per record from %d concurrent callers", best, goroutines)
	}
}
