package usage

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
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
	DefaultFlushInterval  = 5 * time.Second
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
	// FlushInterval is how often committed usage is published as one message; default 5s.
	FlushInterval time.Duration
	// StreamReplicas is the replication of the stream when the recorder creates it;
	// default 1. An existing stream is used as it is.
	StreamReplicas int
	// MaxOutboxBytes bounds the outbox during an outage; default 256 MiB. At the bound
	// the log is folded into one entry per (customer, feature, window); admission and
	// counting go on and no usage is dropped (see Stats.AtBound). The log's segment
	// files take up to one segment (8 MiB) more on disk, and one is kept ready.
	MaxOutboxBytes int64
	// Now is the clock for message times and window expiry; default time.Now.
	Now func() time.Time
	// Nice is added to the nice value of the publisher's thread (lowprio.Lower): its
	// cuts, publishes and settling passes are milliseconds of work every flush interval
	// that give way to the request path when the cores are busy. 0 leaves it alone.
	Nice int
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
	minBackoff      time.Duration // first wait after a failed publish
	maxBackoff      time.Duration // longest wait between publish attempts
	conflictBackoff time.Duration // wait after a conflict on the subject
	requestTimeout  time.Duration // one JetStream request
	// Housekeeping steps are one small transaction each, so that they spread over the
	// flush interval.
	settleChunk int // keys settled into the counters per transaction
	// A settling pass merges acknowledged messages (see settleStep): it starts once
	// settleMessages of them wait, or settleEntries deltas, or the oldest waited
	// settleAfter. A pass writes each key once, and at 5,000 requests a second over
	// 10,000 customers every 5 s message carries most of the same keys: the longer a
	// pass waits, the fewer writes. settleEntries bounds the memory that waiting takes
	// (about 100 bytes a delta).
	settleMessages int
	settleEntries  int
	settleAfter    time.Duration
	// The publisher reads the log this often into the next message, so that a cut
	// reads only the last moments (see readAheadStep).
	readAheadEvery time.Duration
	sweepChunk     int           // entries counted elsewhere deleted per transaction; 0: none (tests)
	housePace      time.Duration // pause between housekeeping steps
	hooks          hooks

	j        *journal      // the log of committed usage; j.mu also protects state
	state    int           // stateNew, stateRunning, stateClosed
	logFloor atomic.Uint64 // log positions below this are in messages or folded totals
	failing  atomic.Bool   // the last append failed; read by Readiness

	sums  map[limiter.CounterKey]*counter // durable counters at New, for Restore
	stale [][]byte                        // settled counters of long-ended windows, deleted by Restore
	p     publisher                       // owned by the publisher goroutine

	flushCh chan *flushWaiter
	kick    chan struct{} // capacity 1: the publisher should look at the outbox now
	crashed atomic.Bool   // a test hook stopped the publisher as a crash would

	pubDone      chan struct{}
	prefaultDone chan struct{}
	pubCancel    context.CancelFunc
	closeOnce    sync.Once
	closeErr     error

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
	return newRecorder(opts.Store.DB(), opts.Store.Dir(), opts.Store.SidecarID(), opts.Store.Epoch(), opts)
}

// logDirPrefix names the log's directory in the data directory: usage-log-<epoch>, so
// that a rebuilt database (a new epoch, whose floor starts at 0) never reads the log
// of the one it replaced.
const logDirPrefix = "usage-log-"

func newRecorder(db *badger.DB, dataDir, sidecarID, epoch string, opts Options) (*Recorder, error) {
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
		minBackoff:      100 * time.Millisecond,
		maxBackoff:      5 * time.Second,
		conflictBackoff: 30 * time.Second,
		requestTimeout:  5 * time.Second,
		settleChunk:     256,
		settleMessages:  16,
		settleEntries:   1 << 18,
		settleAfter:     time.Minute,
		readAheadEvery:  min(max(opts.FlushInterval/16, 5*time.Millisecond), 100*time.Millisecond),
		sweepChunk:      256,
		housePace:       time.Millisecond,
		flushCh:         make(chan *flushWaiter, 16),
		kick:            make(chan struct{}, 1),
		pubDone:         make(chan struct{}),
		prefaultDone:    make(chan struct{}),
	}
	if err := r.migrateBatches(); err != nil {
		return nil, fmt.Errorf("usage: move the outbox batches of an earlier version into totals: %w", err)
	}
	if err := r.load(); err != nil {
		return nil, fmt.Errorf("usage: load outbox: %w", err)
	}
	sums, stale, err := r.durableSums()
	if err != nil {
		return nil, err
	}
	// Overage is computed as records leave the log, from the durable totals before
	// them: everything but the log.
	now := opts.Now().UnixNano()
	r.p.durable = make(map[limiter.CounterKey]*durableTotal, len(sums))
	for k, c := range sums {
		if c.end > now {
			r.p.durable[k] = &durableTotal{end: c.end, quantity: c.quantity}
		}
	}
	r.p.pruneDurableAt = opts.Now().Add(time.Minute)
	logDir := filepath.Join(dataDir, logDirPrefix+epoch)
	r.j, err = openJournal(logDir, r.p.logFloor, r.log, func(_ uint64, payload []byte) error {
		return decodeRecord(payload, &r.p.keys, func(_ int64, e *logEntry) {
			c := sums[e.key.k]
			if c == nil {
				c = &counter{}
				sums[e.key.k] = c
			}
			c.end = max(c.end, e.end)
			c.quantity += e.quantity
		})
	})
	if err != nil {
		return nil, err
	}
	r.logFloor.Store(r.p.logFloor)
	r.sums, r.stale = sums, stale
	r.reportOtherLogs(dataDir, logDir)
	return r, nil
}

// reportOtherLogs logs the usage logs of earlier databases of this data directory: a
// database rebuilt after it could not be opened starts a new epoch and a new log, and
// the old log's unpublished usage (if any) is left for an operator, never deleted.
func (r *Recorder) reportOtherLogs(dataDir, logDir string) {
	others, _ := filepath.Glob(filepath.Join(dataDir, logDirPrefix+"*"))
	for _, o := range others {
		if o != logDir {
			r.log.Error("usage log of an earlier database of this data directory left in place; its unpublished usage is not counted",
				zap.String("dir", o))
		}
	}
}

// Start starts the publisher, and lets Record append. The publisher makes sure the
// stream exists before it publishes, retrying in the background while NATS is away, so
// Start does not wait for NATS. ctx only aborts the start itself: the goroutines run
// until Close.
func (r *Recorder) Start(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	r.j.mu.Lock()
	defer r.j.mu.Unlock()
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
		zap.Int64("outbox_bytes", r.outboxBytes()), zap.Uint64("log_records", r.j.recovered),
		zap.Uint64("pending_seq", r.st.pendingSeq.Load()), zap.Uint64("acked_seq", r.p.acked.seq))
	go r.publishLoop(pctx)
	go r.prefaultLoop(pctx)
	return nil
}

// prefaultLoop keeps the log's next pages ready for appends (see journal.prefault).
func (r *Recorder) prefaultLoop(ctx context.Context) {
	defer close(r.prefaultDone)
	tick := time.NewTicker(time.Second) // for a segment made ready after a quiet time
	defer tick.Stop()
	for {
		r.j.prefault()
		select {
		case <-ctx.Done():
			return
		case <-r.j.prefaultKick:
		case <-tick.C:
		}
	}
}

// Record makes u durable: it returns once u is in the usage log, which survives a
// crash of the process (see journal.go), together with the counters it updates. It is
// safe for many concurrent callers, each of which holds a lock for one copy of a few
// dozen bytes; it reads u only during the call, makes no system call of its own
// (except once per 8 MiB of log when the next segment was not made ready in time; about
// once per 128 KiB of log it wakes the prefault goroutine, which the runtime may do
// with one) and allocates nothing. An error means u is not durable.
func (r *Recorder) Record(u []limiter.Usage) error {
	if len(u) == 0 {
		return nil
	}
	// The record is encoded before the lock, in a buffer on the stack unless it is
	// unusually big: the lock covers only the copy into the log.
	var buf [512]byte
	b := buf[:0]
	if size := recordSize(u); size > len(buf) {
		b = make([]byte, 0, size)
	}
	b = appendRecord(b, r.opts.Now().UnixNano(), u)
	j := r.j
	j.mu.Lock()
	if r.state != stateRunning {
		st := r.state
		j.mu.Unlock()
		if st == stateNew {
			return ErrNotStarted
		}
		return ErrClosed
	}
	before := j.pos
	err := j.write(b)
	if err == nil {
		j.records += uint64(len(u))
		r.st.records.Store(j.records)
		r.st.appends.Store(j.appends)
	}
	after := j.pos
	j.mu.Unlock()
	if err != nil {
		r.appendFailed(err)
		return err
	}
	if r.failing.Load() {
		r.failing.Store(false)
	}
	if after^before >= pageSize { // a page boundary crossed (pageSize is a power of 2)
		j.kickPrefault(after)
	}
	// Wake the publisher at the outbox bound, and when a segment is half full (to make
	// the next one ready).
	if after-r.logFloor.Load() >= uint64(r.opts.MaxOutboxBytes) || before%segmentSize < segmentSize/2 && after%segmentSize >= segmentSize/2 {
		r.kickPublisher()
	}
	return nil
}

func (r *Recorder) appendFailed(err error) {
	r.failing.Store(true)
	r.st.appendErrors.Add(1)
	r.st.setError(err)
	if ce := r.log.Check(zap.ErrorLevel, "usage append to the log failed; the request gets the error"); ce != nil {
		ce.Write(zap.Error(err))
	}
}

// Flush publishes everything committed before the call and waits for its
// acknowledgement, or for ctx.
func (r *Recorder) Flush(ctx context.Context) error {
	r.j.mu.Lock()
	st := r.state
	r.j.mu.Unlock()
	if st == stateNew {
		return ErrNotStarted
	}
	w := &flushWaiter{mark: r.j.end.Load(), ctx: ctx, done: make(chan error, 1)}
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

// Close stops accepting usage, publishes what it can before ctx's deadline and stops. What is not published stays in the outbox for
// the next start; that is logged, not an error. Close does not close the store. It is
// safe to call twice.
func (r *Recorder) Close(ctx context.Context) error {
	r.closeOnce.Do(func() { r.closeErr = r.close(ctx) })
	return r.closeErr
}

func (r *Recorder) close(ctx context.Context) error {
	r.j.mu.Lock()
	st := r.state
	r.state = stateClosed
	r.j.mu.Unlock()
	if st != stateRunning {
		if st == stateNew {
			r.j.close()
		}
		return nil
	}
	err := r.Flush(ctx)
	r.pubCancel()
	<-r.pubDone
	<-r.prefaultDone
	r.j.close() // nothing appends (closed) or reads (the publisher stopped) any more
	s := r.Stats()
	if err != nil {
		r.log.Warn("usage recorder closed with usage left in the outbox for the next start",
			zap.Error(err), zap.Int64("outbox_bytes", s.OutboxBytes), zap.Int64("outbox_records", s.OutboxRecords),
			zap.Int64("outbox_keys", s.OutboxKeys), zap.Uint64("pending_seq", s.PendingSeq))
	} else {
		r.log.Info("usage recorder closed, outbox published", zap.Uint64("acked_seq", s.AckedSeq))
	}
	return nil
}

// Restore calls l.Restore for every durable counter whose window has not ended, so that
// a restarted sidecar does not hand out a hard limit again, and deletes counters of
// windows that ended more than a day ago. Call it once, before serving: the values are
// those New read.
//
// A counter's durable value is the sum of its parts in four places, each unit of usage
// being in exactly one of them at every moment (see the package doc): its u/c/ entry
// (usage settled after publication), its deltas in messages not yet settled into it
// (pending or acknowledged), in folded outbox totals, and in log records at or above
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
	r.sums, r.stale = nil, nil // read once at New; the publisher keeps its own totals
	return nil
}

// durableSums reads every counter's durable value (see Restore) as of now, except its
// part in the log, and the keys of settled counters whose windows ended more than
// counterRetention ago.
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
		mark := idleMark(1)
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
			if seq < mark.lo {
				continue // settled; its deletion did not happen (a version-1 message)
			}
			err := it.Item().Value(func(v []byte) error {
				mv, err := decodeMessageValue(v)
				if err != nil || mv.counted {
					return err
				}
				for _, e := range mark.unsettled(seq, mv.entries) {
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
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("usage: read durable counters: %w", err)
	}
	return sums, stale, nil
}

// Stats are the recorder's counters and gauges, for metrics and readiness.
type Stats struct {
	Records      uint64 // usage records made durable since New
	Appends      uint64 // appends to the log (one per Record call) since New
	BadgerWrites uint64 // Badger write transactions of the recorder (all of them the publisher's)
	WriteErrors  uint64 // appends that failed (their Records returned the error)

	Published        uint64 // messages acknowledged by JetStream
	PublishedDeltas  uint64 // deltas in them
	PublishedRecords uint64 // usage records in them (as far as known across restarts)
	PublishErrors    uint64 // failed publish attempts, and those NATS being unreachable prevented (each is retried)
	Recovered        uint64 // republished messages found already stored (lost acknowledgements)
	Conflicts        uint64 // refusals by a message of another process on this sidecar's subject
	Rebaselines      uint64 // times this sidecar's earlier messages were found removed from the stream
	Compactions      uint64 // times the outbox was folded at its bound

	OutboxBytes   int64  // bytes of the log not yet in a message, folded totals and the pending message
	OutboxRecords int64  // log records (one per Record call) not yet in a message
	LogFileBytes  int64  // size of the log's segment files on disk
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
	records, appends, badgerWrites, appendErrors                           atomic.Uint64
	recordsOut                                                             atomic.Uint64 // log records taken into messages or totals
	readAhead                                                              atomic.Uint64 // log records read ahead of a cut (tests)
	published, publishedDeltas, publishedRecords, publishErrors, recovered atomic.Uint64
	conflicts, rebaselines, compactions                                    atomic.Uint64
	outboxBytes, outboxKeys, unsettled                                     atomic.Int64 // outboxBytes: not counting the log
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
		Records: s.records.Load(), Appends: s.appends.Load(), BadgerWrites: s.badgerWrites.Load(),
		WriteErrors: s.appendErrors.Load(), Published: s.published.Load(),
		PublishedDeltas: s.publishedDeltas.Load(), PublishedRecords: s.publishedRecords.Load(),
		PublishErrors: s.publishErrors.Load(), Recovered: s.recovered.Load(), Conflicts: s.conflicts.Load(),
		Rebaselines: s.rebaselines.Load(), Compactions: s.compactions.Load(),
		OutboxBytes: r.outboxBytes(), OutboxRecords: int64(r.j.recovered + s.appends.Load() - s.recordsOut.Load()), LogFileBytes: r.j.diskBytes(), OutboxKeys: s.outboxKeys.Load(), Unsettled: s.unsettled.Load(),
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

// outboxBytes is the size of the outbox: the log from the floor, the folded totals and
// the pending message.
func (r *Recorder) outboxBytes() int64 {
	return int64(r.j.end.Load()-r.logFloor.Load()) + r.st.outboxBytes.Load()
}

// Readiness reports whether usage can be recorded (false when the recorder is closed or
// its last append failed) and a detail for the readiness endpoint: the outbox
// bound, a publishing backlog, a conflict. A NATS outage does not make it unready:
// usage is kept in the outbox.
func (r *Recorder) Readiness() (ready bool, detail string) {
	s := r.Stats()
	r.j.mu.Lock()
	running := r.state == stateRunning
	r.j.mu.Unlock()
	var parts []string
	failing := r.failing.Load()
	ready = running && !failing
	if !running {
		parts = append(parts, "usage recorder not running")
	}
	if failing {
		parts = append(parts, "usage: appending to the usage log failing: "+s.LastError)
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
