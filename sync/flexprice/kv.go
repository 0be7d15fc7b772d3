package flexprice

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/replica"
	"github.com/nats-io/nats.go/jetstream"
)

// snapshotStore is where the bridge keeps snapshots: KV bucket gatehouse_entitlements.
// Each call is one KV round trip (customers: one key listing).
type snapshotStore interface {
	// get returns a customer's stored snapshot, or nil when there is none.
	get(ctx context.Context, customerID string) (*limiter.SnapshotDoc, error)
	put(ctx context.Context, doc *limiter.SnapshotDoc) error
	del(ctx context.Context, customerID string) error
	// customers lists the customer ids that have a key.
	customers(ctx context.Context) ([]string, error)
}

// kvStore is a snapshotStore on the KV bucket, through package replica, which owns the
// bucket's configuration and the key encoding.
type kvStore struct {
	kv jetstream.KeyValue
}

var _ snapshotStore = (*kvStore)(nil)

func openStore(ctx context.Context, js jetstream.JetStream) (snapshotStore, error) {
	kv, err := replica.EnsureBucket(ctx, js)
	if err != nil {
		return nil, fmt.Errorf("open kv bucket: %w", err)
	}
	return &kvStore{kv: kv}, nil
}

func (s *kvStore) get(ctx context.Context, id string) (*limiter.SnapshotDoc, error) {
	e, err := s.kv.Get(ctx, replica.KeyFor(id))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("kv get %q: %w", id, err)
	}
	var d limiter.SnapshotDoc
	if err := json.Unmarshal(e.Value(), &d); err != nil {
		return nil, nil // unreadable: overwrite it
	}
	return &d, nil
}

func (s *kvStore) put(ctx context.Context, doc *limiter.SnapshotDoc) error {
	data, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	raw := []limiter.RawDoc{{Pos: 1, Where: "customer " + doc.CustomerID, Raw: data}}
	if _, err := replica.Push(ctx, s.kv, raw, nil); err != nil {
		return fmt.Errorf("kv put %q: %w", doc.CustomerID, err)
	}
	return nil
}

func (s *kvStore) del(ctx context.Context, id string) error {
	if err := replica.Delete(ctx, s.kv, id); err != nil && !errors.Is(err, replica.ErrCustomerNotFound) {
		return fmt.Errorf("kv delete %q: %w", id, err)
	}
	return nil
}

func (s *kvStore) customers(ctx context.Context) ([]string, error) {
	lister, err := s.kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("kv list keys: %w", err)
	}
	defer lister.Stop()
	seen := map[string]bool{}
	var ids []string
	for k := range lister.Keys() {
		if id, err := replica.CustomerIDFromKey(k); err == nil && !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	return ids, ctx.Err()
}
