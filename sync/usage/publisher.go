package usage

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/internal/lowprio"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// publisher is the state of the publisher goroutine; nothing else touches it once the
// recorder has started.
type publisher struct {
	acked    ackState                       // last acknowledged message, as in u/s/ack
	pending  *pending                       // the message being published, as in u/p/<seq>
	totals   map[limiter.CounterKey]*delta  // folded outbox totals, as in u/o/k/
	counters map[limiter.CounterKey]counter // durable counters read or written, as in u/c/
	pruneAt  time.Time                      // next time to forget counters of ended windows
	stream   jetstream.Stream               // nil until found or created
	waiters  []*flushWaiter                 // Flush calls waiting for an acknowledgement
	backlog  bool                           // the last cut left usage behind: cut again at once
	failures int                            // consecutive failures, for backoff and logs
	nextTry  time.Time                      // no attempt before this, after a failure
	lastLog  time.Time                      // last failure logged at warn level
	lastFold time.Time                      // last fold of the outbox
	log      []*logMsg                      // acknowledged messages still to settle into the counters, oldest first
	settled  settleMark                     // how far they are settled, as in u/s/settled
	pass     *settlePass                    // the settling pass under way, if any
	dead     [][]byte                       // keys of entries that are counted elsewhere, to delete (see sweepStep)
	setIdx   map[limiter.CounterKey]int     // the cut's index, reused
	ahead    *readAhead                     // the log read ahead of the next cut, if any
	houseErr time.Time                      // settling or sweeping failed: no retry before this

	// Overage of limited features is computed as records leave the log, from durable
	// totals in log order: durable holds every key's durable quantity outside the log
	// (counters, messages, folded totals). keys holds the counter keys read from the log.
	durable        map[limiter.CounterKey]*durableTotal
	pruneDurableAt time.Time
	durableGen     uint64 // bumped when totals leave durable (see durableOf)
	keys           keyTable
	// The last cut's set: how many deltas it held, and its per-delta scratch (newSet).
	lastSet                  int
	spareLogged, spareBefore []int64
	// The JSON of the last message acknowledged, reused by the next cut: a message is
	// megabytes at 10,000 customers, and nothing keeps its bytes after the
	// acknowledgement (the client copies them into its buffer when it publishes).
	spareMsg []byte
	br       breather // paces the publisher's bursts

	// Coverage, for Flush: every log record below ackedCovers is published.
	ackedCovers   uint64
	foldedThrough uint64 // log records below this are folded into totals or in messages
	logFloor      uint64 // log records below this are in messages or folded (u/s/logfloor)
	opsLimit      int    // when > 0, fewer entries per transaction (Badger refused more)
}

// pending is a message whose content and sequence are fixed in u/p/<seq>.
type pending struct {
	seq     uint64
	id      string
	data    []byte // the JSON published
	size    int64  // key and value bytes in Badger
	records int64
	deltas  int
	covers  uint64       // log records below this position are published once it is acknowledged
	entries []batchEntry // the deltas, in message order, to settle into the counters
	counted bool         // written by an earlier version: the deltas are counted already
}

// logMsg is an acknowledged message whose deltas are not all settled into the counters.
type logMsg struct {
	seq     uint64
	entries []batchEntry // in key order
	at      time.Time    // when it was acknowledged, or loaded at start
}

type flushWaiter struct {
	mark uint64 // log records below this position must be published
	ctx  context.Context
	done chan error
}

var (
	errConflict = errors.New("conflict on this sidecar's subject")
	errCrashed  = errors.New("publisher stopped by a test hook")
)

func (r *Recorder) kickPublisher() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// publishLoop cuts, publishes and folds until ctx is cancelled (by Close).
func (r *Recorder) publishLoop(ctx context.Context) {
	defer close(r.pubDone)
	lowprio.Background(r.log, r.opts.Nice)
	tick := time.NewTicker(r.opts.FlushInterval)
	defer tick.Stop()
	readTick := time.NewTicker(r.readAheadEvery)
	defer readTick.Stop()
	var readLogged time.Time
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	due := false // a flush interval passed since the last cut
	var prepareLogged time.Time
	for {
		r.breathe()
		if err := r.j.prepare(); err != nil && time.Since(prepareLogged) > 30*time.Second {
			// Appends create the segment themselves when it is not ready, and fail
			// (with this error) if they cannot.
			prepareLogged = time.Now()
			r.st.setError(err)
			r.log.Warn("usage log: cannot make the next segment ready", zap.Error(err))
		}
		r.maybeFold()
		wait := r.step(ctx, &due)
		if ctx.Err() != nil || r.crashed.Load() {
			r.failWaiters(ErrClosed)
			return
		}
		if wait != 0 && r.housekeep() {
			// More to do: after a pause, so that housekeeping spreads over the flush
			// interval instead of taking a core in one burst after each publish.
			if pace := r.pace(); wait < 0 || wait > pace {
				wait = pace
			}
		}
		if r.crashed.Load() {
			r.failWaiters(ErrClosed)
			return
		}
		if wait == 0 {
			continue
		}
		var retryC <-chan time.Time
		if wait > 0 {
			retry.Reset(wait)
			retryC = retry.C
		}
		select {
		case <-ctx.Done():
		case <-tick.C:
			due = true
		case w := <-r.flushCh:
			r.p.waiters = append(r.p.waiters, w)
			r.satisfyWaiters()
		case <-r.kick:
		case <-retryC:
		case <-readTick.C:
			r.breathe()
			if err := r.readAheadStep(); err != nil && time.Since(readLogged) > 30*time.Second {
				// The cut reads the same records again, and fails the same way.
				readLogged = time.Now()
				r.log.Warn("usage log: reading ahead of the next cut failed", zap.Error(err))
			}
		}
		retry.Stop()
	}
}

// pace is the pause before the next housekeeping step. A settling pass under way is
// spread over half a flush interval, between housePace and 20 ms a step, so that it
// keeps up with the load and takes a core for short moments only; otherwise the pause
// lasts until a pass is due by age (a pass due by count starts after the acknowledgement
// that makes it so).
func (r *Recorder) pace() time.Duration {
	p := &r.p
	if p.pass == nil {
		if len(p.log) == 0 || r.settleDue(time.Now()) {
			return r.housePace
		}
		return max(r.settleAfter-time.Since(p.log[0].at), r.housePace)
	}
	left := len(p.pass.es) - p.pass.pos
	steps := max(1, (left+r.settleChunk-1)/r.settleChunk)
	return min(max(r.opts.FlushInterval/2/time.Duration(steps), r.housePace), 20*time.Millisecond)
}

// step does the next thing to do and returns how long to wait before the next step: 0
// for at once, a negative value for until something happens.
func (r *Recorder) step(ctx context.Context, due *bool) time.Duration {
	p := &r.p
	if d := time.Until(p.nextTry); d > 0 {
		return d
	}
	if p.stream == nil {
		if !r.js.Conn().IsConnected() {
			return r.failed(fmt.Errorf("ensure stream %s: not connected to NATS", Stream))
		}
		if err := r.ensureStream(ctx); err != nil {
			return r.failed(err)
		}
	}
	if p.pending == nil {
		if !*due && !p.backlog && !r.flushWanted() {
			return -1
		}
		*due = false
		if err := r.cut(); err != nil {
			return r.failed(err)
		}
		if p.pending == nil {
			r.satisfyWaiters()
			return -1
		}
	}
	if !r.js.Conn().IsConnected() {
		// Publishing now would only queue copies in the client's reconnect buffer.
		r.st.publishErrors.Add(1) // an attempt that could not be made, for alerting on outages
		return r.failed(fmt.Errorf("publish %s: not connected to NATS", p.pending.id))
	}
	if err := r.publish(ctx); err != nil {
		return r.failed(err)
	}
	if p.failures > 0 {
		r.log.Info("usage publishing recovered", zap.Int("failed_attempts", p.failures))
		p.failures = 0
	}
	if p.pending != nil { // re-based on the stream's state: publish again
		return 0
	}
	r.satisfyWaiters()
	if p.backlog || r.flushWanted() {
		return 0
	}
	return -1
}

// failed records a failure and returns the backoff before the next attempt.
func (r *Recorder) failed(err error) time.Duration {
	p := &r.p
	p.failures++
	r.st.setError(err)
	wait := r.minBackoff << min(p.failures-1, 16)
	wait = min(wait, r.maxBackoff)
	if errors.Is(err, errConflict) {
		wait = r.conflictBackoff
	}
	p.nextTry = time.Now().Add(wait)
	if errors.Is(err, errCrashed) {
		return wait
	}
	if p.failures == 1 || time.Since(p.lastLog) > 30*time.Second {
		p.lastLog = time.Now()
		r.log.Warn("usage publishing failing; usage stays in the outbox and is retried", zap.Error(err),
			zap.Int("failed_attempts", p.failures), zap.Duration("retry_in", wait),
			zap.Int64("outbox_bytes", r.st.outboxBytes.Load()))
	}
	return wait
}

// ensureStream finds the stream, creating it when absent.
func (r *Recorder) ensureStream(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, r.requestTimeout)
	defer cancel()
	s, err := r.js.Stream(ctx, Stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		s, err = r.js.CreateStream(ctx, jetstream.StreamConfig{
			Name:        Stream,
			Description: "gatehouse usage: one message of deltas per sidecar flush (DESIGN.md section 7)",
			Subjects:    []string{SubjectPrefix + ">"},
			Retention:   jetstream.LimitsPolicy,
			Discard:     jetstream.DiscardNew, // limits added later refuse usage rather than drop it
			Storage:     jetstream.FileStorage,
			Replicas:    r.opts.StreamReplicas,
			Duplicates:  2 * time.Minute,
		})
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			s, err = r.js.Stream(ctx, Stream)
		} else if err == nil {
			r.log.Info("usage stream created", zap.String("stream", Stream), zap.Int("replicas", r.opts.StreamReplicas))
		}
	}
	if err != nil {
		return fmt.Errorf("ensure stream %s: %w", Stream, err)
	}
	r.p.stream = s
	r.st.streamReady.Store(true)
	return nil
}

// publish sends the pending message and records its acknowledgement.
func (r *Recorder) publish(ctx context.Context) error {
	p := r.p.pending
	if r.hooks.beforePublish != nil && r.hooks.beforePublish() {
		r.crashed.Store(true)
		return errCrashed
	}
	actx, cancel := context.WithTimeout(ctx, r.requestTimeout)
	ack, err := r.js.Publish(actx, r.subject, p.data,
		jetstream.WithMsgID(p.id),
		jetstream.WithExpectStream(Stream),
		jetstream.WithExpectLastSequencePerSubject(r.p.acked.streamSeq))
	cancel()
	if r.hooks.afterPublish != nil {
		ack, err = r.hooks.afterPublish(ack, err)
	}
	switch {
	case err == nil:
		return r.acknowledge(ack.Sequence)
	case wrongLastSequence(err):
		return r.resolve(ctx)
	}
	r.st.publishErrors.Add(1)
	if errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, jetstream.ErrStreamNotFound) {
		r.p.stream = nil // look the stream up again (it may have been deleted)
		r.st.streamReady.Store(false)
	}
	return fmt.Errorf("publish %s: %w", p.id, err)
}

func wrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	return apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}

// acknowledge records that the pending message is stored at stream sequence streamSeq.
func (r *Recorder) acknowledge(streamSeq uint64) error {
	p := r.p.pending
	if r.hooks.beforeAck != nil && r.hooks.beforeAck() {
		r.crashed.Store(true)
		return errCrashed
	}
	next := ackState{seq: p.seq, streamSeq: streamSeq}
	err := r.update(func(txn *badger.Txn) error {
		if err := txn.Set([]byte(keyAck), next.encode()); err != nil {
			return err
		}
		if p.counted {
			return txn.Delete(pendingKey(p.seq))
		}
		return nil // the message stays until its deltas are settled into the counters
	})
	if err != nil {
		// The message is stored; the republish will be recognised.
		return fmt.Errorf("record acknowledgement of %s: %w", p.id, err)
	}
	r.p.acked = next
	r.p.pending = nil
	r.p.spareMsg = p.data[:0]
	if !p.counted {
		r.p.log = append(r.p.log, &logMsg{seq: p.seq, entries: p.entries, at: time.Now()})
		r.st.unsettled.Store(int64(len(r.p.log)))
	}
	r.p.ackedCovers = max(r.p.ackedCovers, p.covers)
	r.st.pendingSeq.Store(0)
	r.st.ackedSeq.Store(p.seq)
	r.st.published.Add(1)
	r.st.publishedDeltas.Add(uint64(p.deltas))
	r.st.publishedRecords.Add(uint64(p.records))
	r.st.lastPublish.Store(r.opts.Now().UnixNano())
	r.st.setConflict("")
	r.st.outboxBytes.Add(-p.size)
	if bytes := r.outboxBytes(); r.st.atBound.Load() && bytes < r.opts.MaxOutboxBytes/2 {
		r.st.atBound.Store(false)
		r.log.Info("usage outbox back under half its bound", zap.Int64("outbox_bytes", bytes))
	}
	return nil
}

// resolve decides what a "wrong last sequence" refusal of the pending message means, from
// the last message on this sidecar's subject.
func (r *Recorder) resolve(ctx context.Context) error {
	p := r.p.pending
	expected := r.p.acked.streamSeq
	actx, cancel := context.WithTimeout(ctx, r.requestTimeout)
	last, err := r.p.stream.GetLastMsgForSubject(actx, r.subject)
	cancel()
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		if expected == 0 {
			return fmt.Errorf("publish %s: wrong last sequence, yet the subject is empty: retrying", p.id)
		}
		return r.rebaseline(0, "no message left on the subject")
	}
	if err != nil {
		return fmt.Errorf("publish %s: wrong last sequence; reading the last message on %s: %w", p.id, r.subject, err)
	}
	id := last.Header.Get(jetstream.MsgIDHeader)
	switch {
	case id == p.id && bytes.Equal(last.Data, p.data):
		// Stored by an earlier attempt whose acknowledgement was lost (a crash, a
		// disconnection), however long ago: the duplicate window plays no part. The
		// content is compared too: a copy of this data directory (a restored backup)
		// reuses ids for other usage.
		r.st.recovered.Add(1)
		r.log.Info("usage message was already stored; recording its acknowledgement",
			zap.String("msg_id", id), zap.Uint64("stream_seq", last.Sequence))
		return r.acknowledge(last.Sequence)
	case last.Sequence == expected:
		return fmt.Errorf("publish %s: wrong last sequence, yet the last message is the expected one: retrying", p.id)
	case last.Sequence < expected:
		return r.rebaseline(last.Sequence, "messages this sidecar published were removed from the stream")
	case r.p.acked.seq == 0 && !strings.HasPrefix(id, r.sidecarID+":"+r.epoch+":"):
		// A new epoch (new or rebuilt database) under a sidecar id that published
		// before: the earlier epoch's messages are the baseline.
		r.log.Info("usage subject holds messages of an earlier epoch of this sidecar id; continuing after them",
			zap.String("last_msg_id", id), zap.Uint64("stream_seq", last.Sequence))
		return r.setStreamSeq(last.Sequence)
	}
	r.st.conflicts.Add(1)
	c := fmt.Sprintf("subject %s: last message %s at stream sequence %d, expected sequence %d before pending message %s",
		r.subject, id, last.Sequence, expected, p.id)
	r.st.setConflict(c)
	r.log.Error("USAGE CONFLICT: another process publishes usage under this sidecar id (a copied data directory or a restored backup?); the pending message is kept and retried, nothing is dropped; fix the duplicate sidecar id",
		zap.String("subject", r.subject), zap.String("pending_msg_id", p.id), zap.String("last_msg_id", id),
		zap.Uint64("last_stream_seq", last.Sequence), zap.Uint64("expected_stream_seq", expected))
	return fmt.Errorf("publish %s: %w: %s", p.id, errConflict, c)
}

// rebaseline continues after messages of this sidecar disappeared from the stream (a
// purge, a deletion, an age limit). If the pending message was stored and then removed
// too, republishing it counts it twice beyond the duplicate window: that cannot be told
// from the stream any more, so it is logged loudly and counted.
func (r *Recorder) rebaseline(streamSeq uint64, why string) error {
	r.st.rebaselines.Add(1)
	r.log.Error("usage stream lost messages of this sidecar; publishing on from what is there (usage removed from the stream is not restored by the sidecar)",
		zap.String("why", why), zap.String("subject", r.subject), zap.Uint64("expected_stream_seq", r.p.acked.streamSeq),
		zap.Uint64("last_stream_seq", streamSeq), zap.String("pending_msg_id", r.p.pending.id))
	return r.setStreamSeq(streamSeq)
}

func (r *Recorder) setStreamSeq(streamSeq uint64) error {
	next := ackState{seq: r.p.acked.seq, streamSeq: streamSeq}
	if err := r.update(func(txn *badger.Txn) error { return txn.Set([]byte(keyAck), next.encode()) }); err != nil {
		return fmt.Errorf("record stream sequence: %w", err)
	}
	r.p.acked = next
	return nil
}

// flushWanted reports whether a Flush waits for usage that is not acknowledged yet.
func (r *Recorder) flushWanted() bool {
	for _, w := range r.p.waiters {
		if w.mark > r.p.ackedCovers {
			return true
		}
	}
	return false
}

// satisfyWaiters answers the Flush calls whose usage is acknowledged.
func (r *Recorder) satisfyWaiters() {
	ws := r.p.waiters[:0]
	for _, w := range r.p.waiters {
		switch {
		case w.ctx.Err() != nil:
		case r.p.pending == nil && w.mark <= r.p.ackedCovers:
			w.done <- nil
		default:
			ws = append(ws, w)
		}
	}
	clear(r.p.waiters[len(ws):])
	r.p.waiters = ws
}

func (r *Recorder) failWaiters(err error) {
	for _, w := range r.p.waiters {
		w.done <- err
	}
	r.p.waiters = nil
}
