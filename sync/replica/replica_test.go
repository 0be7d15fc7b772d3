package replica

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"github.com/nats-io/nats.go/jetstream"
)

func TestUpdatesAndDeletesEnforced(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.put("cust_acme", doc("cust_acme", 1000, "key-1"))
	r := e.start()
	e.waitReady()
	if got := e.limitOf("cust_acme"); got != 1000 {
		t.Fatalf("limit %d, want 1000", got)
	}
	if s := r.CustomerByKey(keySum("key-1")); s == nil || s.CustomerID != "cust_acme" {
		t.Fatalf("by key: %v", s)
	}
	if r.Customer([]byte("nobody")) != nil || r.CustomerByKey(keySum("nokey")) != nil {
		t.Fatal("unknown customer or key found")
	}

	// An update, with the API key moved: the old key stops working at once.
	e.put("cust_acme", doc("cust_acme", 50, "key-2"))
	waitFor(t, "update", func() bool { return e.limitOf("cust_acme") == 50 })
	if r.CustomerByKey(keySum("key-1")) != nil {
		t.Error("old api key still resolves")
	}
	if s := r.CustomerByKey(keySum("key-2")); s == nil || s.Feature("api_calls").Limit != 50 {
		t.Errorf("new api key: %v", s)
	}

	// A customer that was looked up while unknown appears once created.
	e.put("cust_new", doc("cust_new", 7))
	waitFor(t, "new customer", func() bool { return e.limitOf("cust_new") == 7 })

	// A delete revokes, and so does a purge.
	e.del("cust_acme")
	waitFor(t, "delete", func() bool { return r.Customer([]byte("cust_acme")) == nil })
	if r.CustomerByKey(keySum("key-2")) != nil {
		t.Error("api key of a deleted customer still resolves")
	}
	if err := e.kv.Purge(context.Background(), KeyFor("cust_new")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "purge", func() bool { return r.Customer([]byte("cust_new")) == nil })
	st := r.Stats()
	if st.Deleted != 2 || st.Customers != 0 {
		t.Errorf("stats after deletes: %+v", st)
	}

	// Ids that are not key-safe travel base64-encoded.
	odd := `weird/id"with&quotes..dots*>`
	e.put(odd, doc(odd, 3))
	waitFor(t, "odd id", func() bool { return e.limitOf(odd) == 3 })
}

func TestOnChange(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	st, err := store.Open(store.Options{Dir: e.dir, Log: testutil.Logger(t), GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	type change struct{ old, new int64 }
	ch := make(chan change, 10)
	r, err := New(Options{JS: e.js, Store: st, Log: testutil.Logger(t), OnChange: func(o, n *limiter.Snapshot) {
		c := change{-1, -1}
		if o != nil {
			c.old = o.Feature("api_calls").Limit
		}
		if n != nil {
			c.new = n.Feature("api_calls").Limit
		}
		ch <- c
	}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	e.r = r
	e.waitReady()
	e.r = nil
	// One change at a time: a replica that falls behind (a resync under load) applies
	// the newest value of a key and may rightly skip the ones between.
	for i, want := range []change{{-1, 1}, {1, 2}, {2, -1}} {
		switch i {
		case 0, 1:
			e.put("c1", doc("c1", int(want.new)))
		default:
			e.del("c1")
		}
		select {
		case got := <-ch:
			if got != want {
				t.Errorf("OnChange(old %d, new %d), want (%d, %d)", got.old, got.new, want.old, want.new)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no OnChange for %v", want)
		}
	}
}

func TestRestartResumesWithoutReplay(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for i := range 100 {
		e.put(fmt.Sprintf("c%d", i), doc(fmt.Sprintf("c%d", i), i))
	}
	r := e.start()
	e.waitCaughtUp()
	if st := r.Stats(); st.Applied != 100 || st.Customers != 100 {
		t.Fatalf("first run: %+v", st)
	}
	e.stop()

	// While the sidecar is down: 3 new, 2 updated, 1 deleted.
	for i := 100; i < 103; i++ {
		e.put(fmt.Sprintf("c%d", i), doc(fmt.Sprintf("c%d", i), i))
	}
	e.put("c1", doc("c1", 1001))
	e.put("c2", doc("c2", 1002))
	e.del("c3")

	r = e.start()
	if !r.Ready() {
		t.Fatal("a replica from an earlier run is not ready at once")
	}
	if got := e.limitOf("c50"); got != 50 {
		t.Fatalf("served from Badger before catching up: limit %d, want 50", got)
	}
	e.waitCaughtUp()
	st := r.Stats()
	if st.Applied != 6 || st.Resyncs != 0 || st.Customers != 102 {
		t.Fatalf("restart applied %d entries (want 6), resyncs %d (want 0), customers %d (want 102)", st.Applied, st.Resyncs, st.Customers)
	}
	if e.limitOf("c1") != 1001 || e.limitOf("c102") != 102 || e.limitOf("c3") != -1 {
		t.Errorf("after resume: c1 %d c102 %d c3 %d", e.limitOf("c1"), e.limitOf("c102"), e.limitOf("c3"))
	}

	// A restart with nothing new applies nothing.
	e.stop()
	r = e.start()
	e.waitCaughtUp()
	if st := r.Stats(); st.Applied != 0 || st.Resyncs != 0 {
		t.Errorf("idle restart: %+v", st)
	}
}

func TestNATSRestartKeepingData(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.put("c1", doc("c1", 1))
	r := e.start()
	e.waitCaughtUp()
	e.n.Restart()
	if e.limitOf("c1") != 1 {
		t.Fatal("customer lost over a NATS restart")
	}
	waitFor(t, "reconnect", e.nc.IsConnected)
	e.put("c2", doc("c2", 2))
	e.put("c1", doc("c1", 10))
	waitFor(t, "catch up after restart", func() bool { return e.limitOf("c2") == 2 && e.limitOf("c1") == 10 })
	if st := r.Stats(); st.Resyncs != 0 {
		t.Errorf("a NATS restart that kept its data caused %d resyncs", st.Resyncs)
	}
}

func TestServesWhileNATSDown(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for i := range 10 {
		e.put(fmt.Sprintf("c%d", i), doc(fmt.Sprintf("c%d", i), i))
	}
	r := e.start()
	e.waitCaughtUp()
	if st := r.Stats(); !st.CaughtUp || st.Staleness != 0 {
		t.Fatalf("live replica: %+v", st)
	}

	e.n.Shutdown()
	waitFor(t, "disconnect", func() bool { return !r.Stats().CaughtUp })
	time.Sleep(100 * time.Millisecond)
	st := r.Stats()
	if st.Staleness < 50*time.Millisecond || st.LastContact.IsZero() || !st.Ready {
		t.Errorf("while NATS is down: %+v", st)
	}
	for i := range 10 {
		if got := e.limitOf(fmt.Sprintf("c%d", i)); got != int64(i) {
			t.Fatalf("c%d: limit %d while NATS is down", i, got)
		}
	}

	// A restart of the replica while NATS is down serves from Badger at once.
	e.stop()
	r = e.start()
	if !r.Ready() || e.limitOf("c7") != 7 {
		t.Fatalf("restart while NATS is down: ready %v, c7 %d", r.Ready(), e.limitOf("c7"))
	}
	if st := r.Stats(); st.Staleness <= 0 {
		t.Errorf("staleness unknown after restart without NATS: %+v", st)
	}

	e.n.Restart()
	waitFor(t, "reconnect", e.nc.IsConnected)
	e.put("c1", doc("c1", 111))
	e.del("c2")
	waitFor(t, "catch up", func() bool { return e.limitOf("c1") == 111 && e.limitOf("c2") == -1 })
	waitFor(t, "live", func() bool { return r.Stats().CaughtUp })
}

func TestBucketRecreatedResyncs(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for i := range 50 {
		e.put(fmt.Sprintf("c%d", i), doc(fmt.Sprintf("c%d", i), i, fmt.Sprintf("k%d", i)))
	}
	r := e.start()
	e.waitCaughtUp()

	ctx := context.Background()
	if err := e.js.DeleteKeyValue(ctx, DefaultBucket); err != nil {
		t.Fatal(err)
	}
	// Gone for a moment: the replica keeps serving what it has.
	time.Sleep(200 * time.Millisecond)
	if e.limitOf("c10") != 10 {
		t.Fatal("customers dropped while the bucket was missing")
	}
	var err error
	if e.kv, err = EnsureBucket(ctx, e.js); err != nil {
		t.Fatal(err)
	}
	// The new bucket holds c0..c9 (c0 changed) and a newcomer.
	for i := range 10 {
		e.put(fmt.Sprintf("c%d", i), doc(fmt.Sprintf("c%d", i), i, fmt.Sprintf("k%d", i)))
	}
	e.put("c0", doc("c0", 500))
	e.put("fresh", doc("fresh", 5))
	waitFor(t, "resync", func() bool { return r.Stats().Resyncs >= 1 && r.Stats().CaughtUp })
	e.waitCaughtUp()
	st := r.Stats()
	if st.Customers != 11 {
		t.Errorf("customers %d after resync, want 11", st.Customers)
	}
	if e.limitOf("c10") != -1 || e.limitOf("c49") != -1 || r.CustomerByKey(keySum("k20")) != nil {
		t.Error("customers absent from the new bucket are still served")
	}
	if e.limitOf("c0") != 500 || e.limitOf("c9") != 9 || e.limitOf("fresh") != 5 {
		t.Errorf("after resync: c0 %d c9 %d fresh %d", e.limitOf("c0"), e.limitOf("c9"), e.limitOf("fresh"))
	}
	if s := r.CustomerByKey(keySum("k5")); s == nil || s.CustomerID != "c5" {
		t.Error("api key of a kept customer lost")
	}
}

func TestKeysRemovedWithoutMarkerResync(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		remove func(t *testing.T, e *env)
		left   int
	}{
		{"PurgeDeletes", func(t *testing.T, e *env) {
			// c3 is deleted, then its marker removed: resume alone would never see it.
			e.del("c3")
			if err := e.kv.PurgeDeletes(context.Background(), jetstream.DeleteMarkersOlderThan(-1)); err != nil {
				t.Fatal(err)
			}
		}, 19},
		{"stream purge", func(t *testing.T, e *env) {
			s, err := e.js.Stream(context.Background(), "KV_"+DefaultBucket)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Purge(context.Background()); err != nil {
				t.Fatal(err)
			}
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			for i := range 20 {
				e.put(fmt.Sprintf("c%d", i), doc(fmt.Sprintf("c%d", i), i))
			}
			e.start()
			e.waitCaughtUp()
			e.stop()
			tc.remove(t, e)
			r := e.start()
			waitFor(t, "resync", func() bool { return r.Stats().Resyncs == 1 && r.Stats().CaughtUp })
			if st := r.Stats(); st.Customers != tc.left {
				t.Errorf("customers %d, want %d", st.Customers, tc.left)
			}
			if e.limitOf("c3") != -1 {
				t.Error("c3 still served")
			}
		})
	}
}

func TestMalformedValuesRejectedWhole(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	// A good snapshot, then a bad value for the same customer: the good one stays.
	e.put("keep", doc("keep", 42))
	r := e.start()
	e.waitCaughtUp()

	var keys []string
	var vals [][]byte
	bad := []func(i int) (string, string){
		func(i int) (string, string) { return KeyFor(fmt.Sprintf("b%d", i)), "{not json" },
		func(i int) (string, string) { return KeyFor(fmt.Sprintf("b%d", i)), doc(fmt.Sprintf("other%d", i), 1) }, // id mismatch
		func(i int) (string, string) {
			return KeyFor(fmt.Sprintf("b%d", i)), strings.Replace(doc(fmt.Sprintf("b%d", i), 1), `"metered"`, `"metred"`, 1)
		},
		func(i int) (string, string) { return fmt.Sprintf("nokind%d", i), doc(fmt.Sprintf("nokind%d", i), 1) }, // key form
		func(i int) (string, string) { return "b." + fmt.Sprintf("x%d", i), doc(fmt.Sprintf("x%d", i), 1) },    // not base64 of it
		func(i int) (string, string) { return KeyFor(fmt.Sprintf("b%d", i)), `[]` },
		func(i int) (string, string) {
			return KeyFor(fmt.Sprintf("b%d", i)), `{"customer_id":"` + fmt.Sprintf("b%d", i) + `","features":{"f":{"type":"metered","usage_limit":-5}}}`
		},
	}
	for i := range 11000 {
		if i%11 == 0 {
			id := fmt.Sprintf("good%d", i)
			keys, vals = append(keys, KeyFor(id)), append(vals, []byte(doc(id, i)))
			continue
		}
		k, v := bad[i%len(bad)](i)
		keys, vals = append(keys, k), append(vals, []byte(v))
	}
	keys, vals = append(keys, KeyFor("keep")), append(vals, []byte(`{"customer_id":"keep","features":{"x":{"type":"nope"}}}`))
	e.putMany(keys, vals)
	e.waitCaughtUp()
	st := r.Stats()
	if st.Rejected != 10001 || st.Applied != 1001 || st.Customers != 1001 {
		t.Fatalf("rejected %d (want 10001), applied %d (want 1001), customers %d (want 1001)", st.Rejected, st.Applied, st.Customers)
	}
	for i := 0; i < 11000; i += 11 {
		if got := e.limitOf(fmt.Sprintf("good%d", i)); got != int64(i) {
			t.Fatalf("good%d: limit %d", i, got)
		}
	}
	if e.limitOf("keep") != 42 {
		t.Error("the last good snapshot was not kept after a bad value")
	}
	if e.limitOf("b1") != -1 || e.limitOf("other2") != -1 {
		t.Error("a rejected value is served")
	}
	// The rejected keys count as keys: no resync for a count mismatch.
	time.Sleep(200 * time.Millisecond)
	if st := r.Stats(); st.Resyncs != 0 {
		t.Errorf("resyncs %d", st.Resyncs)
	}
}

func TestCorruptStoreRebuiltFromNATS(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for i := range 30 {
		e.put(fmt.Sprintf("c%d", i), doc(fmt.Sprintf("c%d", i), i))
	}
	e.start()
	e.waitCaughtUp()
	e.stop()

	files, _ := os.ReadDir(e.badgerDir())
	for _, f := range files {
		if f.Name() != "LOCK" {
			if err := os.WriteFile(filepath.Join(e.badgerDir(), f.Name()), []byte(strings.Repeat("garbage", 1000)), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	r := e.start()
	if !e.st.Rebuilt() {
		t.Fatal("store not rebuilt")
	}
	if r.Ready() {
		t.Error("a rebuilt, empty replica reports ready before syncing")
	}
	e.waitReady()
	e.waitCaughtUp()
	if st := r.Stats(); st.Customers != 30 || st.Applied != 30 {
		t.Errorf("rebuilt replica: %+v", st)
	}
	if e.limitOf("c29") != 29 {
		t.Error("customer missing after rebuild")
	}
}

func TestResyncOnDemand(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.put("a", doc("a", 1))
	r := e.start()
	e.waitCaughtUp()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := r.Resync(ctx); err != nil {
		t.Fatal(err)
	}
	st := r.Stats()
	if st.Resyncs != 1 || st.Applied != 1 || e.limitOf("a") != 1 {
		t.Errorf("after resync: %+v (an unchanged key is not applied again)", st)
	}
}

func TestWatcherRecreatedWithoutLeakingConsumers(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	r := e.start()
	e.waitReady()
	ctx := context.Background()
	stream, err := e.js.Stream(ctx, "KV_"+DefaultBucket)
	if err != nil {
		t.Fatal(err)
	}
	consumers := func() []string {
		var names []string
		l := stream.ConsumerNames(ctx)
		for n := range l.Name() {
			names = append(names, n)
		}
		return names
	}
	// Kill the watch's consumer three times; updates keep flowing each time.
	for i := range 3 {
		for _, name := range consumers() {
			if err := stream.DeleteConsumer(ctx, name); err != nil {
				t.Fatal(err)
			}
		}
		id := fmt.Sprintf("after%d", i)
		e.put(id, doc(id, i))
		waitFor(t, id, func() bool { return e.limitOf(id) == int64(i) })
	}
	waitFor(t, "one consumer", func() bool { return len(consumers()) <= 1 })
	r.Close()
	waitFor(t, "no consumer after Close", func() bool { return len(consumers()) == 0 })
}

func TestServesBadgerOnlyWithoutNATS(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.put("a", doc("a", 9))
	e.start()
	e.waitCaughtUp()
	e.stop()

	st, err := store.Open(store.Options{Dir: e.dir, Log: testutil.Logger(t), GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	e.st = st
	r, err := New(Options{Store: st, Log: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	e.r = r
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !r.Ready() || e.limitOf("a") != 9 {
		t.Fatalf("ready %v, a %d", r.Ready(), e.limitOf("a"))
	}
	if err := r.Resync(context.Background()); err != ErrNoUpstream {
		t.Errorf("Resync without NATS: %v", err)
	}
}

// A full sync over a recreated bucket that stopped half-way must not trust the old
// stream's revisions when it starts again: the new stream reuses the same numbers.
func TestInterruptedResyncDistrustsOldRevisions(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	for i := range 10 {
		e.put(fmt.Sprintf("c%d", i), doc(fmt.Sprintf("c%d", i), i))
	}
	e.start()
	e.waitCaughtUp()
	e.stop()

	ctx := context.Background()
	if err := e.js.DeleteKeyValue(ctx, DefaultBucket); err != nil {
		t.Fatal(err)
	}
	var err error
	if e.kv, err = EnsureBucket(ctx, e.js); err != nil {
		t.Fatal(err)
	}
	for i := range 5 { // revisions 1..5 again, other values
		e.put(fmt.Sprintf("c%d", i), doc(fmt.Sprintf("c%d", i), 100+i))
	}
	st, _ := e.kv.Status(ctx)
	created := st.(*jetstream.KeyValueBucketStatus).StreamInfo().Created

	// The state a replica leaves when it stops right after starting the full sync.
	s, err := store.Open(store.Options{Dir: e.dir, Log: testutil.Logger(t), GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	e.st = s
	pos, err := loadPosition(s.DB())
	if err != nil {
		t.Fatal(err)
	}
	pos.StreamCreated, pos.Revision, pos.FullPending, pos.StaleRevisions = created, 0, true, true
	if err := s.DB().Update(func(txn *badger.Txn) error { return setPosition(txn, &pos) }); err != nil {
		t.Fatal(err)
	}

	r := e.start()
	waitFor(t, "resync", func() bool { return r.Stats().CaughtUp && r.Stats().Customers == 5 })
	for i := range 5 {
		if got := e.limitOf(fmt.Sprintf("c%d", i)); got != int64(100+i) {
			t.Errorf("c%d: limit %d, want %d (an old revision was trusted)", i, got, 100+i)
		}
	}
	if e.limitOf("c7") != -1 {
		t.Error("c7 survived the resync")
	}
}
