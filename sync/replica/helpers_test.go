package replica

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// env is one sidecar's worth of replica under test: a real nats-server, a real Badger.
type env struct {
	t   testing.TB
	n   *testutil.NATS
	nc  *nats.Conn
	js  jetstream.JetStream
	kv  jetstream.KeyValue
	dir string
	st  *store.Store
	r   *Replica
	// cacheSize for the next replica; 0: default.
	cacheSize int
	// prodTimings keeps the production check interval and backoffs (benchmarks).
	prodTimings bool
}

func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{t: t, n: testutil.StartNATS(t), dir: t.TempDir()}
	nc, err := nats.Connect(e.n.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(20*time.Millisecond),
		nats.RetryOnFailedConnect(true))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	e.nc = nc
	if e.js, err = jetstream.New(nc); err != nil {
		t.Fatal(err)
	}
	if e.kv, err = EnsureBucket(context.Background(), e.js); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.stop)
	return e
}

// start opens the store and starts a replica with short timings.
func (e *env) start() *Replica {
	e.t.Helper()
	if e.st == nil {
		st, err := store.Open(store.Options{Dir: e.dir, Log: testutil.Logger(e.t), GCInterval: -1})
		if err != nil {
			e.t.Fatal(err)
		}
		e.st = st
	}
	r, err := New(Options{JS: e.js, Store: e.st, Log: testutil.Logger(e.t), CacheSize: e.cacheSize})
	if err != nil {
		e.t.Fatal(err)
	}
	if !e.prodTimings {
		r.backoffMin, r.backoffMax = 20*time.Millisecond, 200*time.Millisecond
		r.checkInterval, r.stallTimeout = 50*time.Millisecond, 500*time.Millisecond
		r.countResyncGap = 0
	}
	if err := r.Start(context.Background()); err != nil {
		e.t.Fatal(err)
	}
	e.r = r
	return r
}

// stop closes the replica and the store.
func (e *env) stop() {
	if e.r != nil {
		e.r.Close()
		e.r = nil
	}
	if e.st != nil {
		e.st.Close()
		e.st = nil
	}
}

func (e *env) waitReady() {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.r.WaitReady(ctx); err != nil {
		e.t.Fatalf("not ready: %v", err)
	}
}

// waitCaughtUp waits until the replica is live and has applied the bucket's last revision.
func (e *env) waitCaughtUp() {
	e.t.Helper()
	waitFor(e.t, "caught up", func() bool {
		st, err := e.kv.Status(context.Background())
		if err != nil {
			return false
		}
		last := st.(*jetstream.KeyValueBucketStatus).StreamInfo().State.LastSeq
		s := e.r.Stats()
		return s.CaughtUp && s.Revision >= last
	})
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (e *env) put(id string, doc string) uint64 {
	e.t.Helper()
	var rev uint64
	e.retry(func(ctx context.Context) (err error) {
		rev, err = e.kv.Put(ctx, KeyFor(id), []byte(doc))
		return err
	})
	return rev
}

func (e *env) del(id string) {
	e.t.Helper()
	e.retry(func(ctx context.Context) error { return e.kv.Delete(ctx, KeyFor(id)) })
}

// retry retries a KV write for a while: right after a NATS restart, JetStream may still
// be recovering its streams.
func (e *env) retry(f func(ctx context.Context) error) {
	e.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err := f(ctx)
		cancel()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// putMany writes docs with asynchronous publishes, for large sets.
func (e *env) putMany(keys []string, vals [][]byte) {
	e.t.Helper()
	for i := range keys {
		if _, err := e.js.PublishAsync("$KV."+DefaultBucket+"."+keys[i], vals[i]); err != nil {
			e.t.Fatal(err)
		}
		if i%1000 == 999 {
			<-e.js.PublishAsyncComplete()
		}
	}
	select {
	case <-e.js.PublishAsyncComplete():
	case <-time.After(60 * time.Second):
		e.t.Fatal("publish did not complete")
	}
}

// doc returns a valid snapshot with an api_calls limit and optional API keys.
func doc(id string, limit int, apiKeys ...string) string {
	keys := ""
	for i, k := range apiKeys {
		if i > 0 {
			keys += ","
		}
		keys += fmt.Sprintf("%q", keyHash(k))
	}
	return fmt.Sprintf(`{"customer_id":%q,"updated_at":"2026-11-22T10:00:00Z",`+
		`"billing":{"period_start":"2026-11-05T00:00:00Z","period_end":"2026-12-05T00:00:00Z","interval":"MONTHLY","timezone":"UTC"},`+
		`"features":{"api_calls":{"type":"metered","usage_limit":%d,"usage_reset_period":"MONTHLY"},`+
		`"analytics":{"type":"boolean","is_enabled":true},"tier":{"type":"static","static_values":["gold"]}},`+
		`"api_keys_sha256":[%s]}`, id, limit, keys)
}

func keyHash(k string) string {
	s := sha256.Sum256([]byte(k))
	return hex.EncodeToString(s[:])
}

func keySum(k string) *[sha256.Size]byte {
	s := sha256.Sum256([]byte(k))
	return &s
}

// limitOf is the api_calls limit the replica serves for id, -1 when the customer is unknown.
func (e *env) limitOf(id string) int64 {
	s := e.r.Customer([]byte(id))
	if s == nil {
		return -1
	}
	return s.Feature("api_calls").Limit
}

func (e *env) badgerDir() string { return filepath.Join(e.dir, "badger") }

var _ limiter.Source = (*Replica)(nil)
