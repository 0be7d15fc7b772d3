package usage

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/nats-io/nats.go/jetstream"
)

// An acknowledgement is lost and NATS stays away longer than the stream's duplicate
// window while usage keeps flowing: the republished message is recognised from the
// stream itself, and nothing is lost or doubled.
func TestOutageLongerThanDuplicateWindow(t *testing.T) {
	e := newEnv(t)
	ctx := within(t, 30*time.Second)
	if _, err := e.js.CreateStream(ctx, jetstream.StreamConfig{
		Name: Stream, Subjects: []string{SubjectPrefix + ">"}, Duplicates: time.Second,
	}); err != nil {
		t.Fatal(err)
	}
	r := e.build()
	var arm atomic.Bool
	var lostID string
	down := make(chan struct{})
	r.hooks.afterPublish = func(ack *jetstream.PubAck, err error) (*jetstream.PubAck, error) {
		if err == nil && arm.CompareAndSwap(true, false) {
			lostID = r.p.pending.id // stored by the server; the sidecar never hears of it
			e.nats.Shutdown()
			close(down)
			return nil, errors.New("injected: acknowledgement lost with the connection")
		}
		return ack, err
	}
	e.start(r)
	want := newLedger()
	stop := make(chan struct{})
	wait := hammer(r, want, 4, stop)

	time.Sleep(100 * time.Millisecond)
	arm.Store(true)
	<-down
	time.Sleep(2500 * time.Millisecond) // 2.5 duplicate windows, usage still flowing
	if s := r.Stats(); s.PendingSeq == 0 || s.OutboxRecords == 0 || s.PublishErrors == 0 {
		t.Fatalf("during the outage: %+v", s)
	}
	e.nats.Restart()
	time.Sleep(100 * time.Millisecond)
	close(stop)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	flush(t, r)

	s := r.Stats()
	if s.Recovered != 1 {
		t.Fatalf("recovered %d messages, want 1 (stats %+v)", s.Recovered, s)
	}
	checkOnce(t, e.js)
	checkTotals(t, e.js, want)
	t.Logf("records %d, messages %d, publish errors %d", s.Records, s.Published, s.PublishErrors)

	// The duplicate window had expired: the lost message's id alone would not have
	// stopped a second copy.
	ack, err := e.js.Publish(ctx, SubjectPrefix+"probe", []byte(`{}`), jetstream.WithMsgID(lostID))
	if err != nil || ack.Duplicate {
		t.Fatalf("probe with id %s: %+v, %v: the duplicate window still held it", lostID, ack, err)
	}
}

func TestNATSRestartsWhilePublishing(t *testing.T) {
	e := newEnv(t)
	r := e.recorder(func(o *Options) { o.FlushInterval = 5 * time.Millisecond })
	want := newLedger()
	stop := make(chan struct{})
	wait := hammer(r, want, 8, stop)
	for range 3 {
		time.Sleep(150 * time.Millisecond)
		e.nats.Restart()
	}
	time.Sleep(150 * time.Millisecond)
	close(stop)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	flush(t, r)
	checkOnce(t, e.js)
	checkTotals(t, e.js, want)
	s := r.Stats()
	t.Logf("records %d, messages %d, publish errors %d, recovered %d", s.Records, s.Published, s.PublishErrors, s.Recovered)
}

// The recorder stops with a full outbox (a shutdown that could not publish, or a crash
// at each step of a publish); the next start publishes everything exactly once.
func TestRestartPublishesOutboxOnce(t *testing.T) {
	for _, tc := range []struct {
		name      string
		recovered uint64
		stop      func(e *env, r *Recorder)
	}{
		{"close with NATS down", 0, func(e *env, r *Recorder) {
			e.nats.Shutdown()
			record(t, r, nil, 200)
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			if err := r.Close(ctx); err != nil {
				t.Fatal(err)
			}
			if s := r.Stats(); s.OutboxRecords == 0 && s.PendingSeq == 0 {
				t.Fatalf("outbox empty after a close without NATS: %+v", s)
			}
			e.nats.Restart()
		}},
		{"crash after the cut, before the publish", 0, func(e *env, r *Recorder) {
			r.hooks.beforePublish = func() bool { return true }
			record(t, r, nil, 200)
			crash(t, r)
		}},
		{"crash after the server stored it, before the ack was recorded", 1, func(e *env, r *Recorder) {
			r.hooks.beforeAck = func() bool { return true }
			record(t, r, nil, 200)
			crash(t, r)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			want := newLedger()
			r := e.recorder()
			record(t, r, want, 300)
			flush(t, r) // some usage published before
			before := r.Stats().Published
			tc.stop(e, r)
			// What stop recorded is in want once; add it now (it returned, so it is durable).
			want.add(recorded(200)...)
			e.reopen()

			r2 := e.recorder()
			record(t, r2, want, 100)
			flush(t, r2)
			s := r2.Stats()
			if s.Recovered != tc.recovered {
				t.Fatalf("recovered %d, want %d (stats %+v)", s.Recovered, tc.recovered, s)
			}
			if s.AckedSeq <= before {
				t.Fatalf("acked seq %d after restart, before %d", s.AckedSeq, before)
			}
			checkOnce(t, e.js)
			checkTotals(t, e.js, want)
		})
	}
}

// recorded is the usage that record(t, r, _, n) records.
func recorded(n int) []limiter.Usage {
	var out []limiter.Usage
	for i := range n {
		out = append(out, use([]string{"cust_a", "cust_b"}[i%2], "api_calls", i%2-1, int64(i%4+1), int64(i%3)))
	}
	return out
}

// record records recorded(n) one request at a time, adding it to l when l is not nil.
func record(t testing.TB, r *Recorder, l *ledger, n int) {
	t.Helper()
	for _, u := range recorded(n) {
		if err := r.Record([]limiter.Usage{u}); err != nil {
			t.Fatal(err)
		}
		if l != nil {
			l.add(u)
		}
	}
}

// crash waits until a hook stopped the publisher, then stops the recorder without
// publishing anything more; Badger is closed by the caller's reopen.
func crash(t testing.TB, r *Recorder) {
	t.Helper()
	if err := r.Flush(within(t, 10*time.Second)); !errors.Is(err, ErrClosed) {
		t.Fatalf("flush with a crashing publisher: %v", err)
	}
	if !r.crashed.Load() {
		t.Fatal("publisher did not crash")
	}
	r.Close(expired())
}

// A wiped database gets a new epoch under the same sidecar id: its messages continue
// after the earlier epoch's on the subject.
func TestNewEpochContinuesTheSubject(t *testing.T) {
	e := newEnv(t)
	want := newLedger()
	r := e.recorder(hourly)
	record(t, r, want, 50)
	flush(t, r)
	r.Close(context.Background())
	id, epoch := e.st.SidecarID(), e.st.Epoch()
	e.st.Close()
	if err := os.RemoveAll(filepath.Join(e.dir, "badger")); err != nil {
		t.Fatal(err)
	}
	e.open()
	if e.st.SidecarID() != id || e.st.Epoch() == epoch {
		t.Fatalf("id %s epoch %s after wiping, before %s %s", e.st.SidecarID(), e.st.Epoch(), id, epoch)
	}
	r2 := e.recorder(hourly)
	record(t, r2, want, 70)
	flush(t, r2)
	if s := r2.Stats(); s.Conflicts != 0 || s.AckedSeq != 1 {
		t.Fatalf("stats %+v", s)
	}
	msgs := checkOnce(t, e.js)
	if len(msgs) != 2 || msgs[0].m.Epoch != epoch || msgs[1].m.Epoch != e.st.Epoch() {
		t.Fatalf("messages %+v", msgs)
	}
	checkTotals(t, e.js, want)
}

// Messages of this sidecar removed from the stream (a purge) do not stop publishing.
func TestStreamPurgedRebaselines(t *testing.T) {
	e := newEnv(t)
	r := e.recorder()
	record(t, r, nil, 50)
	flush(t, r)
	st, err := e.js.Stream(context.Background(), Stream)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Purge(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := newLedger()
	record(t, r, want, 30)
	flush(t, r)
	if s := r.Stats(); s.Rebaselines != 1 {
		t.Fatalf("stats %+v", s)
	}
	checkTotals(t, e.js, want)
}

// A copy of the data directory (a restored backup) runs while the original has
// published past it: same sidecar id, same epoch, and its next message id is one the
// stream already holds. The duplicate window would swallow that message; the expected
// subject sequence exposes it as a conflict, which is kept, counted and reported.
func TestRestoredBackupConflicts(t *testing.T) {
	e := newEnv(t)
	want := newLedger()
	r := e.recorder(hourly)
	record(t, r, want, 40)
	flush(t, r)
	r.Close(context.Background())
	e.st.Close()
	backup := filepath.Join(t.TempDir(), "backup")
	if out, err := exec.Command("cp", "-a", e.dir, backup).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	e.open()
	r = e.recorder(hourly)
	record(t, r, want, 60)
	flush(t, r) // message 2, from the original
	r.Close(context.Background())

	twin := &env{t: t, nats: e.nats, js: e.js, dir: backup}
	twin.open()
	if twin.st.SidecarID() != e.st.SidecarID() || twin.st.Epoch() != e.st.Epoch() {
		t.Fatal("the copy has another identity")
	}
	r2 := twin.recorder(hourly)
	record(t, r2, nil, 10)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	go r2.Flush(ctx) // never succeeds: the twin's message is kept
	eventually(t, "a conflict", func() bool { return r2.Stats().Conflicts > 0 })
	s := r2.Stats()
	if s.PendingSeq != 2 || s.Published != 0 || !strings.Contains(s.Conflict, MsgID(e.st.SidecarID(), e.st.Epoch(), 2)) {
		t.Fatalf("stats %+v", s)
	}
	if ok, detail := r2.Readiness(); !ok || !strings.Contains(detail, "conflict") {
		t.Fatalf("readiness %v %q", ok, detail)
	}
	if n := len(checkOnce(t, e.js)); n != 2 {
		t.Fatalf("%d messages, want the original's 2", n)
	}
	checkTotals(t, e.js, want)
}

// During an outage the outbox reaches its bound: it is folded into per-key totals, the
// stat and readiness say so, recording goes on, and nothing is lost.
func TestOutboxBound(t *testing.T) {
	e := newEnv(t)
	const bound = 16 << 10
	r := e.recorder(func(o *Options) { o.MaxOutboxBytes = bound })
	want := newLedger()
	record(t, r, want, 10)
	flush(t, r)
	e.nats.Shutdown()
	// A publish begun before the client noticed holds the publisher, and so the folds,
	// until its timeout: the outbox then grows by what is appended meanwhile (at this
	// rate megabytes), whatever the bound. The bound is about a long outage, so the load
	// starts once the client knows NATS is gone.
	eventually(t, "the client to notice NATS gone", func() bool { return !r.js.Conn().IsConnected() })

	// 100,000 requests a second, three times the most one sidecar served on this
	// machine: the log takes appends far faster (millions a second from spinning
	// goroutines), more than the one publisher goroutine folds on two shared cores, and
	// the bound holds against what a proxy appends, not against that.
	stop := make(chan struct{})
	wait := hammerAt(r, want, 8, 100_000, stop)
	var maxBytes int64
	eventually(t, "the outbox at its bound", func() bool {
		s := r.Stats()
		if s.Compactions > 0 { // the first fold waits for the publisher, which may be mid-publish
			maxBytes = max(maxBytes, s.OutboxBytes)
		}
		return s.AtBound && s.Compactions >= 5 && s.Records > 200000
	})
	close(stop)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the outbox folded under its bound", func() bool { return r.Stats().OutboxBytes < bound })
	s := r.Stats()
	// Unfolded, the outbox would hold one log record per Record (at least 40 bytes
	// each, megabytes here). Folded, it overshoots the bound by what is appended while
	// one fold runs: a constant, not a share of the bound (it is large against this tiny
	// bound).
	const slack = 1 << 20
	if unfolded := int64(s.Appends) * 40; maxBytes > bound+slack || maxBytes*4 > unfolded {
		t.Fatalf("outbox reached %d bytes with a bound of %d (unfolded at least %d)", maxBytes, bound, unfolded)
	}
	if !s.AtBound || s.OutboxKeys == 0 || s.OutboxKeys > 21 {
		t.Fatalf("stats at the bound %+v", s)
	}
	if ok, detail := r.Readiness(); !ok || !strings.Contains(detail, "bound") {
		t.Fatalf("readiness %v %q", ok, detail)
	}
	t.Logf("at the bound: records %d in %d appends, compactions %d, outbox at most %d bytes, now %d bytes in %d keys",
		s.Records, s.Appends, s.Compactions, maxBytes, s.OutboxBytes, s.OutboxKeys)

	e.nats.Restart()
	record(t, r, want, 10)
	flush(t, r)
	if s := r.Stats(); s.AtBound || s.OutboxBytes != 0 {
		t.Fatalf("after draining %+v", s)
	}
	checkOnce(t, e.js)
	checkTotals(t, e.js, want)
}

// hourly leaves publishing to Flush.
func hourly(o *Options) { o.FlushInterval = time.Hour }
