package flexprice

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"go.uber.org/zap"
)

// syncer keeps KV bucket gatehouse_entitlements in step with Flexprice: a full sync on
// start and every interval, a re-fetch of the customers a webhook names, and a re-fetch
// of a customer when one of its overrides or periods starts or ends.
type syncer struct {
	api      *client
	store    snapshotStore
	log      *zap.Logger
	m        *metrics
	clock    Clock
	only     map[string]bool // configured customers; nil: all customers
	list     []string        // the same, in configured order
	pageSize int
	attempts int           // tries per API read
	grace    time.Duration // re-fetch this long after a scheduled instant
	retry    time.Duration // re-fetch this long after a failed refresh

	work      chan struct{} // a customer was queued
	schedWake chan struct{} // the schedule changed
	fullWant  chan struct{} // a full sync is wanted soon (a webhook named an unknown entity)
	ready     atomic.Bool   // a full sync has completed

	mu     sync.Mutex // guards everything below
	jobs   map[string]*job
	queue  []string
	hashes map[string][sha256.Size]byte // content (sans updated_at) of what KV holds, per customer
	idx    index
	sched  schedule
}

func newSyncer(api *client, store snapshotStore, o *Options, m *metrics, log *zap.Logger) *syncer {
	s := &syncer{api: api, store: store, log: log, m: m, clock: o.Clock, pageSize: o.PageSize,
		attempts: o.MaxAttempts, grace: o.BoundaryDelay, retry: o.MaxBackoff,
		work: make(chan struct{}, 1), schedWake: make(chan struct{}, 1), fullWant: make(chan struct{}, 1),
		jobs: map[string]*job{}, hashes: map[string][sha256.Size]byte{}, idx: newIndex(),
		sched: schedule{at: map[string]time.Time{}}}
	if len(o.Customers) > 0 {
		s.only = map[string]bool{}
		for _, id := range o.Customers {
			if !s.only[id] {
				s.only[id] = true
				s.list = append(s.list, id)
			}
		}
	}
	return s
}

// managed reports whether the bridge keeps this customer in KV.
func (s *syncer) managed(id string) bool { return id != "" && (s.only == nil || s.only[id]) }

// refresh fetches one customer's entitlements and subscriptions and writes its snapshot
// if it changed; a customer Flexprice no longer knows is deleted from KV.
func (s *syncer) refresh(ctx context.Context, id string) error {
	if err := limiter.CheckCustomerID(id); err != nil {
		s.m.syncErrors.WithLabelValues("invalid_customer_id").Inc()
		return fmt.Errorf("customer %q: external id cannot key a snapshot: %w: %w", id, err, errPermanent)
	}
	ents, err := s.api.entitlements(ctx, id, s.attempts)
	var subs []subscription
	if err == nil {
		subs, err = s.api.subscriptions(ctx, id, s.attempts)
	}
	if isNotFound(err) {
		return s.gone(ctx, id)
	}
	if err != nil {
		s.m.syncErrors.WithLabelValues("fetch").Inc()
		return fmt.Errorf("customer %q: %w", id, err)
	}
	now := s.clock.Now()
	b := buildSnapshot(id, ents, subs, now)
	for _, p := range b.problems {
		s.m.syncErrors.WithLabelValues("invalid_data").Inc()
		s.log.Warn("left out of snapshot: Flexprice sent what a sidecar would reject", zap.String("customer", id), zap.Error(p))
	}
	if _, err := b.doc.Snapshot(); err != nil { // cannot happen: every feature was checked
		s.m.syncErrors.WithLabelValues("invalid_snapshot").Inc()
		return fmt.Errorf("customer %q: %w", id, err)
	}
	if err := s.write(ctx, b.doc, now); err != nil {
		s.m.syncErrors.WithLabelValues("kv").Inc()
		return err
	}
	s.m.customersSynced.Inc()
	s.mu.Lock()
	s.idx.update(id, b.refs)
	due := time.Time{}
	if !b.next.IsZero() {
		due = b.next.Add(s.grace)
	}
	s.setDue(id, due)
	s.mu.Unlock()
	return nil
}

// errPermanent marks a refresh failure that trying again will not cure.
var errPermanent = errors.New("permanent")

// retryLater schedules another refresh of a customer whose refresh failed, unless one
// is due sooner, so that a failed webhook or scheduled refresh does not wait for the
// next full sync.
func (s *syncer) retryLater(id string, err error) {
	if errors.Is(err, errPermanent) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	t := s.clock.Now().Add(s.retry)
	if due, ok := s.sched.at[id]; !ok || due.After(t) {
		s.setDue(id, t)
	}
}

// content is the snapshot's encoding without updated_at, which is what "changed" means.
func content(doc *limiter.SnapshotDoc) [sha256.Size]byte {
	d := *doc
	d.UpdatedAt = nil
	data, _ := json.Marshal(&d)
	return sha256.Sum256(data)
}

// write puts the snapshot in KV unless KV holds the same content already; updated_at is
// the time of the change.
func (s *syncer) write(ctx context.Context, doc *limiter.SnapshotDoc, now time.Time) error {
	h := content(doc)
	s.mu.Lock()
	old, known := s.hashes[doc.CustomerID]
	s.mu.Unlock()
	if known && old == h {
		return nil
	}
	if !known {
		cur, err := s.store.get(ctx, doc.CustomerID)
		if err != nil {
			return err
		}
		if cur != nil && content(cur) == h {
			s.remember(doc.CustomerID, h)
			return nil
		}
	}
	t := now.UTC()
	doc.UpdatedAt = &t
	if err := s.store.put(ctx, doc); err != nil {
		return err
	}
	s.m.kvWrites.WithLabelValues("put").Inc()
	s.remember(doc.CustomerID, h)
	if ce := s.log.Check(zap.DebugLevel, "snapshot written"); ce != nil {
		ce.Write(zap.String("customer", doc.CustomerID), zap.Int("features", len(doc.Features)))
	}
	return nil
}

func (s *syncer) remember(id string, h [sha256.Size]byte) {
	s.mu.Lock()
	s.hashes[id] = h
	s.m.customersKnown.Set(float64(len(s.hashes)))
	s.mu.Unlock()
}

// gone deletes a customer that Flexprice no longer has.
func (s *syncer) gone(ctx context.Context, id string) error {
	s.mu.Lock()
	_, known := s.hashes[id]
	s.mu.Unlock()
	if !known {
		cur, err := s.store.get(ctx, id)
		if err != nil {
			s.m.syncErrors.WithLabelValues("kv").Inc()
			return err
		}
		known = cur != nil
	}
	if known {
		if err := s.store.del(ctx, id); err != nil {
			s.m.syncErrors.WithLabelValues("kv").Inc()
			return err
		}
		s.m.kvWrites.WithLabelValues("delete").Inc()
		s.log.Info("customer gone from Flexprice; deleted from KV", zap.String("customer", id))
	}
	s.mu.Lock()
	delete(s.hashes, id)
	s.m.customersKnown.Set(float64(len(s.hashes)))
	s.idx.remove(id)
	s.setDue(id, time.Time{})
	s.mu.Unlock()
	return nil
}

// errPartial marks a full sync that reached every customer, some of which failed.
var errPartial = errors.New("partial sync")

// fullSync re-fetches every managed customer, and deletes from KV the customers that
// Flexprice no longer lists. A key that the listing missed is deleted only once its own
// re-fetch says 404, so that a customer skipped by paging while others were deleted is
// never lost.
func (s *syncer) fullSync(ctx context.Context) (synced int, err error) {
	var before []string
	if s.only == nil {
		if before, err = s.store.customers(ctx); err != nil {
			return 0, err
		}
	}
	ids := s.list
	if s.only == nil {
		if ids, err = s.listAll(ctx); err != nil {
			return 0, fmt.Errorf("list customers: %w", err)
		}
	}
	listed := make(map[string]bool, len(ids))
	var runs []*result
	for _, id := range ids {
		listed[id] = true
		runs = append(runs, s.request(id))
	}
	for _, id := range before {
		if !listed[id] {
			listed[id] = true
			runs = append(runs, s.request(id))
		}
	}
	var errs []error
	for _, r := range runs {
		select {
		case <-r.done:
		case <-ctx.Done():
			return synced, ctx.Err()
		}
		if r.err != nil {
			errs = append(errs, r.err)
		} else {
			synced++
		}
	}
	if len(errs) > 0 {
		return synced, fmt.Errorf("%w: %d of %d customers failed, first: %w", errPartial, len(errs), len(runs), errs[0])
	}
	return synced, nil
}

// listAll pages through every customer with an external id.
func (s *syncer) listAll(ctx context.Context) ([]string, error) {
	var ids []string
	for offset := 0; ; {
		page, err := s.api.listCustomers(ctx, s.pageSize, offset, s.attempts)
		if err != nil {
			return nil, err
		}
		s.mu.Lock()
		for _, c := range page.Items {
			if c.ExternalID == "" {
				continue
			}
			ids = append(ids, c.ExternalID)
			s.idx.internal[c.ID] = c.ExternalID
		}
		s.mu.Unlock()
		offset += len(page.Items)
		if len(page.Items) == 0 || (page.Pagination != nil && offset >= page.Pagination.Total) ||
			(page.Pagination == nil && len(page.Items) < s.pageSize) {
			return ids, nil
		}
	}
}

// loop runs a full sync now and every interval, and soon after a webhook asks for one.
func (s *syncer) loop(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		start := time.Now()
		n, err := s.fullSync(ctx)
		if ctx.Err() != nil {
			return
		}
		d := time.Since(start)
		if err != nil {
			s.m.fullSyncs.WithLabelValues("error").Inc()
			s.log.Error("full sync failed", zap.Int("customers", n), zap.Duration("took", d), zap.Error(err))
		} else {
			s.m.fullSyncs.WithLabelValues("ok").Inc()
			s.m.lastFullSync.SetToCurrentTime()
			s.log.Info("full sync done", zap.Int("customers", n), zap.Duration("took", d))
		}
		if err == nil || errors.Is(err, errPartial) {
			s.ready.Store(true)
		}
		select {
		case <-t.C:
		case <-s.fullWant:
		case <-ctx.Done():
			return
		}
	}
}
