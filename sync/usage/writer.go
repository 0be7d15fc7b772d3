package usage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"go.uber.org/zap"
)

// batch is one group commit: the usage of every Record that joined it, written in one
// Badger transaction. Its waiters read err after done is closed.
type batch struct {
	usages []limiter.Usage
	first  time.Time // when the first usage joined
	sealed bool      // full: takes no more usage
	done   chan struct{}
	err    error
}

// writer is the state of the group-commit goroutine; nothing else touches it, except
// failing.
type writer struct {
	seq     uint64                     // last batch sequence written
	agg     map[limiter.CounterKey]int // key -> index in aggs, for the batch at hand
	aggs    []aggEntry                 // the batch's usage, summed per key
	failing atomic.Bool                // the last commit failed; read by Readiness

	// totals is every key's durable quantity, in the order of the commits: overage is
	// computed from it, so that what is published agrees with what is durable even when
	// a crash lost a commit that the limiter had counted before this one.
	totals  map[limiter.CounterKey]*durableTotal
	pruneAt time.Time // next time to forget the totals of ended windows
}

type durableTotal struct{ end, quantity int64 }

type aggEntry struct {
	key   limiter.CounterKey
	d     delta
	total *durableTotal // the key's durable total before this batch
}

func (w *writer) init(sums map[limiter.CounterKey]*counter, now time.Time) {
	w.agg = make(map[limiter.CounterKey]int)
	w.totals = make(map[limiter.CounterKey]*durableTotal, len(sums))
	for k, c := range sums {
		if c.end > now.UnixNano() {
			w.totals[k] = &durableTotal{end: c.end, quantity: c.quantity}
		}
	}
	w.pruneAt = now.Add(time.Minute)
}

// newBatchLocked appends an empty batch to the queue. r.mu is held.
func (r *Recorder) newBatchLocked() *batch {
	b := &batch{done: make(chan struct{})}
	if n := len(r.free); n > 0 {
		b.usages = r.free[n-1]
		r.free[n-1] = nil
		r.free = r.free[:n-1]
	}
	r.queue = append(r.queue, b)
	return b
}

// writeLoop commits batches one after the other until the recorder is closed and the
// queue is empty.
func (r *Recorder) writeLoop() {
	defer close(r.writerDone)
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	busy := false // a batch was just written: start the next one at once
	for {
		b := r.takeBatch(timer, &busy)
		if b == nil {
			return
		}
		err := r.commit(b.usages)
		if err != nil {
			r.w.failing.Store(true)
			r.st.writeErrors.Add(1)
			r.st.setError(err)
			r.log.Error("usage group commit failed; its requests get the error", zap.Int("records", len(b.usages)), zap.Error(err))
		} else {
			r.w.failing.Store(false)
		}
		b.err = err
		r.mu.Lock()
		r.free = append(r.free, b.usages[:0])
		r.mu.Unlock()
		b.usages = nil
		close(b.done)
		busy = true
	}
}

// takeBatch returns the next batch to write. The first usage of a batch normally starts
// its commit at once: while that commit is in flight, the Records that arrive gather in
// the next batch, so batches grow with the load and an idle sidecar adds no wait. With
// CommitInterval > 0 a batch that starts on an idle writer waits up to that long for
// company, unless it fills. It returns nil when the recorder is closed and nothing is
// left.
func (r *Recorder) takeBatch(timer *time.Timer, busy *bool) *batch {
	for {
		r.mu.Lock()
		if len(r.queue) > 0 && len(r.queue[0].usages) > 0 {
			b := r.queue[0]
			wait := r.opts.CommitInterval - time.Since(b.first)
			if *busy || b.sealed || r.state == stateClosed || wait <= 0 {
				copy(r.queue, r.queue[1:])
				r.queue[len(r.queue)-1] = nil
				r.queue = r.queue[:len(r.queue)-1]
				r.mu.Unlock()
				return b
			}
			r.mu.Unlock()
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-r.wake:
				timer.Stop()
			}
			continue
		}
		closed := r.state == stateClosed
		r.mu.Unlock()
		if closed {
			return nil
		}
		*busy = false
		<-r.wake
	}
}

// commit writes one batch as one outbox entry, in one transaction. The entry is also
// the batch's part of the durable counters (see Restore). A batch too big for one
// transaction is split in halves, each one transaction (a crash between them keeps the
// first half, as a crash before the second half's requests arrived would).
func (r *Recorder) commit(us []limiter.Usage) error {
	err := r.commitOnce(us)
	if errors.Is(err, badger.ErrTxnTooBig) && len(us) > 1 {
		r.log.Warn("group commit too big for one Badger transaction: splitting it", zap.Int("records", len(us)))
		if err = r.commit(us[:len(us)/2]); err == nil {
			err = r.commit(us[len(us)/2:])
		}
	}
	return err
}

func (r *Recorder) commitOnce(us []limiter.Usage) error {
	w := &r.w
	clear(w.agg)
	w.aggs = w.aggs[:0]
	size := len(prefixBatch) + 8 + 1 + 8 + binary.MaxVarintLen64
	for i := range us {
		u := &us[i]
		j, ok := w.agg[u.Key]
		if !ok {
			j = len(w.aggs)
			w.agg[u.Key] = j
			w.aggs = append(w.aggs, aggEntry{key: u.Key})
			size += ckSize(&u.Key) + 8 + 3*binary.MaxVarintLen64
		}
		a := &w.aggs[j]
		if a.total == nil {
			if a.total = w.totals[u.Key]; a.total == nil {
				a.total = &durableTotal{}
				w.totals[u.Key] = a.total
			}
		}
		a.d.end = max(a.d.end, u.End)
		a.d.records++
		over := u.Overage
		if u.Limited {
			// Overage is the part beyond the limit of the total in commit order.
			after := a.total.quantity + a.d.quantity + u.Quantity
			over = min(max(after-u.Limit, 0), u.Quantity)
		}
		a.d.quantity += u.Quantity
		a.d.overage += over
	}
	now := r.opts.Now()
	seq := w.seq + 1
	// A new buffer per batch: Badger keeps references to the key and value until the
	// transaction is done, and subscribers may read them a little later.
	buf := batchKey(make([]byte, 0, size), seq)
	n := len(buf)
	buf = appendBatchHeader(buf, now.UnixNano(), len(w.aggs))
	for j := range w.aggs {
		buf = appendBatchEntry(buf, &w.aggs[j].key, &w.aggs[j].d)
	}
	key, val := buf[:n:n], buf[n:]
	txn := r.db.NewTransaction(true)
	defer txn.Discard()
	if err := txn.Set(key, val); err != nil {
		return fmt.Errorf("set outbox batch: %w", err)
	}
	if err := txn.Commit(); err != nil {
		return fmt.Errorf("commit usage batch: %w", err)
	}
	w.seq = seq
	for j := range w.aggs {
		a := &w.aggs[j]
		a.total.quantity += a.d.quantity
		a.total.end = max(a.total.end, a.d.end)
		a.total = nil
	}
	if now.After(w.pruneAt) {
		n := now.UnixNano()
		maps.DeleteFunc(w.totals, func(_ limiter.CounterKey, t *durableTotal) bool { return t.end <= n })
		w.pruneAt = now.Add(time.Minute)
	}
	r.lastBatch.Store(seq)
	r.st.records.Add(uint64(len(us)))
	r.st.batches.Add(1)
	r.st.badgerWrites.Add(1)
	r.st.outboxBatches.Add(1)
	if r.st.outboxBytes.Add(int64(len(buf))) >= r.opts.MaxOutboxBytes {
		r.kickPublisher()
	}
	return nil
}
