package usage

import (
	"fmt"
	"maps"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"go.uber.org/zap"
)

// housekeep does one step of settling and one of sweeping, and reports whether more is
// left to do. The publisher calls it between its other steps.
func (r *Recorder) housekeep() (more bool) {
	p := &r.p
	if time.Now().Before(p.houseErr) {
		return false
	}
	if err := r.settleStep(); err != nil {
		r.houseFailed("settling acknowledged usage into the counters", err)
		return false
	}
	if r.crashed.Load() {
		return false
	}
	if err := r.sweepStep(); err != nil {
		r.houseFailed("deleting published outbox entries", err)
		return false
	}
	return len(p.log) > 0 || len(p.dead) > 0 && r.sweepChunk > 0 || r.sweepChunk > 0 && r.j.sweepable(p.logFloor)
}

func (r *Recorder) houseFailed(what string, err error) {
	r.st.setError(err)
	r.p.houseErr = time.Now().Add(r.minBackoff)
	r.log.Warn("usage housekeeping failed; retrying", zap.String("step", what), zap.Error(err))
}

// settleStep adds up to Recorder.settleChunk deltas of the oldest acknowledged message to the
// counters, and moves the settle mark past them, in one transaction; the last step of
// a message deletes it. So each unit is, at every moment, in exactly one of a message
// at or past the mark and a counter (see Restore).
func (r *Recorder) settleStep() error {
	p := &r.p
	if len(p.log) == 0 {
		return nil
	}
	m := p.log[0]
	from := uint64(0)
	if p.settled.seq == m.seq {
		from = p.settled.index
	}
	to := min(from+uint64(r.settleChunk), uint64(len(m.entries)))
	chunk := m.entries[from:to]
	if err := r.loadCounters(chunk); err != nil {
		return err
	}
	next, done := settleMark{seq: m.seq, index: to}, to == uint64(len(m.entries))
	if done {
		next = settleMark{seq: m.seq + 1}
	}
	updated := make([]counter, len(chunk))
	var key []byte
	err := r.update(func(txn *badger.Txn) error {
		for i := range chunk {
			e := &chunk[i]
			c := p.counters[e.k]
			c.end = max(c.end, e.d.end)
			c.quantity += e.d.quantity
			c.overage += e.d.overage
			updated[i] = c
			key = appendCK(append(key[:0:0], prefixCounter...), &e.k) // Badger keeps the key until commit
			if err := txn.Set(key, appendCounter(nil, c)); err != nil {
				return err
			}
		}
		if err := txn.Set([]byte(keySettled), next.encode()); err != nil {
			return err
		}
		if done {
			return txn.Delete(pendingKey(m.seq))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("settle message %d: %w", m.seq, err)
	}
	if r.hooks.afterSettle != nil && r.hooks.afterSettle() {
		r.crashed.Store(true)
		return nil
	}
	for i := range chunk {
		p.counters[chunk[i].k] = updated[i]
	}
	p.settled = next
	if done {
		p.log[0] = nil
		p.log = p.log[1:]
		r.st.unsettled.Store(int64(len(p.log)))
	}
	if now := r.opts.Now(); now.After(p.pruneAt) {
		horizon := now.Add(-time.Hour).UnixNano()
		maps.DeleteFunc(p.counters, func(_ limiter.CounterKey, c counter) bool { return c.end <= horizon })
		p.pruneAt = now.Add(time.Minute)
	}
	return nil
}

// sweepStep deletes the log segments wholly below the floor (they are in messages), and
// up to Recorder.sweepChunk messages that were settled by an earlier version. Nothing
// depends on when they go: load and Restore skip them.
func (r *Recorder) sweepStep() error {
	p := &r.p
	if r.sweepChunk == 0 {
		return nil
	}
	if err := r.sweepLog(); err != nil {
		return err
	}
	n := min(len(p.dead), r.sweepChunk)
	if n == 0 {
		return nil
	}
	err := r.update(func(txn *badger.Txn) error {
		for _, k := range p.dead[:n] {
			if err := txn.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete %d published outbox entries: %w", n, err)
	}
	clear(p.dead[:n])
	p.dead = p.dead[n:]
	if len(p.dead) == 0 {
		p.dead = nil
	}
	return nil
}

// sweepLog deletes the log segments wholly below the floor, after syncing the database,
// so that the floor that makes them useless reaches the disk before they leave it.
func (r *Recorder) sweepLog() error {
	if !r.j.sweepable(r.p.logFloor) {
		return nil
	}
	if err := r.db.Sync(); err != nil {
		return fmt.Errorf("sync before deleting published usage log segments: %w", err)
	}
	n, err := r.j.sweep(r.p.logFloor)
	if n > 0 {
		if ce := r.log.Check(zap.DebugLevel, "usage log segments deleted"); ce != nil {
			ce.Write(zap.Int("segments", n), zap.Uint64("floor", r.p.logFloor))
		}
	}
	return err
}
