package usage

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
)

// A restart at each stage of the usage's way out (in the log; cut into a message; published
// and partly settled into the counters; settled, with the published log segments not yet
// deleted) restores every counter exactly, and publishes every unit exactly once.
func TestRestartAtEveryStage(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(r *Recorder)
		stop  func(t *testing.T, r *Recorder)
	}{
		{"in the log", nil, func(t *testing.T, r *Recorder) { r.Close(expired()) }},
		{"cut, not published", func(r *Recorder) {
			r.hooks.beforePublish = func() bool { return true }
		}, func(t *testing.T, r *Recorder) { crash(t, r) }},
		{"published, partly settled", func(r *Recorder) {
			r.settleChunk = 7
			n := 0
			r.hooks.afterSettle = func() bool { n++; return n == 3 }
		}, func(t *testing.T, r *Recorder) {
			flush(t, r)
			eventually(t, "the crash in the middle of settling", r.crashed.Load)
			if s := r.Stats(); s.Unsettled != 1 {
				t.Fatalf("unsettled messages %d at the crash", s.Unsettled)
			}
			r.Close(expired())
		}},
		{"settled, published log not deleted", func(r *Recorder) {
			r.sweepChunk = 0
		}, func(t *testing.T, r *Recorder) {
			flush(t, r)
			eventually(t, "settling", func() bool { return r.Stats().Unsettled == 0 })
			r.Close(expired())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			r := e.build(hourly)
			if tc.setup != nil {
				tc.setup(r)
			}
			e.start(r)
			want := newLedger()
			sums := map[limiter.CounterKey]int64{}
			for i := range 400 {
				u := use(fmt.Sprintf("cust_%02d", i%40), []string{"api_calls", "tokens"}[i%2], -1, int64(1+i%3), int64(i%2))
				if err := r.Record([]limiter.Usage{u}); err != nil {
					t.Fatal(err)
				}
				want.add(u)
				sums[u.Key] += u.Quantity
			}
			tc.stop(t, r)
			e.reopen()

			r2 := e.build(hourly)
			if s := r2.Stats(); tc.name == "settled, published log not deleted" && (s.OutboxRecords != 0 || s.OutboxBytes != 0 || s.PendingSeq != 0) {
				t.Fatalf("the published log counts as outbox after the restart: %+v", s)
			}
			l := limiter.New()
			if err := r2.Restore(l); err != nil {
				t.Fatal(err)
			}
			got := map[limiter.CounterKey]int64{}
			l.Counters("", func(c *limiter.Counter) { got[c.Key] = c.Committed() })
			if len(got) != len(sums) {
				t.Fatalf("restored %d counters, want %d", len(got), len(sums))
			}
			for k, v := range sums {
				if got[k] != v {
					t.Fatalf("counter %v restored as %d, want %d", k, got[k], v)
				}
			}
			e.start(r2)
			flush(t, r2)
			eventually(t, "settling after the restart", func() bool { return r2.Stats().Unsettled == 0 })
			checkOnce(t, e.js)
			checkTotals(t, e.js, want)

			// Once settled, the counters alone (no outbox, no message) hold the same.
			r2.Close(expired())
			e.reopen()
			l3 := limiter.New()
			if err := e.build(hourly).Restore(l3); err != nil {
				t.Fatal(err)
			}
			l3.Counters("", func(c *limiter.Counter) {
				if c.Committed() != sums[c.Key] {
					t.Errorf("settled counter %v is %d, want %d", c.Key, c.Committed(), sums[c.Key])
				}
			})
		})
	}
}

// The message JSON is exactly what encoding/json makes of the Message, escapes included.
func TestMessageJSONMatchesEncodingJSON(t *testing.T) {
	names := []string{"cust_a", `quo"te\back`, "<tag>&amp;", "ctl\x00\x01\b\f\n\r\t\x1f", "bad\xffutf8\xc3", "line\u2028sep\u2029", "ünïcødé ✓", ""}
	var es []batchEntry
	for i, c := range names {
		es = append(es, batchEntry{
			k: limiter.CounterKey{Customer: c, Feature: names[(i+1)%len(names)], WindowStart: window0.AddDate(0, 0, i).UnixNano() + int64(i*1001)},
			d: delta{quantity: int64(i * 1000003), overage: -int64(i)},
		})
	}
	from, to := window0.Add(123456789).UnixNano(), window0.Add(time.Hour).UnixNano()
	for _, deltas := range [][]batchEntry{es, nil} {
		m := Message{SidecarID: "sc-<&>", Epoch: "ep\"och", Seq: 1<<63 + 5, From: time.Unix(0, from).UTC(), To: time.Unix(0, to).UTC(),
			Deltas: []Delta{}}
		for _, e := range deltas {
			m.Deltas = append(m.Deltas, Delta{CustomerID: e.k.Customer, Feature: e.k.Feature,
				WindowStart: time.Unix(0, e.k.WindowStart).UTC(), Quantity: e.d.quantity, Overage: e.d.overage})
		}
		want, err := json.Marshal(&m)
		if err != nil {
			t.Fatal(err)
		}
		got := appendMessageJSON(nil, m.SidecarID, m.Epoch, m.Seq, from, to, deltas, nil)
		if string(got) != string(want) {
			t.Fatalf("appendMessageJSON\n got %s\nwant %s", got, want)
		}
	}
}

// A pending message written by the earlier format (its usage moved into the counters at
// the cut) is published as it is, and Restore does not count its usage twice.
func TestVersion1PendingMessage(t *testing.T) {
	e := newEnv(t)
	k := limiter.CounterKey{Customer: "cust_a", Feature: "api_calls", WindowStart: window0.UnixNano()}
	end := window0.AddDate(100, 0, 0).UnixNano()
	m := Message{SidecarID: e.st.SidecarID(), Epoch: e.st.Epoch(), Seq: 1, From: window0, To: window0,
		Deltas: []Delta{{CustomerID: k.Customer, Feature: k.Feature, WindowStart: window0, Quantity: 7, Overage: 2}}}
	data, err := json.Marshal(&m)
	if err != nil {
		t.Fatal(err)
	}
	err = e.st.DB().Update(func(txn *badger.Txn) error {
		if err := txn.Set(pendingKey(1), append(binary.BigEndian.AppendUint64(nil, 7), data...)); err != nil {
			return err
		}
		return txn.Set(appendCK([]byte(prefixCounter), &k), appendCounter(nil, counter{end: end, quantity: 7, overage: 2}))
	})
	if err != nil {
		t.Fatal(err)
	}
	r := e.build(hourly)
	l := limiter.New()
	if err := r.Restore(l); err != nil {
		t.Fatal(err)
	}
	l.Counters("", func(c *limiter.Counter) {
		if c.Key != k || c.Committed() != 7 {
			t.Fatalf("restored %v = %d, want %v = 7", c.Key, c.Committed(), k)
		}
	})
	e.start(r)
	flush(t, r)
	msgs := checkOnce(t, e.js)
	if len(msgs) != 1 {
		t.Fatalf("published %d messages, want 1", len(msgs))
	}
	if got, _ := json.Marshal(&msgs[0].m); string(got) != string(data) {
		t.Fatalf("published %s, want the stored message %s", got, data)
	}
	err = e.st.DB().View(func(txn *badger.Txn) error {
		_, err := txn.Get(pendingKey(1))
		return err
	})
	if !errors.Is(err, badger.ErrKeyNotFound) {
		t.Fatalf("the version-1 message is still stored after its acknowledgement: %v", err)
	}
}

// Overage is the part of the durable total beyond the limit, in the order commits are
// durable: when the limiter counted a request whose commit a crash then lost, the next
// request's overage (as the limiter computed it) would be one unit too many.
func TestOverageFollowsDurableOrder(t *testing.T) {
	e := newEnv(t)
	k := limiter.CounterKey{Customer: "cust_soft", Feature: "exports", WindowStart: window0.UnixNano()}
	end := window0.AddDate(100, 0, 0).UnixNano()
	soft := func(qty, limiterOverage int64) limiter.Usage {
		return limiter.Usage{Key: k, End: end, Quantity: qty, Overage: limiterOverage, Limited: true, Limit: 10}
	}
	r := e.recorder(hourly)
	for range 9 {
		if err := r.Record([]limiter.Usage{soft(1, 0)}); err != nil {
			t.Fatal(err)
		}
	}
	r.Close(expired())
	e.reopen()

	// The limiter had counted a 10th request (lost in the crash) before this one, so it
	// says this one is over; durably it is the 10th, within the limit.
	r2 := e.recorder(hourly)
	if err := r2.Restore(limiter.New()); err != nil {
		t.Fatal(err)
	}
	for _, u := range []limiter.Usage{soft(1, 1), soft(3, 3), {Key: k, End: end, Quantity: 2, Overage: 2}} {
		if err := r2.Record([]limiter.Usage{u}); err != nil {
			t.Fatal(err)
		}
	}
	flush(t, r2)
	totals, err := Totals(within(t, 10*time.Second), e.js)
	if err != nil {
		t.Fatal(err)
	}
	// 9 + 1 (within) + 3 (over) + 2 (no limit known: overage as given).
	if len(totals) != 1 || totals[0].Quantity != 15 || totals[0].Overage != 5 {
		t.Fatalf("totals %+v, want quantity 15 and overage 3 + 2", totals)
	}
}

// The overage of a limited key is computed from its durable total, which the publisher
// remembers in the key's slot from cut to cut (durableOf); a prune of ended windows
// between cuts starts a new generation. Across cuts and a prune, the overage is still
// the part of the total beyond the limit.
func TestOverageAcrossCutsAndPrunes(t *testing.T) {
	e := newEnv(t)
	var clock atomic.Int64
	clock.Store(window0.Add(time.Hour).UnixNano())
	r := e.recorder(func(o *Options) {
		o.FlushInterval = time.Hour
		o.Now = func() time.Time { return time.Unix(0, clock.Load()) }
	})
	limited := use("cust_soft", "exports", -1, 4, 0)
	limited.Limited, limited.Limit = true, 10
	ended := use("cust_soft", "calls", 0, 1, 0) // its window ends a day after window0
	for round := range 5 {
		us := []limiter.Usage{limited}
		if round < 2 {
			us = append(us, ended)
		}
		if err := r.Record(us); err != nil {
			t.Fatal(err)
		}
		flush(t, r)
		if round == 2 { // past the ended window and the next prune: its total goes
			clock.Add(int64(72 * time.Hour))
		}
	}
	totals, err := Totals(within(t, 10*time.Second), e.js)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]Total{}
	for _, tot := range totals {
		got[tot.Feature] = tot
	}
	// exports: 5 × 4 = 20 against a limit of 10; calls: 2, no limit known.
	if x := got["exports"]; x.Quantity != 20 || x.Overage != 10 {
		t.Errorf("exports: %+v, want quantity 20, overage 10", x)
	}
	if c := got["calls"]; c.Quantity != 2 || c.Overage != 0 {
		t.Errorf("calls: %+v, want quantity 2, overage 0", c)
	}
	r.Close(expired()) // the publisher is done: its state may be read
	if r.p.durableGen == 0 {
		t.Error("no prune happened: the test did not cover a new generation")
	}
}
