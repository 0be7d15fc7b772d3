package replica

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// Defaults of Options.
const (
	DefaultBucket    = "gatehouse_entitlements"
	DefaultCacheSize = 100_000
)

// ErrNoUpstream is returned by Resync when the replica has no NATS connection.
var ErrNoUpstream = errors.New("replica: no NATS connection")

// ErrClosed is returned by Resync and WaitReady once the replica is closed.
var ErrClosed = errors.New("replica: closed")

// Options configure New. The zero value of each field means its documented default.
type Options struct {
	// JS is the JetStream context to watch the bucket with; nil serves the Badger
	// replica alone.
	JS jetstream.JetStream
	// Store is the process's database; required.
	Store *store.Store
	// Log receives the replica's messages; nil discards them.
	Log *zap.Logger
	// Bucket is the KV bucket; default "gatehouse_entitlements".
	Bucket string
	// CacheSize is how many decoded customers stay in memory; default 100,000. Unknown
	// customers and API keys are remembered in LRUs a tenth of that size (at least 1,000).
	CacheSize int
	// OnChange, if set, is called from the watch goroutine after a snapshot is applied:
	// new is nil when the customer was revoked, old is nil when it was not known. It
	// must not block for long.
	OnChange func(old, new *limiter.Snapshot)
}

// Replica is the sidecar's copy of the entitlements: a Badger replica of the KV bucket
// kept in step by a watch, with the customers read recently decoded in memory.
type Replica struct {
	js       jetstream.JetStream
	db       *badger.DB
	log      *zap.Logger
	bucket   string
	onChange func(old, new *limiter.Snapshot)
	tab      *table

	// pos is the replica position. The watch goroutine owns it after Start; others read
	// the atomics below.
	pos position

	revision    atomic.Uint64
	customers   atomic.Int64
	lastContact atomic.Int64 // unix nanoseconds; 0: never
	live        atomic.Bool  // the current watch has caught up with the bucket
	applied     atomic.Uint64
	rejected    atomic.Uint64
	deleted     atomic.Uint64
	resyncs     atomic.Uint64
	watches     atomic.Uint64
	loads       atomic.Uint64 // Badger reads on cache misses

	ready     atomic.Bool
	readyCh   chan struct{}
	readyOnce sync.Once

	resyncReq chan chan error
	rej       rejectLog

	started   atomic.Bool
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup // the watch goroutine
	closeOnce sync.Once

	// Tunables; tests shorten them.
	backoffMin, backoffMax time.Duration // pause between watch attempts
	checkInterval          time.Duration // how often the bucket's state is compared with ours
	stallTimeout           time.Duration // a watch that delivers nothing while behind this long is recreated
	countResyncGap         time.Duration // at most one resync for a subject-count mismatch this often
	opTimeout              time.Duration // JetStream requests
	maxBatch               int           // KV entries per Badger transaction
}

var _ limiter.Source = (*Replica)(nil)

// New returns a replica over opts.Store. Call Start to load it and begin watching.
func New(opts Options) (*Replica, error) {
	if opts.Store == nil {
		return nil, errors.New("replica: no store")
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	if opts.Bucket == "" {
		opts.Bucket = DefaultBucket
	}
	if opts.CacheSize <= 0 {
		opts.CacheSize = DefaultCacheSize
	}
	negSize := max(opts.CacheSize/10, 1000)
	r := &Replica{
		js: opts.JS, db: opts.Store.DB(), log: opts.Log.Named("replica"), bucket: opts.Bucket,
		onChange: opts.OnChange, tab: newTable(opts.CacheSize, negSize),
		readyCh: make(chan struct{}), resyncReq: make(chan chan error),
		backoffMin: 250 * time.Millisecond, backoffMax: 10 * time.Second,
		checkInterval: 5 * time.Second, stallTimeout: 20 * time.Second,
		countResyncGap: 10 * time.Minute, opTimeout: 10 * time.Second, maxBatch: 1024,
	}
	r.rej.log = r.log
	return r, nil
}

// Start loads the replica position from Badger and starts the watch goroutine, which
// runs until Close or until ctx ends. It returns at once, without waiting to catch up.
// A replica that caught up with the same bucket in an earlier run is ready at once.
func (r *Replica) Start(ctx context.Context) error {
	if !r.started.CompareAndSwap(false, true) {
		return errors.New("replica: already started")
	}
	pos, err := loadPosition(r.db)
	if err != nil {
		return fmt.Errorf("replica: %w", err)
	}
	r.pos = pos
	r.publish()
	if pos.CaughtUp && pos.Bucket == r.bucket {
		r.setReady()
		r.log.Info("serving the replica from an earlier run", zap.Uint64("revision", pos.Revision),
			zap.Uint64("customers", pos.Customers), zap.Time("last_contact", pos.LastContact))
	}
	r.ctx, r.cancel = context.WithCancel(ctx)
	if r.js == nil {
		r.log.Warn("no NATS connection: serving the Badger replica only")
		return nil
	}
	r.wg.Add(1)
	go r.run()
	return nil
}

// Close stops the watch, deletes its consumer and waits for the goroutine. It does not
// close the store. It is safe to call twice.
func (r *Replica) Close() error {
	r.closeOnce.Do(func() {
		if r.cancel != nil {
			r.cancel()
		}
		r.wg.Wait()
	})
	return nil
}

// Customer implements limiter.Source. A hit allocates nothing; a miss reads Badger.
func (r *Replica) Customer(id []byte) *limiter.Snapshot {
	if s, hit := r.tab.get(id); hit {
		return s
	}
	if len(id) == 0 || len(id) > limiter.MaxIDLen {
		return nil
	}
	s, _ := r.load(string(id))
	return s
}

// CustomerByKey implements limiter.Source. A hit allocates nothing; a miss reads Badger.
func (r *Replica) CustomerByKey(sum *[sha256.Size]byte) *limiter.Snapshot {
	if s, hit := r.tab.getKey(sum); hit {
		return s
	}
	for range 3 {
		gen := r.tab.keyGen(sum)
		var id []byte
		err := r.db.View(func(txn *badger.Txn) error {
			item, err := txn.Get(apiKeyKey(sum))
			if err != nil {
				return err
			}
			id, err = item.ValueCopy(nil)
			return err
		})
		r.loads.Add(1)
		if errors.Is(err, badger.ErrKeyNotFound) {
			r.tab.fillKey(sum, gen, nil)
			return nil
		}
		if err != nil {
			r.log.Warn("read api key index", zap.Error(err))
			return nil
		}
		s, e := r.load(string(id))
		if s == nil || !hasKey(s, sum) {
			continue // changed under us
		}
		r.tab.fillKey(sum, gen, e)
		return s
	}
	return nil
}

// load reads a customer from Badger and caches it. e is the table's entry, nil when
// the read raced with changes three times and was not cached.
func (r *Replica) load(id string) (s *limiter.Snapshot, e *entry) {
	for range 3 {
		gen := r.tab.gen(id)
		var err error
		if s, err = r.read(id); err != nil {
			r.log.Warn("read snapshot", zap.String("customer_id", id), zap.Error(err))
			return nil, nil
		}
		var ok bool
		if e, ok = r.tab.fill(id, gen, s); ok {
			return e.snap.Load(), e
		}
	}
	return s, nil
}

// read decodes a customer's snapshot from Badger; nil when it is not there.
func (r *Replica) read(id string) (*limiter.Snapshot, error) {
	r.loads.Add(1)
	var val []byte
	err := r.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get(entKey(id))
		if err != nil {
			return err
		}
		val, err = item.ValueCopy(nil)
		return err
	})
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	rev, raw, err := decodeEnt(val)
	if err != nil {
		return nil, err
	}
	s, err := limiter.ParseSnapshot(raw)
	if err != nil {
		// Valid when it was stored, refused by this version: treat the customer as
		// unknown (and cache that) until the control plane sends a new snapshot.
		r.log.Warn("stored snapshot is no longer valid; customer treated as unknown",
			zap.String("customer_id", id), zap.Error(err))
		return nil, nil
	}
	s.Revision = rev
	return s, nil
}

// Ready implements limiter.Source: true once the replica has caught up with the bucket,
// in this run or an earlier one.
func (r *Replica) Ready() bool { return r.ready.Load() }

// WaitReady waits until Ready, ctx ends or the replica closes.
func (r *Replica) WaitReady(ctx context.Context) error {
	var done <-chan struct{}
	if r.ctx != nil {
		done = r.ctx.Done()
	}
	select {
	case <-r.readyCh:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-done:
		return ErrClosed
	}
}

func (r *Replica) setReady() {
	r.readyOnce.Do(func() {
		r.ready.Store(true)
		close(r.readyCh)
	})
}

// Resync asks for a full resync (every key read again, local customers absent upstream
// removed) and waits until it is done or ctx ends. Customers stay served meanwhile.
func (r *Replica) Resync(ctx context.Context) error {
	if r.js == nil {
		return ErrNoUpstream
	}
	if !r.started.Load() {
		return errors.New("replica: not started")
	}
	done := make(chan error, 1)
	select {
	case r.resyncReq <- done:
	case <-ctx.Done():
		return ctx.Err()
	case <-r.ctx.Done():
		return ErrClosed
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-r.ctx.Done():
		return ErrClosed
	}
}

// Stats describes the replica, for metrics and the admin API.
type Stats struct {
	Revision    uint64        // KV revision applied up to
	Applied     uint64        // KV entries applied by this process (puts and deletes)
	Rejected    uint64        // values rejected by this process
	Deleted     uint64        // customers revoked by this process
	Resyncs     uint64        // full resyncs of an existing replica (bucket recreated, keys lost, on demand)
	Watches     uint64        // watches started (1 plus restarts after errors)
	CaughtUp    bool          // connected and caught up with the bucket now
	Ready       bool          // caught up at least once, in this run or an earlier one
	LastContact time.Time     // when the replica was last known to be current; zero: never
	Staleness   time.Duration // time since LastContact; 0 while caught up
	CacheLen    int           // customers decoded in memory
	Customers   int           // customers in the replica
	Loads       uint64        // Badger reads made by cache misses
}

// Stats returns the replica's counters.
func (r *Replica) Stats() Stats {
	now := time.Now()
	st := Stats{
		Revision: r.revision.Load(), Applied: r.applied.Load(), Rejected: r.rejected.Load(),
		Deleted: r.deleted.Load(), Resyncs: r.resyncs.Load(), Watches: r.watches.Load(),
		Ready: r.ready.Load(), CacheLen: r.tab.len(), Customers: int(r.customers.Load()),
		Loads: r.loads.Load(),
	}
	st.CaughtUp = r.live.Load() && r.js != nil && r.js.Conn().IsConnected()
	if st.CaughtUp {
		r.lastContact.Store(now.UnixNano())
	}
	if lc := r.lastContact.Load(); lc != 0 {
		st.LastContact = time.Unix(0, lc)
		st.Staleness = max(now.Sub(st.LastContact), 0)
	}
	return st
}

// publish copies the position into the atomics that Stats reads.
func (r *Replica) publish() {
	r.revision.Store(r.pos.Revision)
	r.customers.Store(int64(r.pos.Customers))
	if !r.pos.LastContact.IsZero() {
		r.lastContact.Store(r.pos.LastContact.UnixNano())
	}
}
