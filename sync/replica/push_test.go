package replica

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/nats-io/nats.go/jetstream"
)

func docs(t *testing.T, ndjson string) []limiter.RawDoc {
	t.Helper()
	d, err := limiter.ReadSnapshotDocs(strings.NewReader(ndjson))
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestPushWritesOnlyChanged(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	file := doc("a", 1) + "\n" + doc("b", 2) + "\n\n" + doc("c", 3) + "\n"
	res, err := Push(ctx, e.kv, docs(t, file), nil)
	if err != nil || res.Written != 3 || res.Unchanged != 0 {
		t.Fatalf("first push: %+v, %v", res, err)
	}
	rev := res.Revision

	// The same meaning in another spelling (spacing, key order, another offset for the
	// same instant) is unchanged; b's limit changed.
	a2 := `{ "features": {"tier":{"type":"static","static_values":["gold"]},"analytics":{"type":"boolean","is_enabled":true},` +
		`"api_calls":{"usage_reset_period":"MONTHLY","usage_limit":1,"type":"metered"}},"customer_id":"a",` +
		`"updated_at":"2026-11-22T11:00:00+01:00",` +
		`"billing":{"period_start":"2026-11-05T00:00:00Z","period_end":"2026-12-05T00:00:00Z","interval":"MONTHLY","timezone":"UTC"}}`
	file = a2 + "\n" + doc("b", 20) + "\n" + doc("c", 3) + "\n"
	res, err = Push(ctx, e.kv, docs(t, file), nil)
	if err != nil || res.Written != 1 || res.Unchanged != 2 {
		t.Fatalf("second push: %+v, %v", res, err)
	}
	if st, _ := e.kv.Status(ctx); st.(*jetstream.KeyValueBucketStatus).StreamInfo().State.LastSeq != rev+1 {
		t.Error("more than one write for one changed snapshot")
	}
	entry, err := e.kv.Get(ctx, KeyFor("b"))
	if err != nil || !strings.Contains(string(entry.Value()), `"usage_limit":20`) {
		t.Errorf("b in the bucket: %s, %v", entry.Value(), err)
	}

	// A value that does not decode is overwritten.
	if _, err := e.kv.Put(ctx, KeyFor("c"), []byte("garbage")); err != nil {
		t.Fatal(err)
	}
	if res, err = Push(ctx, e.kv, docs(t, doc("c", 3)), nil); err != nil || res.Written != 1 {
		t.Errorf("push over garbage: %+v, %v", res, err)
	}

	// Snapshots built in Go.
	s, err := limiter.ParseSnapshot([]byte(doc("b", 20)))
	if err != nil {
		t.Fatal(err)
	}
	if res, err = PushSnapshots(ctx, e.kv, []*limiter.Snapshot{s}, nil); err != nil || res.Unchanged != 1 {
		t.Errorf("PushSnapshots of an unchanged snapshot: %+v, %v", res, err)
	}
}

func TestPushRejectsBadFilesWhole(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	file := doc("a", 1) + "\n" + `{"customer_id":"b","features":{"x":{"type":"nope"}}}` + "\n\n" +
		doc("a", 2) + "\n" + `{broken` + "\n"
	_, err := Push(ctx, e.kv, docs(t, file), nil)
	if err == nil {
		t.Fatal("a bad file was pushed")
	}
	for _, want := range []string{
		"snapshot 2 (line 2): invalid snapshot for \"b\": features.x.type",
		"snapshot 3 (line 4): customer \"a\" already defined by snapshot 1 (line 1)",
		"snapshot 4 (line 5): decode snapshot",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	if _, err := e.kv.Get(ctx, KeyFor("a")); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("a good snapshot of a bad file was written: %v", err)
	}
}

func TestDelete(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	r := e.start()
	if _, err := Push(ctx, e.kv, docs(t, doc("a", 1)), nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a", func() bool { return e.limitOf("a") == 1 })
	if err := Delete(ctx, e.kv, "a"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "revoked", func() bool { return r.Customer([]byte("a")) == nil })
	if err := Delete(ctx, e.kv, "a"); !errors.Is(err, ErrCustomerNotFound) {
		t.Errorf("second delete: %v", err)
	}
	if err := Delete(ctx, e.kv, "bad id"); err == nil {
		t.Error("delete of an invalid id succeeded")
	}
}

func TestEnsureBucketKeepsExisting(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()
	e.put("a", doc("a", 1))
	kv, err := EnsureBucket(ctx, e.js)
	if err != nil {
		t.Fatal(err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.History() != 1 || st.TTL() != 0 || st.Values() != 1 {
		t.Errorf("bucket: history %d, ttl %v, values %d", st.History(), st.TTL(), st.Values())
	}
}

func TestKeyEncoding(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ id, key string }{
		{"cust_acme", "c.cust_acme"},
		{"org/team=1.2-x", "c.org/team=1.2-x"},
		{"a..b", "b." + b64.EncodeToString([]byte("a..b"))},
		{".lead", "b." + b64.EncodeToString([]byte(".lead"))},
		{"trail.", "b." + b64.EncodeToString([]byte("trail."))},
		{"user@example.com", "b." + b64.EncodeToString([]byte("user@example.com"))},
		{`*>"'{}`, "b." + b64.EncodeToString([]byte(`*>"'{}`))},
	} {
		if got := KeyFor(tc.id); got != tc.key {
			t.Errorf("KeyFor(%q) = %q, want %q", tc.id, got, tc.key)
		}
		if id, err := CustomerIDFromKey(tc.key); err != nil || id != tc.id {
			t.Errorf("CustomerIDFromKey(%q) = %q, %v", tc.key, id, err)
		}
	}
	for _, key := range []string{
		"", "c.", "b.", "cust_acme", "x.cust", "c.a..b", "c..a",
		"b." + b64.EncodeToString([]byte("plain")), // not canonical: plain has a c. key
		"b.!!!", "b." + b64.EncodeToString([]byte("has space")),
		"c." + strings.Repeat("x", limiter.MaxIDLen+1),
	} {
		if id, err := CustomerIDFromKey(key); err == nil {
			t.Errorf("CustomerIDFromKey(%q) = %q, want an error", key, id)
		}
	}
}

func FuzzKeyEncoding(f *testing.F) {
	for _, s := range []string{"cust_acme", "a..b", "user@example.com", "c.x", "b.YQ", "~"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		// Any id that may name a customer round-trips through a valid KV key.
		if limiter.CheckCustomerID(s) == nil {
			key := KeyFor(s)
			if !kvKeyValid(key) {
				t.Fatalf("KeyFor(%q) = %q: not a valid KV key", s, key)
			}
			if id, err := CustomerIDFromKey(key); err != nil || id != s {
				t.Fatalf("round trip of %q through %q: %q, %v", s, key, id, err)
			}
		}
		// Any key that decodes is the canonical key of its id.
		if id, err := CustomerIDFromKey(s); err == nil && KeyFor(id) != s {
			t.Fatalf("%q decodes to %q whose key is %q", s, id, KeyFor(id))
		}
	})
}

// kvKeyValid is nats.go's rule for KV keys, plus no empty subject token.
func kvKeyValid(key string) bool {
	if key == "" || key[0] == '.' || key[len(key)-1] == '.' || strings.Contains(key, "..") {
		return false
	}
	for _, c := range []byte(key) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-/_=.", c) >= 0) {
			return false
		}
	}
	return true
}
