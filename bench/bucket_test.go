package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/quota"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestBucketGrants: the fleet report reads what the quota bucket holds for the
// customers off their limit, and only for them and the feature asked.
func TestBucketGrants(t *testing.T) {
	n := testutil.StartNATS(t)
	nc, err := nats.Connect(n.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: quota.DefaultBucket})
	if err != nil {
		t.Fatal(err)
	}
	put := func(customer, feature string, limit int64, grants map[string]int64) {
		k := limiter.CounterKey{Customer: customer, Feature: feature}
		v := quota.Value{CustomerID: customer, Feature: feature, Limit: limit, Sidecars: grants}
		for _, g := range grants {
			v.Granted += g
		}
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Put(ctx, quota.Key(k), b); err != nil {
			t.Fatal(err)
		}
	}
	put("limited-0001", "reports", 101, map[string]int64{"sc-0000000b": 60, "sc-0000000a": 41})
	put("limited-0001", "api_calls", 9, map[string]int64{"sc-0000000a": 9})
	put("limited-0002", "reports", 5, map[string]int64{"sc-0000000a": 5})

	addr := strings.TrimPrefix(n.URL(), "nats://")
	got, err := bucketGrants(ctx, addr, "reports", []string{"limited-0001", "limited-0003"})
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"limited-0001": "granted 101 of 101 [sc-0000000a=41 sc-0000000b=60]"}
	if len(got) != len(want) || got["limited-0001"] != want["limited-0001"] {
		t.Errorf("got %q, want %q", got, want)
	}
}
