package replica

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// errRestart ends a watch session so that the next one starts at once (a resync is
// wanted, or the watch stalled).
var errRestart = errors.New("restart the watch")

// watchState is what the watch goroutine keeps across sessions.
type watchState struct {
	wantFull        bool         // the next session must be a full sync
	waiters         []chan error // Resync calls waiting for the next full sync to finish
	received        uint64       // entries received, applied or skipped: progress
	lastCountResync time.Time
	countWarned     time.Time
}

// run is the watch goroutine: it runs sessions until the replica closes, pausing with
// exponential backoff after a failure.
func (r *Replica) run() {
	defer r.wg.Done()
	var ws watchState
	defer func() {
		for _, w := range ws.waiters {
			w <- ErrClosed
		}
	}()
	backoff := r.backoffMin
	for {
		began := time.Now()
		err := r.session(&ws)
		r.live.Store(false)
		if r.ctx.Err() != nil {
			return
		}
		if errors.Is(err, errRestart) {
			r.log.Info("restarting the watch", zap.Error(err))
			backoff = r.backoffMin
			continue
		}
		if time.Since(began) > time.Minute {
			backoff = r.backoffMin
		}
		if errors.Is(err, jetstream.ErrBucketNotFound) {
			r.log.Warn("bucket not found; serving the local replica and waiting for it",
				zap.String("bucket", r.bucket), zap.Duration("retry_in", backoff))
		} else {
			r.log.Warn("watch failed; serving the local replica and retrying", zap.Error(err), zap.Duration("retry_in", backoff))
		}
		t := time.NewTimer(backoff)
		select {
		case <-r.ctx.Done():
			t.Stop()
			return
		case done := <-r.resyncReq:
			t.Stop()
			ws.wantFull = true
			ws.waiters = append(ws.waiters, done)
		case <-t.C:
		}
		backoff = min(2*backoff, r.backoffMax)
	}
}

// session opens the bucket, decides between resuming and a full sync, and applies what
// the watch delivers until it fails or must restart.
//
// Resume is safe when the bucket's stream is the one the replica was built from (same
// creation time) and its last sequence has not gone backwards: the watch then starts at
// the stored revision + 1 and, since a KV stream keeps each key's latest message, every
// key changed since arrives with its latest value or delete marker. What resume cannot
// see is a key whose messages were all removed (PurgeDeletes, a TTL, a stream purge):
// check catches that by comparing the bucket's number of subjects with the replica's.
func (r *Replica) session(ws *watchState) error {
	ctx := r.ctx
	octx, cancel := context.WithTimeout(ctx, r.opTimeout)
	kv, err := r.js.KeyValue(octx, r.bucket)
	cancel()
	if err != nil {
		return fmt.Errorf("open bucket %s: %w", r.bucket, err)
	}
	info, err := r.streamInfo(ctx, kv)
	if err != nil {
		return err
	}
	// Stored revisions are comparable with the stream's only if they came from it.
	trusted := r.pos.Bucket == r.bucket && r.pos.StreamCreated.Equal(info.Created) && !r.pos.StaleRevisions
	full, why := ws.wantFull, "requested"
	switch {
	case r.pos.StreamCreated.IsZero() && r.pos.Subjects == 0:
		full, why = true, "initial sync"
	case !trusted:
		full, why = true, "the bucket's stream is not the one the replica was built from (recreated or renamed)"
	case info.State.LastSeq < r.pos.Revision:
		full, why = true, fmt.Sprintf("the bucket's last revision %d is behind the replica's %d", info.State.LastSeq, r.pos.Revision)
	case r.pos.FullPending:
		full, why = true, "an earlier full sync did not finish"
	}
	resync := full && (r.pos.Subjects > 0 || r.pos.CaughtUp)
	var seen *keySet
	var opts []jetstream.WatchOpt
	if full {
		if !trusted || info.State.LastSeq < r.pos.Revision {
			// A new sequence space: the stored revisions mean nothing in it until every
			// key has been written again.
			r.pos.Revision, r.pos.StaleRevisions = 0, true
			trusted = false
		}
		r.pos.Bucket, r.pos.StreamCreated, r.pos.FullPending = r.bucket, info.Created, true
		if err := r.savePosition(); err != nil {
			return fmt.Errorf("save position: %w", err)
		}
		r.publish()
		if r.pos.Subjects > 0 {
			seen = &keySet{}
		}
		ws.wantFull = false
		r.log.Info("full sync", zap.String("reason", why), zap.Uint64("bucket_revision", info.State.LastSeq),
			zap.Uint64("bucket_keys", info.State.NumSubjects), zap.Uint64("local_keys", r.pos.Subjects))
	} else {
		opts = append(opts, jetstream.ResumeFromRevision(r.pos.Revision+1))
		r.log.Info("resuming", zap.Uint64("from_revision", r.pos.Revision+1), zap.Uint64("bucket_revision", info.State.LastSeq))
	}

	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	w, err := kv.WatchAll(wctx, opts...)
	if err != nil {
		return fmt.Errorf("watch %s: %w", r.bucket, err)
	}
	defer func() {
		if err := w.Stop(); err != nil {
			r.log.Debug("stop watch", zap.Error(err))
		}
	}()
	r.watches.Add(1)

	startLast := info.State.LastSeq
	caught := false
	chk := stallCheck{received: ws.received, reconnects: r.js.Conn().Stats().Reconnects}
	tick := time.NewTicker(r.checkInterval)
	defer tick.Stop()
	batch := make([]jetstream.KeyValueEntry, 0, r.maxBatch)
	updates := w.Updates()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case done := <-r.resyncReq:
			ws.wantFull = true
			ws.waiters = append(ws.waiters, done)
			return fmt.Errorf("%w: resync requested", errRestart)
		case <-tick.C:
			if err := r.check(ctx, kv, caught, ws, &chk); err != nil {
				return err
			}
		case e, ok := <-updates:
			if !ok {
				return errors.New("watch closed by the client library")
			}
			batch = batch[:0]
			marker, closed := e == nil, false
			if e != nil {
				batch = append(batch, e)
			}
		gather:
			for !marker && len(batch) < r.maxBatch {
				select {
				case e, ok := <-updates:
					switch {
					case !ok:
						closed = true
						break gather
					case e == nil:
						marker = true
					default:
						batch = append(batch, e)
					}
				default:
					break gather
				}
			}
			if len(batch) > 0 {
				ws.received += uint64(len(batch))
				if seen != nil {
					for _, e := range batch {
						seen.add(e.Key())
					}
				}
				if err := r.applyBatch(batch, trusted); err != nil {
					return err
				}
				r.lastContact.Store(time.Now().UnixNano())
			}
			if marker && !caught {
				if err := r.caughtUp(full, resync, seen, startLast, ws); err != nil {
					return err
				}
				caught, seen, trusted = true, nil, true
				if err := r.check(ctx, kv, caught, ws, &chk); err != nil {
					return err
				}
			}
			if closed {
				return errors.New("watch closed by the client library")
			}
		}
	}
}

// caughtUp runs when the watch has delivered the bucket's initial values: a full sync
// sweeps away what the bucket no longer has; the replica is then ready.
func (r *Replica) caughtUp(full, resync bool, seen *keySet, startLast uint64, ws *watchState) error {
	if full {
		if seen != nil {
			if err := r.sweep(seen); err != nil {
				return fmt.Errorf("sweep: %w", err)
			}
		}
		r.pos.FullPending, r.pos.StaleRevisions = false, false
		if resync {
			r.resyncs.Add(1)
		}
	}
	// Every retained message up to the bucket's last revision at watch start has been
	// delivered by now, so the position may move there even if the last messages were
	// removed before they reached us.
	r.pos.Revision = max(r.pos.Revision, startLast)
	r.pos.CaughtUp = true
	r.pos.LastContact = time.Now()
	if err := r.savePosition(); err != nil {
		return fmt.Errorf("save position: %w", err)
	}
	r.publish()
	r.live.Store(true)
	r.setReady()
	if full {
		for _, w := range ws.waiters {
			w <- nil
		}
		ws.waiters = nil
	}
	r.log.Info("caught up", zap.Bool("full_sync", full), zap.Uint64("revision", r.pos.Revision),
		zap.Uint64("customers", r.pos.Customers), zap.Uint64("applied", r.applied.Load()),
		zap.Uint64("rejected", r.rejected.Load()))
	return nil
}

// stallCheck notices a watch that delivers nothing while the bucket is ahead.
type stallCheck struct {
	received   uint64
	stalled    time.Duration
	reconnects uint64 // the connection's reconnect count when the watch began
}

// check compares the bucket's stream with the replica, every checkInterval and once at
// catch-up. It ends the session (returns an error) when the stream was recreated, went
// backwards, lost keys without a marker, when the watch stalled, or after a reconnect.
func (r *Replica) check(ctx context.Context, kv jetstream.KeyValue, caught bool, ws *watchState, chk *stallCheck) error {
	// After a reconnect the server may have lost the watch's consumer (a restart of a
	// standalone server does): start a new watch at once rather than wait for a stall.
	if n := r.js.Conn().Stats().Reconnects; n != chk.reconnects && r.js.Conn().IsConnected() {
		return fmt.Errorf("%w: reconnected to NATS", errRestart)
	}
	info, err := r.streamInfo(ctx, kv)
	if err != nil {
		if errors.Is(err, jetstream.ErrBucketNotFound) || errors.Is(err, jetstream.ErrStreamNotFound) {
			return fmt.Errorf("bucket %s is gone: %w", r.bucket, jetstream.ErrBucketNotFound)
		}
		r.log.Debug("check bucket", zap.Error(err))
		return nil
	}
	st := info.State
	if !info.Created.Equal(r.pos.StreamCreated) {
		ws.wantFull = true
		return fmt.Errorf("%w: the bucket was recreated", errRestart)
	}
	if st.LastSeq < r.pos.Revision {
		ws.wantFull = true
		return fmt.Errorf("%w: the bucket's last revision %d is behind the replica's %d", errRestart, st.LastSeq, r.pos.Revision)
	}
	if st.LastSeq > r.pos.Revision {
		if ws.received == chk.received {
			chk.stalled += r.checkInterval
			if chk.stalled >= r.stallTimeout {
				return fmt.Errorf("%w: the watch delivered nothing for %s while %d revisions behind",
					errRestart, chk.stalled, st.LastSeq-r.pos.Revision)
			}
		} else {
			chk.stalled = 0
		}
		chk.received = ws.received
		return nil
	}
	chk.stalled, chk.received = 0, ws.received
	if !caught {
		return nil
	}
	// Caught up and nothing pending: the replica holds exactly the bucket's keys, unless
	// some were removed without a marker while it was not watching.
	now := time.Now()
	r.pos.LastContact = now
	r.lastContact.Store(now.UnixNano())
	if err := r.savePosition(); err != nil {
		r.log.Warn("save position", zap.Error(err))
	}
	if st.NumSubjects == r.pos.Subjects {
		return nil
	}
	if now.Sub(ws.lastCountResync) < r.countResyncGap {
		if now.Sub(ws.countWarned) < time.Minute {
			return nil
		}
		ws.countWarned = now
		r.log.Error("the bucket and the replica still hold different numbers of keys after a resync",
			zap.Uint64("bucket_keys", st.NumSubjects), zap.Uint64("local_keys", r.pos.Subjects))
		return nil
	}
	ws.lastCountResync = now
	ws.wantFull = true
	return fmt.Errorf("%w: the bucket has %d keys and the replica %d: keys were removed without a delete marker (PurgeDeletes, a TTL, a stream purge)",
		errRestart, st.NumSubjects, r.pos.Subjects)
}

func (r *Replica) streamInfo(ctx context.Context, kv jetstream.KeyValue) (*jetstream.StreamInfo, error) {
	octx, cancel := context.WithTimeout(ctx, r.opTimeout)
	defer cancel()
	st, err := kv.Status(octx)
	if err != nil {
		return nil, fmt.Errorf("bucket status: %w", err)
	}
	bs, ok := st.(*jetstream.KeyValueBucketStatus)
	if !ok || bs.StreamInfo() == nil {
		return nil, errors.New("bucket status: no stream info")
	}
	return bs.StreamInfo(), nil
}
