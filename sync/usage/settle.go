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

// settleStep settles the next chunk of the merged pass under way, starting one when it
// is due (settleDue): it adds up to Recorder.settleChunk keys' sums to the counters and
// moves the settle mark past them, in one transaction; the pass's last step deletes its
// messages. A pass merges several acknowledged messages so that each key is written
// once per pass, not once per message. So each unit is, at every moment, in exactly one
// of a message not settled as far as the mark says and a counter (see Restore).
func (r *Recorder) settleStep() error {
	p := &r.p
	if p.pass == nil {
		if !r.settleDue(time.Now()) {
			return nil
		}
		r.startPass()
	}
	ps := p.pass
	to := min(ps.pos+r.settleChunk, len(ps.es))
	chunk := ps.es[ps.pos:to]
	if err := r.loadCounters(chunk); err != nil {
		return err
	}
	done := to == len(ps.es)
	next := idleMark(ps.hi + 1)
	if !done {
		next = settleMark{lo: ps.lo, hi: ps.hi, key: ps.es[to].k, hasKey: true}
	}
	updated := make([]counter, len(chunk))
	var key []byte
	p.br.yield()
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
			for _, m := range p.log[:ps.n] {
				if err := txn.Delete(pendingKey(m.seq)); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("settle messages %d to %d: %w", ps.lo, ps.hi, err)
	}
	if r.hooks.afterSettle != nil && r.hooks.afterSettle() {
		r.crashed.Store(true)
		return nil
	}
	for i := range chunk {
		p.counters[chunk[i].k] = updated[i]
	}
	p.settled, ps.pos = next, to
	if done {
		clear(p.log[:ps.n])
		p.log = p.log[ps.n:]
		p.pass = nil
		r.st.unsettled.Store(int64(len(p.log)))
	}
	if now := r.opts.Now(); now.After(p.pruneAt) {
		horizon := now.Add(-time.Hour).UnixNano()
		maps.DeleteFunc(p.counters, func(_ limiter.CounterKey, c counter) bool { return c.end <= horizon })
		p.pruneAt = now.Add(time.Minute)
	}
	return nil
}

// settlePass is a merged settling pass under way over messages lo..hi, the first n of
// p.log: their unsettled deltas summed per key, in key order, settled up to pos.
type settlePass struct {
	lo, hi uint64
	n      int
	es     []batchEntry
	pos    int
}

// settleDue reports whether a settling pass should start: one cut short by a restart
// is resumed at once; otherwise a pass waits for settleMessages acknowledged messages,
// for settleEntries deltas in them, or for the oldest to be settleAfter old.
func (r *Recorder) settleDue(now time.Time) bool {
	p := &r.p
	if len(p.log) == 0 {
		return false
	}
	if p.settled.lo <= p.settled.hi {
		return true
	}
	if len(p.log) >= r.settleMessages || now.Sub(p.log[0].at) >= r.settleAfter {
		return true
	}
	n := 0
	for _, m := range p.log {
		n += len(m.entries)
	}
	return n >= r.settleEntries
}

// startPass starts a settling pass: the one the mark says is under way, or one over the
// oldest acknowledged messages, as many as settleMessages and settleEntries allow (at
// least one).
func (r *Recorder) startPass() {
	p := &r.p
	ps := &settlePass{}
	if p.settled.lo <= p.settled.hi {
		ps.lo, ps.hi = p.settled.lo, p.settled.hi
		for ps.n < len(p.log) && p.log[ps.n].seq <= ps.hi {
			ps.n++
		}
	} else {
		entries := 0
		for ps.n < len(p.log) && ps.n < r.settleMessages && (ps.n == 0 || entries+len(p.log[ps.n].entries) <= r.settleEntries) {
			entries += len(p.log[ps.n].entries)
			ps.n++
		}
		ps.lo, ps.hi = p.log[0].seq, p.log[ps.n-1].seq
	}
	parts := make([][]batchEntry, 0, ps.n)
	for _, m := range p.log[:ps.n] {
		if es := p.settled.unsettled(m.seq, m.entries); len(es) > 0 {
			parts = append(parts, es)
		}
	}
	ps.es = mergeEntries(parts, &p.br)
	p.pass = ps
}

// mergeEntries merges lists of deltas in key order (each key at most once in a list)
// into one, in key order, with the deltas of one key summed. It merges all the lists at
// once, through a heap of their heads, into one slice: each delta is compared about
// log2(len(parts)) times, and the pass allocates its result only. Merging the lists in
// pairs allocated a slice per pair and level, 30 MB a pass at 5,000 requests a second
// over 10,000 customers, most of the publisher's garbage. It consumes parts (advances
// the lists in it). The result may be one of the lists itself; the pass only reads it.
func mergeEntries(parts [][]batchEntry, br *breather) []batchEntry {
	m := mergeHeap{parts: parts, h: make([]int, 0, len(parts))}
	longest := 0
	for i, p := range parts {
		if len(p) > 0 {
			m.h = append(m.h, i)
			longest = max(longest, len(p))
		}
	}
	switch len(m.h) {
	case 0:
		return nil
	case 1:
		return parts[m.h[0]]
	}
	for i := len(m.h)/2 - 1; i >= 0; i-- {
		m.down(i)
	}
	// The messages of a pass carry mostly the same keys: the result is about as long
	// as the longest of them.
	out := make([]batchEntry, 0, longest+longest/4)
	for n := 1; len(m.h) > 0; n++ {
		if n%yieldEvery == 0 {
			br.yield()
		}
		top := m.h[0]
		e := &parts[top][0]
		if last := len(out) - 1; last >= 0 && compareKeys(&out[last].k, &e.k) == 0 {
			out[last].d.add(&e.d)
		} else {
			out = append(out, *e)
		}
		if parts[top] = parts[top][1:]; len(parts[top]) == 0 {
			m.h[0] = m.h[len(m.h)-1]
			m.h = m.h[:len(m.h)-1]
		}
		m.down(0)
	}
	return out
}

// mergeHeap is a min-heap of the indexes of the non-empty lists in parts, by the key
// of each list's first delta.
type mergeHeap struct {
	parts [][]batchEntry
	h     []int
}

func (m *mergeHeap) less(i, j int) bool {
	return compareKeys(&m.parts[m.h[i]][0].k, &m.parts[m.h[j]][0].k) < 0
}

func (m *mergeHeap) down(i int) {
	for n := len(m.h); ; {
		j := 2*i + 1
		if j >= n {
			return
		}
		if r := j + 1; r < n && m.less(r, j) {
			j = r
		}
		if !m.less(j, i) {
			return
		}
		m.h[i], m.h[j] = m.h[j], m.h[i]
		i = j
	}
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
