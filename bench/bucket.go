package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/gatehouse-dev/gatehouse/sync/quota"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// bucketGrants reads, from the fleet's NATS at addr, what bucket gatehouse_quota holds for
// feature of each of customers: for a customer off its limit, whether the missing units
// are granted to a sidecar (which lost track of them) or still free in the bucket (and
// requests were refused while they were). One line per customer; missing when the bucket
// has no key for it.
func bucketGrants(ctx context.Context, addr, feature string, customers []string) (map[string]string, error) {
	nc, err := nats.Connect("nats://"+addr, nats.Name("gatehouse-bench"), nats.Timeout(3*time.Second))
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	kv, err := js.KeyValue(ctx, quota.DefaultBucket)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", quota.DefaultBucket, err)
	}
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("list bucket %s: %w", quota.DefaultBucket, err)
	}
	defer keys.Stop()
	want := map[string]bool{}
	for _, c := range customers {
		want[c] = true
	}
	out := map[string]string{}
	for key := range keys.Keys() {
		k, err := quota.ParseKey(key)
		if err != nil || !want[k.Customer] || k.Feature != feature {
			continue
		}
		e, err := kv.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("get %s: %w", key, err)
		}
		var v quota.Value
		if err := json.Unmarshal(e.Value(), &v); err != nil {
			return nil, fmt.Errorf("decode %s: %w", key, err)
		}
		ids := make([]string, 0, len(v.Sidecars))
		for id := range v.Sidecars {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		grants := make([]string, 0, len(ids))
		for _, id := range ids {
			grants = append(grants, fmt.Sprintf("%s=%d", id, v.Sidecars[id]))
		}
		out[k.Customer] = fmt.Sprintf("granted %d of %d [%s]", v.Granted, v.Limit, strings.Join(grants, " "))
	}
	return out, nil
}
