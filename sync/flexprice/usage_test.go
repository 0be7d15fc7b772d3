package flexprice

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	fpt "github.com/gatehouse-dev/gatehouse/internal/flexpricetest"
	"github.com/gatehouse-dev/gatehouse/sync/usage"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// publish puts a usage message on the stream as a sidecar does, and returns its id.
func (e *env) publish(m usage.Message) string {
	e.t.Helper()
	id := usage.MsgID(m.SidecarID, m.Epoch, m.Seq)
	msg := nats.NewMsg(usage.Subject(m.SidecarID))
	msg.Data = mustJSON(m)
	msg.Header.Set(jetstream.MsgIDHeader, id)
	if _, err := e.js.PublishMsg(context.Background(), msg); err != nil {
		e.t.Fatal(err)
	}
	return id
}

// drained waits until the bridge's consumer has acknowledged every message.
func (e *env) drained() {
	e.t.Helper()
	// NumPending alone is not enough: the server counts a new message towards a
	// consumer's pending asynchronously, so right after a publish it can read 0. The ack
	// floor reaching the stream's last sequence cannot be early.
	ctx := context.Background()
	e.eventually(15*time.Second, "every usage message acknowledged", func() bool {
		st, err := e.js.Stream(ctx, usage.Stream)
		if err != nil {
			return false
		}
		si, err := st.Info(ctx)
		if err != nil {
			return false
		}
		ci, err := e.js.Consumer(ctx, usage.Stream, ConsumerName)
		if err != nil {
			return false
		}
		info, err := ci.Info(ctx)
		return err == nil && info.NumPending == 0 && info.NumAckPending == 0 &&
			info.AckFloor.Stream >= si.State.LastSeq
	})
}

// dead returns the dead letters parked so far.
func (e *env) dead() []DeadLetter {
	e.t.Helper()
	ctx := context.Background()
	st, err := e.js.Stream(ctx, DeadStream)
	if err != nil {
		e.t.Fatal(err)
	}
	info, _ := st.Info(ctx)
	var out []DeadLetter
	for seq := info.State.FirstSeq; seq > 0 && seq <= info.State.LastSeq; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if err != nil {
			continue
		}
		var dl DeadLetter
		if err := json.Unmarshal(m.Data, &dl); err != nil {
			e.t.Fatal(err)
		}
		out = append(out, dl)
	}
	return out
}

// usageBatch publishes three messages: count and sum features, two customers. It
// returns the event ids the bridge must send.
func (e *env) usageBatch(seq0 uint64) []string {
	to := t0.Add(time.Second)
	var want []string
	for k := range 3 {
		m := usage.Message{SidecarID: "sc-7f3a", Epoch: "01JD", Seq: seq0 + uint64(k), From: t0, To: to.Add(time.Duration(k) * time.Second),
			Deltas: []usage.Delta{
				{CustomerID: "acme", Feature: "api_calls", WindowStart: t0, Quantity: 17},
				{CustomerID: "acme", Feature: "tokens", WindowStart: t0, Quantity: 1234},
				{CustomerID: "globex", Feature: "api_calls", WindowStart: t0, Quantity: 3},
				{CustomerID: "globex", Feature: "tokens", WindowStart: t0, Quantity: 0},
			}}
		id := e.publish(m)
		for u := range 17 {
			want = append(want, fmt.Sprintf("%s/0/%d", id, u))
		}
		want = append(want, id+"/1")
		for u := range 3 {
			want = append(want, fmt.Sprintf("%s/2/%d", id, u))
		}
	}
	return want
}

func TestUsageEventsBothModes(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.run(func(o *Options) { o.DisableSync = true })
	want := e.usageBatch(1)
	e.drained()
	evs := e.fp.Events()
	var got []string
	for _, ev := range evs {
		got = append(got, ev.EventID)
		switch {
		case strings.Count(ev.EventID, "/") == 1: // acme's tokens: one sum event, "<msg>/1"
			if ev.EventName != "llm_usage" || ev.Properties["tokens"] != float64(1234) || ev.ExternalCustomerID != "acme" {
				t.Fatalf("sum event %+v", ev)
			}
		default:
			if ev.EventName != "api_request" || len(ev.Properties) != 0 {
				t.Fatalf("count event %+v", ev)
			}
		}
		if ev.Source != EventSource || !strings.HasPrefix(ev.EventID, "sc-7f3a:01JD:") {
			t.Fatalf("event %+v", ev)
		}
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("events:\n got %v\nwant %v", got, want)
	}
	// Timestamps are the message's `to`, so every delivery repeats them.
	for _, ev := range evs {
		if strings.HasPrefix(ev.EventID, "sc-7f3a:01JD:2/") && ev.Timestamp != "2026-11-22T10:00:02Z" {
			t.Fatalf("timestamp %q of %s", ev.Timestamp, ev.EventID)
		}
	}
	if e.fp.Received() != len(want) || len(e.fp.Conflicts()) != 0 {
		t.Fatalf("received %d for %d events; conflicts %v", e.fp.Received(), len(want), e.fp.Conflicts())
	}
	if n := e.metric("gatehouse_flexprice_events_sent_total"); n != float64(len(want)) {
		t.Fatalf("events_sent %v", n)
	}
}

func TestUsageFaults(t *testing.T) {
	const bulk = "/v1/events/bulk"
	cases := []struct {
		name   string
		srv    fpt.Options
		inject func(*fpt.Server)
		parked int // events refused for good
	}{
		{name: "5xx", inject: func(s *fpt.Server) { s.FailNext(bulk, 3, 502) }},
		{name: "429 Retry-After", inject: func(s *fpt.Server) { s.RateLimitNext(bulk, 1, "1") }},
		{name: "timeout", inject: func(s *fpt.Server) { s.SlowNext(bulk, 2, 2500*time.Millisecond) }},
		{name: "400 at index", inject: func(s *fpt.Server) { s.RejectNextAt(30) }, parked: 1},
		{name: "400 without index", srv: fpt.Options{HideBadIndex: true}, parked: 3, inject: func(s *fpt.Server) {
			s.RejectEvents(func(ev fpt.Event) bool { return strings.HasSuffix(ev.EventID, "/2/1") }) // one per message
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, tc.srv)
			tc.inject(e.fp)
			e.run(func(o *Options) { o.DisableSync = true; o.RequestTimeout = time.Second })
			want := e.usageBatch(1)
			e.drained()
			if got := e.fp.DistinctEvents(); got != len(want)-tc.parked {
				t.Fatalf("%d distinct events at Flexprice, want %d", got, len(want)-tc.parked)
			}
			if c := e.fp.Conflicts(); len(c) > 0 {
				t.Fatalf("ids sent with two timestamps: %v", c)
			}
			have := map[string]bool{}
			for _, ev := range e.fp.Events() {
				have[ev.EventID] = true
			}
			dead := e.dead()
			if len(dead) != tc.parked {
				t.Fatalf("%d dead letters, want %d", len(dead), tc.parked)
			}
			for _, d := range dead {
				if d.Reason != "rejected" || d.Status != 400 || d.Event == nil || have[d.Event.EventID] || len(d.Message) == 0 {
					t.Fatalf("dead letter %+v", d)
				}
				have[d.Event.EventID] = true
			}
			for _, id := range want {
				if !have[id] {
					t.Fatalf("event %s neither sent nor parked", id)
				}
			}
			if e.fp.PendingFaults() != 0 {
				t.Fatal("fault not exercised")
			}
			if n := e.metric("gatehouse_flexprice_events_sent_total"); n != float64(len(want)-tc.parked) {
				t.Fatalf("events_sent %v", n)
			}
			if n := e.metric("gatehouse_flexprice_events_parked_total", `reason="rejected"`); n != float64(tc.parked) {
				t.Fatalf("events_parked %v", n)
			}
			t.Logf("%d events, %d distinct, %d received (duplicates are retries of the same id)",
				len(want), e.fp.DistinctEvents(), e.fp.Received())
		})
	}
}

func TestUsageRetryAfterHonoured(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.fp.RateLimitNext("/v1/events/bulk", 1, "1")
	e.run(func(o *Options) { o.DisableSync = true })
	e.usageBatch(1)
	e.drained()
	calls := e.fp.Calls("/v1/events/bulk")
	if len(calls) != 2 || calls[0].Status != 429 || calls[1].At.Sub(calls[0].At) < 900*time.Millisecond {
		t.Fatalf("calls %+v", calls)
	}
}

func TestUsageUnmappedAndUndecodableParked(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.run(func(o *Options) { o.DisableSync = true })
	id := e.publish(usage.Message{SidecarID: "sc-1", Epoch: "E", Seq: 7, To: t0, Deltas: []usage.Delta{
		{CustomerID: "acme", Feature: "exports", WindowStart: t0, Quantity: 4}, // no mapping
		{CustomerID: "acme", Feature: "api_calls", WindowStart: t0, Quantity: 2},
		{CustomerID: "acme", Feature: "api_calls", WindowStart: t0, Quantity: -1}, // invalid
	}})
	if _, err := e.js.Publish(context.Background(), "gatehouse.usage.sc-2", []byte("not json")); err != nil {
		t.Fatal(err)
	}
	e.drained()
	if e.fp.DistinctEvents() != 2 {
		t.Fatalf("%d events", e.fp.DistinctEvents())
	}
	dead := e.dead()
	reasons := map[string]DeadLetter{}
	for _, d := range dead {
		reasons[d.Reason] = d
	}
	if len(dead) != 3 || reasons["unmapped_feature"].Delta == nil || *reasons["unmapped_feature"].Delta != 0 ||
		reasons["unmapped_feature"].MsgID != id || reasons["invalid"].Delta == nil || *reasons["invalid"].Delta != 2 ||
		string(reasons["decode"].Message) != `"not json"` {
		t.Fatalf("dead letters %+v", dead)
	}
	var orig usage.Message
	if err := json.Unmarshal(reasons["unmapped_feature"].Message, &orig); err != nil || orig.Seq != 7 {
		t.Fatalf("original message not kept: %v %+v", err, orig)
	}
	if e.metric("gatehouse_flexprice_events_parked_total", `reason="unmapped_feature"`) != 1 {
		t.Fatal("unmapped not counted")
	}
}

func TestUsageNotRedeliveredWhileRetrying(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.fp.FailNext("/v1/events/bulk", 25, 503) // ~2.5 s of retries at 100 ms
	e.run(func(o *Options) { o.DisableSync = true; o.AckWait = time.Second })
	want := e.usageBatch(1)
	e.drained()
	ci, _ := e.js.Consumer(context.Background(), usage.Stream, ConsumerName)
	info, _ := ci.Info(context.Background())
	if info.NumRedelivered != 0 {
		t.Fatalf("%d messages redelivered during retries", info.NumRedelivered)
	}
	if e.fp.DistinctEvents() != len(want) || e.fp.Received() != len(want) {
		t.Fatalf("distinct %d received %d want %d", e.fp.DistinctEvents(), e.fp.Received(), len(want))
	}
}

func TestEventIDsAndTimes(t *testing.T) {
	m := &usage.Message{To: time.Date(2026, 11, 22, 10, 0, 1, 123456789, time.FixedZone("x", 3600)),
		Deltas: []usage.Delta{{CustomerID: "c", Feature: "f", Quantity: 3}}}
	evs, err := deltaEvents("sc:e:1", m, 0, &FeatureEvents{EventName: "n", Mode: ModeCount}, 10)
	if err != nil || len(evs) != 3 || evs[2].EventID != "sc:e:1/0/2" ||
		!evs[0].Timestamp.Equal(time.Date(2026, 11, 22, 9, 0, 1, 123000000, time.UTC)) {
		t.Fatalf("%+v %v", evs, err)
	}
	if _, err := deltaEvents("sc:e:1", m, 0, &FeatureEvents{EventName: "n", Mode: ModeCount}, 2); err == nil {
		t.Fatal("a count above the bound was accepted")
	}
	long := strings.Repeat("x", 300)
	if id := eventID(long, 1, 2); len(id) > maxEventIDLen || id != eventID(long, 1, 2) || id == eventID(long, 1, 3) {
		t.Fatalf("digest id %q", id)
	}
}
