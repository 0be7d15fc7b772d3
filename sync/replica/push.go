package replica

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// ErrCustomerNotFound is returned by Delete for a customer the bucket does not hold.
var ErrCustomerNotFound = errors.New("customer not found")

// EnsureBucket opens the entitlements bucket (DefaultBucket), creating it when it does not
// exist. An existing bucket is used as it is, whatever its configuration.
//
// A new bucket keeps one value per key (history 1) on file storage, with no TTL: resume
// needs only each key's latest message, and it needs delete markers to stay, so the
// bucket must not expire keys and PurgeDeletes should not be run on it (if it is, the
// replicas notice and resync in full; see package doc).
func EnsureBucket(ctx context.Context, js jetstream.JetStream) (jetstream.KeyValue, error) {
	return ensureBucket(ctx, js, DefaultBucket)
}

func ensureBucket(ctx context.Context, js jetstream.JetStream, bucket string) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, bucket)
	if err == nil {
		return kv, nil
	}
	if !errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, fmt.Errorf("open bucket %s: %w", bucket, err)
	}
	kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:       bucket,
		Description:  "gatehouse entitlement snapshots, one key per customer",
		History:      1,
		Storage:      jetstream.FileStorage,
		MaxValueSize: limiter.MaxSnapshotBytes,
	})
	if errors.Is(err, jetstream.ErrBucketExists) {
		kv, err = js.KeyValue(ctx, bucket) // created meanwhile by someone else
	}
	if err != nil {
		return nil, fmt.Errorf("create bucket %s: %w", bucket, err)
	}
	return kv, nil
}

// PushResult says what Push did.
type PushResult struct {
	Written   int    // snapshots written (new or changed)
	Unchanged int    // snapshots equal to the bucket's current value, not written
	Revision  uint64 // revision of the last write; 0 when nothing was written
}

// Push validates every document first and writes nothing unless all are good; the error
// then lists each bad one by position ("snapshot 3 (line 7): ..."). It then writes each
// snapshot whose meaning differs from the bucket's current value (compared decoded, as
// canonical JSON), so that pushing the same file twice changes nothing. The JSON written
// is the document as given, compacted: fields this version does not know survive for
// newer sidecars.
func Push(ctx context.Context, kv jetstream.KeyValue, docs []limiter.RawDoc, log *zap.Logger) (PushResult, error) {
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("push")
	type good struct {
		raw  []byte
		snap *limiter.Snapshot
	}
	var (
		goods []good
		errs  limiter.FileErrors
		seen  = map[string]string{}
	)
	for _, d := range docs {
		if d.Err != nil {
			errs = append(errs, d.Err)
			continue
		}
		where := d.Where
		if where == "" {
			where = fmt.Sprintf("snapshot %d", d.Pos)
		}
		s, err := limiter.ParseSnapshot(d.Raw)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", where, err))
			continue
		}
		if prev, dup := seen[s.CustomerID]; dup {
			errs = append(errs, fmt.Errorf("%s: customer %q already defined by %s", where, s.CustomerID, prev))
			continue
		}
		seen[s.CustomerID] = where
		var buf bytes.Buffer
		if err := json.Compact(&buf, d.Raw); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", where, err))
			continue
		}
		goods = append(goods, good{raw: buf.Bytes(), snap: s})
	}
	if len(errs) > 0 {
		return PushResult{}, errs
	}
	var res PushResult
	for _, g := range goods {
		rev, wrote, err := putIfChanged(ctx, kv, g.snap, g.raw)
		if err != nil {
			return res, err
		}
		if wrote {
			res.Written++
			res.Revision = rev
			log.Debug("snapshot written", zap.String("customer_id", g.snap.CustomerID), zap.Uint64("revision", rev))
		} else {
			res.Unchanged++
		}
	}
	log.Info("pushed", zap.String("bucket", kv.Bucket()), zap.Int("written", res.Written), zap.Int("unchanged", res.Unchanged))
	return res, nil
}

// PushSnapshots writes snapshots built in Go (by a bridge, say), encoded with
// Snapshot.Doc, with the same change detection as Push.
func PushSnapshots(ctx context.Context, kv jetstream.KeyValue, snaps []*limiter.Snapshot, log *zap.Logger) (PushResult, error) {
	docs := make([]limiter.RawDoc, len(snaps))
	for i, s := range snaps {
		raw, err := json.Marshal(s.Doc())
		docs[i] = limiter.RawDoc{Pos: i + 1, Where: fmt.Sprintf("snapshot %d (%s)", i+1, s.CustomerID), Raw: raw, Err: err}
	}
	return Push(ctx, kv, docs, log)
}

// putIfChanged writes raw under the customer's key unless the current value means the
// same. A current value that does not decode is overwritten.
func putIfChanged(ctx context.Context, kv jetstream.KeyValue, s *limiter.Snapshot, raw []byte) (uint64, bool, error) {
	key := KeyFor(s.CustomerID)
	cur, err := kv.Get(ctx, key)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
	case err != nil:
		return 0, false, fmt.Errorf("read %s: %w", key, err)
	default:
		if old, err := limiter.ParseSnapshot(cur.Value()); err == nil {
			a, errA := canonical(old)
			b, errB := canonical(s)
			if errA == nil && errB == nil && bytes.Equal(a, b) {
				return 0, false, nil
			}
		}
	}
	rev, err := kv.Put(ctx, key, raw)
	if err != nil {
		return 0, false, fmt.Errorf("write %s (customer %q): %w", key, s.CustomerID, err)
	}
	return rev, true, nil
}

// canonical is the snapshot's meaning as bytes: its Doc form, with instants in UTC, as
// JSON (map keys sorted by encoding/json).
func canonical(s *limiter.Snapshot) ([]byte, error) {
	d := s.Doc()
	if d.UpdatedAt != nil {
		t := d.UpdatedAt.UTC()
		d.UpdatedAt = &t
	}
	if b := d.Billing; b != nil {
		b.PeriodStart = b.PeriodStart.UTC()
		if b.PeriodEnd != nil {
			t := b.PeriodEnd.UTC()
			b.PeriodEnd = &t
		}
	}
	return json.Marshal(d)
}

// Delete revokes a customer: it places a delete marker on the customer's key, which every
// replica applies. It returns ErrCustomerNotFound when the bucket holds no value for it.
func Delete(ctx context.Context, kv jetstream.KeyValue, customerID string) error {
	if err := limiter.CheckCustomerID(customerID); err != nil {
		return fmt.Errorf("customer id %q: %w", customerID, err)
	}
	key := KeyFor(customerID)
	if _, err := kv.Get(ctx, key); err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return fmt.Errorf("delete %q: %w", customerID, ErrCustomerNotFound)
		}
		return fmt.Errorf("delete %q: %w", customerID, err)
	}
	if err := kv.Delete(ctx, key); err != nil {
		return fmt.Errorf("delete %q: %w", customerID, err)
	}
	return nil
}
