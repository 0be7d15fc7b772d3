package usage

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
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
	DefaultFlushInterval  = time.Second
	DefaultCommitInterval = 0
	DefaultStreamReplicas = 1
	DefaultMaxOutboxBytes = 256 << 20
)

// counterRetention is how long after its window's end a durable counter is kept: Restore
// deletes older ones. A commit that arrives later still reaches the outbox.
const counterRetention = 24 * time.Hour

// Errors of Record and Flush.
var (
	ErrClosed     = errors.New("usage: recorder closed")
	ErrNotStarted = errors.New("usage: recorder not started")
)

// Options configure New. The zero value of each field means its documented default.
type Options struct {
	// Store is the process's database; the recorder keeps to keys under u/. Required.
	Store *store.Store
	// JS publishes usage and reads the stream. Required.
	JS jetstream.JetStream
	// Log receives the recorder's messages, under the name "usage"; nil discards them.
	Log *zap.Logger
	// FlushInterval is how often committed usage is published as one message; default 1s.
	FlushInterval time.Duration
	// CommitInterval is how long the first Record of a batch waits for company when
	// the writer is idle; default 0: the commit starts at once, and the Records that
	// arrive while it is in flight form the next batch, so batches grow with the load.
	// A commit always starts as soon as the previous one is done.
	CommitInterval time.Duration
	// StreamReplicas is the replication of the stream when the recorder creates it;
	// default 1. An existing stream is used as it is.
	StreamReplicas int
	// MaxOutboxBytes bounds the outbox during an outage; default 256 MiB. At the bound
	// the outbox is folded into one entry per (customer, feature, window); admission and
	// counting go on and no usage is dropped (see Stats.AtBound).
	MaxOutboxBytes int64
	// Now is the clock for message times and window expiry; default time.Now.
	Now func() time.Time
}

// Recorder makes usage durable and publishes it. Create it with New, Restore the
// limiter's counters, Start it, and Close it before closing the store.
type Recorder struct {
	opts      Options
	db        *badger.DB
	js        jetstream.JetStream
	log       *zap.Logger
	sidecarID string
	epoch     string
	subject   string

	// Tuning, set by New; tests shorten them.
	maxBatchUsages  int           // usage records in one group commit, at most
	minBackoff      time.Duration // first wait after a failed publish
	maxBackoff      time.Duration // longest wait between publish attempts
	conflictBackoff time.Duration // wait after a conflict on the subject
	requestTimeout  time.Duration // one JetStream request
	// Housekeeping steps are one small transaction each, so that no group commit waits
	// long behind the publisher in Badger's write queue.
	settleChunk int           // deltas settled into the counters per transaction
	sweepChunk  int           // entries counted elsewhere deleted per transaction; 0: none (tests)
	housePace   time.Duration // pause between housekeeping steps
	hooks       hooks

	mu    sync.Mutex        // protects queue, free and state
	queue []*batch          // batches waiting for the writer, oldest first; only the last takes appends
	free  [][]limiter.Usage // buffers of written batches, for reuse
	state int               // stateNew, stateRunning, stateClosed
	wake  chan struct{}     // capacity 1: the queue or the state changed

	w writer // owned by the writer goroutine

	sums  map[limiter.CounterKey]*counter // durable counters at New, for Restore
	stale [][]byte                        // settled counters of long-ended windows, deleted by Restore
	p     publisher                       // owned by the publisher goroutine

	lastBatch atomic.Uint64 // highest committed batch sequence
	flushCh   chan *flushWaiter
	kick      chan struct{} // capacity 1: the publisher should look at the outbox now
	crashed   atomic.Bool   // a test hook stopped the publisher as a crash would

	writerDone chan struct{}
	pubDone    chan struct{}
	pubCancel  context.CancelFunc
	closeOnce  sync.Once
	closeErr   error

	st stats
}

const (
	stateNew = iota
	stateRunning
	stateClosed
)

// hooks let tests inject failures; nil hooks do nothing.
type hooks struct {
	// beforePublish returning true stops the publisher as a crash would, after the
	// pending message was written and before it is published.
	beforePublish func() bool
	// afterPublish may replace the result of a publish (e.g. lose the acknowledgement).
	afterPublish func(*jetstream.PubAck, error) (*jetstream.PubAck, error)
	// beforeAck returning true stops the publisher as a crash would, after the server
	// stored the message and before the acknowledgement is recorded.
	beforeAck func() bool
	// afterSettle returning true stops the publisher as a crash would, after a settle
	// step committed.
	afterSettle func() bool
}

// New opens the recorder's state in the store: outbox, pending message and sequence.
func New(opts Options) (*Recorder, error) {
	if opts.Store == nil {
		return nil, errors.New("usage: no store")
	}
	return newRecorder(opts.Store.DB(), opts.Store.SidecarID(), opts.Store.Epoch(), opts)
}

func newRecorder(db *badger.DB, sidecarID, epoch string, opts Options) (*Recorder, error) {
	if opts.JS == nil {
		return nil, errors.New("usage: no JetStream")
	}
	if sidecarID == "" || strings.ContainsAny(sidecarID, ".*> :") {
		return nil, fmt.Errorf("usage: sidecar id %q cannot name a subject token", sidecarID)
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	if opts.FlushInterval <= 0 {
		opts.FlushInterval = DefaultFlushInterval
	}
	if opts.CommitInterval < 0 {
		opts.CommitInterval = DefaultCommitInterval
	}
	if opts.StreamReplicas <= 0 {
		opts.StreamReplicas = DefaultStreamReplicas
	}
	if opts.MaxOutboxBytes <= 0 {
		opts.MaxOutboxBytes = DefaultMaxOutboxBytes
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	r := &Recorder{
		opts: opts, db: db, js: opts.JS, log: opts.Log.Named("usage"),
		sidecarID: sidecarID, epoch: epoch, subject: Subject(sidecarID),
		// One batch must fit one message: 1024 deltas of long names stay under 1 MB.
		maxBatchUsages:  1024,
		minBackoff:      100 * time.Millisecond,
		maxBackoff:      5 * time.Second,
		conflictBackoff: 30 * time.Second,
		requestTimeout:  5 * time.Second,
		settleChunk:     128,
		sweepChunk:      256,
		housePace:       time.Millisecond,
		wake:            make(chan struct{}, 1),
		flushCh:         make(chan *flushWaiter, 16),
		kick:            make(chan struct{}, 1),
		writerDone:      make(chan struct{}),
		pubDone:         make(chan struct{}),
	}
	if err := r.load(); err != nil {
		return nil, fmt.Errorf("usage: load outbox: %w", err)
	}
	sums, stale, err := r.durableSums()
	if err != nil {
		return nil, err
	}
	r.sums, r.stale = sums, stale
	r.w.init(sums, opts.Now())
	return r, nil
}

// Start starts the group-commit writer and the publisher. The publisher makes sure the
// stream exists before it publishes, retrying in the background while NATS is away, so
// Start does not wait for NATS. ctx only aborts the start itself: the goroutines run
// until Close.
func (r *Recorder) Start(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	switch r.state {
	case stateRunning:
		return errors.New("usage: started twice")
	case stateClosed:
		return ErrClosed
	}
	r.state = stateRunning
	pctx, cancel := context.WithCancel(context.Background())
	r.pubCancel = cancel
	r.log.Info("usage recorder started", zap.String("subject", r.subject), zap.String("epoch", r.epoch),
		zap.Int64("outbox_bytes", r.st.outboxBytes.Load()), zap.Int64("outbox_batches", r.st.outboxBatches.Load()),
		zap.Uint64("pending_seq", r.st.pendingSeq.Load()), zap.Uint64("acked_seq", r.p.acked.seq))
	go r.writeLoop()
	go r.publishLoop(pctx)
	return nil
}

// Record makes u durable: it returns once u is committed to Badger with its group
// commit, together with the counters it updates. It is safe for many concurrent
// callers, reads u only during the call, and allocates nothing per call (batch buffers
// are reused). An error means u may not be durable.
func (r *Recorder) Record(u []limiter.Usage) error {
	if len(u) == 0 {
		return nil
	}
	r.mu.Lock()
	if r.state != stateRunning {
		st := r.state
		r.mu.Unlock()
		if st == stateNew {
			return ErrNotStarted
		}
		return ErrClosed
	}
	var b *batch
	if n := len(r.queue); n > 0 && !r.queue[n-1].sealed {
		b = r.queue[n-1]
		if len(b.usages)+len(u) > r.maxBatchUsages {
			b.sealed = true // full: the writer may take it at once
			b = nil
			r.signal()
		}
	}
	if b == nil {
		b = r.newBatchLocked()
	}
	if len(b.usages) == 0 {
		b.first = time.Now()
		r.signal()
	}
	b.usages = append(b.usages, u...)
	r.mu.Unlock()
	<-b.done
	return b.err
}

// Flush publishes everything committed before the call and waits for its
// acknowledgement, or for ctx.
func (r *Recorder) Flush(ctx context.Context) error {
	r.mu.Lock()
	st := r.state
	r.mu.Unlock()
	if st == stateNew {
		return ErrNotStarted
	}
	w := &flushWaiter{mark: r.lastBatch.Load(), ctx: ctx, done: make(chan error, 1)}
	select {
	case r.flushCh <- w:
	case <-ctx.Done():
		return ctx.Err()
	case <-r.pubDone:
		return ErrClosed
	}
	select {
	case err := <-w.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-r.pubDone:
		return ErrClosed
	}
}

// Close stops accepting usage, lets the writer commit what it holds, publishes what it
// can before ctx's deadline and stops. What is not published stays in the outbox for
// the next start; that is logged, not an error. Close does not close the store. It is
// safe to call twice.
func (r *Recorder) Close(ctx context.Context) error {
	r.closeOnce.Do(func() { r.closeErr = r.close(ctx) })
	return r.closeErr
}

func (r *Recorder) close(ctx context.Context) error {
	r.mu.Lock()
	st := r.state
	r.state = stateClosed
	r.signal()
	r.mu.Unlock()
	if st != stateRunning {
		return nil
	}
	<-r.writerDone
	err := r.Flush(ctx)
	r.pubCancel()
	<-r.pubDone
	s := r.Stats()
	if err != nil {
		r.log.Warn("usage recorder closed with usage left in the outbox for the next start",
			zap.Error(err), zap.Int64("outbox_bytes", s.OutboxBytes), zap.Int64("outbox_batches", s.OutboxBatches),
			zap.Int64("outbox_keys", s.OutboxKeys), zap.Uint64("pending_seq", s.PendingSeq))
	} else {
		r.log.Info("usage recorder closed, outbox published", zap.Uint64("acked_seq", s.AckedSeq))
	}
	return nil
}

// signal wakes the writer; it never blocks.
func (r *Recorder) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Restore calls l.Restore for every durable counter whose window has not ended, so that
// a restarted sidecar does not hand out a hard limit again, and deletes counters of
// windows that ended more than a day ago. Call it once, before serving: the values are
// those New read.
//
// A counter's durable value is the sum of its parts in four places, each unit of usage
// being in exactly one of them at every moment (see the package doc): its u/c/ entry
// (usage settled after publication), its deltas in messages not yet settled into it
// (pending or acknowledged), in folded outbox totals, and in outbox batches at or above
// the floor.
func (r *Recorder) Restore(l *limiter.Limiter) error {
	now := r.opts.Now().UnixNano()
	restored := 0
	for k, c := range r.sums {
		if c.end > now {
			l.Restore(k, c.end, c.quantity)
			restored++
		}
	}
	wb := r.db.NewWriteBatch()
	defer wb.Cancel()
	for _, k := range r.stale {
		if err := wb.Delete(k); err != nil {
			return fmt.Errorf("usage: delete expired counters: %w", err)
		}
	}
	if err := wb.Flush(); err != nil {
		return fmt.Errorf("usage: delete expired counters: %w", err)
	}
	r.log.Info("usage counters restored", zap.Int("restored", restored), zap.Int("expired_deleted", len(r.stale)))
	r.sums, r.stale = nil, nil // read once at New; the writer keeps its own totals
	return nil
}

// durableSums reads every counter's durable value (see Restore) as of now, and the keys
// of settled counters whose windows ended more than counterRetention ago.
func (r *Recorder) durableSums() (sums map[limiter.CounterKey]*counter, stale [][]byte, err error) {
	now := r.opts.Now().UnixNano()
	horizon := now - int64(counterRetention)
	sums = make(map[limiter.CounterKey]*counter)
	addTo := func(k limiter.CounterKey, end, qty int64) {
		c := sums[k]
		if c == nil {
			c = &counter{}
			sums[k] = c
		}
		c.end = max(c.end, end)
		c.quantity += qty
	}
	err = r.db.View(func(txn *badger.Txn) error { // one snapshot of every place
		var floor uint64
		var mark settleMark
		if err := getValue(txn, keyFloor, func(v []byte) (err error) { floor, err = decodeU64(v); return err }); err != nil {
			return err
		}
		if err := getValue(txn, keySettled, func(v []byte) (err error) { mark, err = decodeSettleMark(v); return err }); err != nil {
			return err
		}
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte("u/"), PrefetchValues: true, PrefetchSize: 256})
		defer it.Close()
		for it.Seek([]byte(prefixCounter)); it.ValidForPrefix([]byte(prefixCounter)); it.Next() {
			item := it.Item()
			k, err := counterKey(item.Key(), prefixCounter)
			if err != nil {
				return fmt.Errorf("counter key %q: %w", item.Key(), err)
			}
			var c counter
			if err := item.Value(func(v []byte) (err error) { c, err = decodeCounter(v); return err }); err != nil {
				return fmt.Errorf("counter %v: %w", k, err)
			}
			if c.end <= horizon {
				stale = append(stale, item.KeyCopy(nil))
			}
			addTo(k, c.end, c.quantity)
		}
		for it.Seek([]byte(prefixPending)); it.ValidForPrefix([]byte(prefixPending)); it.Next() {
			seq := binary.BigEndian.Uint64(it.Item().Key()[len(prefixPending):])
			if seq < mark.seq {
				continue // settled; its deletion did not happen (a version-1 message)
			}
			err := it.Item().Value(func(v []byte) error {
				mv, err := decodeMessageValue(v)
				if err != nil || mv.counted {
					return err
				}
				from := 0
				if seq == mark.seq {
					from = int(min(mark.index, uint64(len(mv.entries))))
				}
				for _, e := range mv.entries[from:] {
					addTo(e.k, e.d.end, e.d.quantity)
				}
				return nil
			})
			if err != nil {
				return fmt.Errorf("usage message %d: %w", seq, err)
			}
		}
		for it.Seek([]byte(prefixTotal)); it.ValidForPrefix([]byte(prefixTotal)); it.Next() {
			item := it.Item()
			k, err := counterKey(item.Key(), prefixTotal)
			if err != nil {
				return fmt.Errorf("outbox total key %q: %w", item.Key(), err)
			}
			var d delta
			if err := item.Value(func(v []byte) (err error) { d, err = decodeTotal(v); return err }); err != nil {
				return fmt.Errorf("outbox total %v: %w", k, err)
			}
			addTo(k, d.end, d.quantity)
		}
		for it.Seek(batchKey(nil, floor)); it.ValidForPrefix([]byte(prefixBatch)); it.Next() {
			err := it.Item().Value(func(v []byte) error {
				return decodeBatch(v, func(k limiter.CounterKey, d delta) { addTo(k, d.end, d.quantity) })
			})
			if err != nil {
				return fmt.Errorf("outbox batch %d: %w", batchSeq(it.Item().Key()), err)
			}
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("usage: read durable counters: %w", err)
	}
	return sums, stale, nil
}

// Stats are the recorder's counters and gauges, for metrics and readiness.
type Stats struct {
	Records      uint64 // usage records made durable
	Batches      uint64 // group commits
	BadgerWrites uint64 // Badger write transactions of the writer (one per group commit)
	WriteErrors  uint64 // group commits that failed (their Records returned the error)

	Published        uint64 // messages acknowledged by JetStream
	PublishedDeltas  uint64 // deltas in them
	PublishedRecords uint64 // usage records in them (as far as known across restarts)
	PublishErrors    uint64 // failed publish attempts, and those NATS being unreachable prevented (each is retried)
	Recovered        uint64 // republished messages found already stored (lost acknowledgements)
	Conflicts        uint64 // refusals by a message of another process on this sidecar's subject
	Rebaselines      uint64 // times this sidecar's earlier messages were found removed from the stream
	Compactions      uint64 // times the outbox was folded at its bound

	OutboxBytes   int64  // bytes of outbox entries and the pending message (keys and values)
	OutboxBatches int64  // group commits not yet published
	OutboxKeys    int64  // folded per-key totals not yet published
	Unsettled     int64  // acknowledged messages not yet settled into the counters
	PendingSeq    uint64 // sequence of the message being published; 0 when none
	AckedSeq      uint64 // sequence of the last acknowledged message
	LastPublish   time.Time
	AtBound       bool // the outbox reached MaxOutboxBytes since it was last drained
	StreamReady   bool // the stream was found or created
	Conflict      string
	LastError     string
	LastErrorAt   time.Time
}

type stats struct {
	records, batches, badgerWrites, writeErrors                            atomic.Uint64
	published, publishedDeltas, publishedRecords, publishErrors, recovered atomic.Uint64
	conflicts, rebaselines, compactions                                    atomic.Uint64
	outboxBytes, outboxBatches, outboxKeys, unsettled                      atomic.Int64
	pendingSeq, ackedSeq                                                   atomic.Uint64
	lastPublish                                                            atomic.Int64
	atBound, streamReady                                                   atomic.Bool

	mu          sync.Mutex // protects the strings and time below
	conflict    string
	lastError   string
	lastErrorAt time.Time
}

func (s *stats) setError(err error) {
	s.mu.Lock()
	s.lastError, s.lastErrorAt = err.Error(), time.Now()
	s.mu.Unlock()
}

func (s *stats) setConflict(c string) {
	s.mu.Lock()
	s.conflict = c
	s.mu.Unlock()
}

// Stats returns the current counters.
func (r *Recorder) Stats() Stats {
	s := &r.st
	out := Stats{
		Records: s.records.Load(), Batches: s.batches.Load(), BadgerWrites: s.badgerWrites.Load(),
		WriteErrors: s.writeErrors.Load(), Published: s.published.Load(),
		PublishedDeltas: s.publishedDeltas.Load(), PublishedRecords: s.publishedRecords.Load(),
		PublishErrors: s.publishErrors.Load(), Recovered: s.recovered.Load(), Conflicts: s.conflicts.Load(),
		Rebaselines: s.rebaselines.Load(), Compactions: s.compactions.Load(),
		OutboxBytes: s.outboxBytes.Load(), OutboxBatches: s.outboxBatches.Load(), OutboxKeys: s.outboxKeys.Load(), Unsettled: s.unsettled.Load(),
		PendingSeq: s.pendingSeq.Load(), AckedSeq: s.ackedSeq.Load(),
		AtBound: s.atBound.Load(), StreamReady: s.streamReady.Load(),
	}
	if ns := s.lastPublish.Load(); ns != 0 {
		out.LastPublish = time.Unix(0, ns)
	}
	s.mu.Lock()
	out.Conflict, out.LastError, out.LastErrorAt = s.conflict, s.lastError, s.lastErrorAt
	s.mu.Unlock()
	return out
}

// Readiness reports whether usage can be recorded (false when the recorder is closed or
// its last group commit failed) and a detail for the readiness endpoint: the outbox
// bound, a publishing backlog, a conflict. A NATS outage does not make it unready:
// usage is kept in the outbox.
func (r *Recorder) Readiness() (ready bool, detail string) {
	s := r.Stats()
	r.mu.Lock()
	running := r.state == stateRunning
	r.mu.Unlock()
	var parts []string
	ready = running && !r.w.failing.Load()
	if !running {
		parts = append(parts, "usage recorder not running")
	}
	if r.w.failing.Load() {
		parts = append(parts, "usage: group commit to Badger failing: "+s.LastError)
	}
	if s.Conflict != "" {
		parts = append(parts, "usage: conflict: "+s.Conflict)
	}
	if s.AtBound {
		parts = append(parts, fmt.Sprintf("usage: outbox reached its bound (%d of %d bytes, folded into %d per-key totals; admission and counting go on, nothing is dropped)",
			s.OutboxBytes, r.opts.MaxOutboxBytes, s.OutboxKeys))
	}
	if s.PendingSeq != 0 && s.LastError != "" && time.Since(s.LastErrorAt) < 2*r.opts.FlushInterval+r.maxBackoff {
		parts = append(parts, fmt.Sprintf("usage: publishing delayed (%d bytes waiting): %s", s.OutboxBytes, s.LastError))
	}
	return ready, strings.Join(parts, "; ")
}
