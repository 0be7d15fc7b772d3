package usage

import (
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"go.uber.org/zap"
)

// deltaJSONOverhead bounds the JSON bytes of one delta beyond its customer and feature.
const deltaJSONOverhead = 160

// load reads the outbox, the pending message and the acknowledged sequence.
func (r *Recorder) load() error {
	p := &r.p
	p.totals = make(map[limiter.CounterKey]*delta)
	p.counters = make(map[limiter.CounterKey]counter)
	return r.db.View(func(txn *badger.Txn) error {
		item, err := txn.Get([]byte(keyAck))
		switch {
		case err == nil:
			if err := item.Value(func(v []byte) (err error) { p.acked, err = decodeAck(v); return err }); err != nil {
				return fmt.Errorf("%s: %w", keyAck, err)
			}
		case !errors.Is(err, badger.ErrKeyNotFound):
			return err
		}
		r.st.ackedSeq.Store(p.acked.seq)

		var bytes, batches int64
		var maxSeq uint64
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte("u/")})
		defer it.Close()
		for it.Seek([]byte(prefixPending)); it.ValidForPrefix([]byte(prefixPending)); it.Next() {
			item := it.Item()
			size := int64(len(item.Key())) + item.ValueSize()
			v, err := item.ValueCopy(nil)
			if err != nil {
				return err
			}
			if p.pending != nil {
				// Never written so; keep it, publish the first one.
				r.log.Error("more than one pending usage message; publishing the lowest first", zap.Binary("key", item.KeyCopy(nil)))
				bytes += size
				continue
			}
			pm, err := decodePending(binary.BigEndian.Uint64(item.Key()[len(prefixPending):]), v)
			if err != nil {
				return fmt.Errorf("pending message: %w", err)
			}
			pm.size = size
			p.pending = pm
			bytes += size
		}
		for it.Seek([]byte(prefixTotal)); it.ValidForPrefix([]byte(prefixTotal)); it.Next() {
			item := it.Item()
			k, err := counterKey(item.Key(), prefixTotal)
			if err != nil {
				return fmt.Errorf("outbox total key: %w", err)
			}
			var d delta
			if err := item.Value(func(v []byte) (err error) { d, err = decodeTotal(v); return err }); err != nil {
				return fmt.Errorf("outbox total %v: %w", k, err)
			}
			p.totals[k] = &d
			bytes += int64(len(item.Key())) + item.ValueSize()
		}
		for it.Seek([]byte(prefixBatch)); it.ValidForPrefix([]byte(prefixBatch)); it.Next() {
			item := it.Item()
			maxSeq = max(maxSeq, batchSeq(item.Key()))
			bytes += int64(len(item.Key())) + item.ValueSize()
			batches++
		}
		if batches == 0 && len(p.totals) > 0 {
			// Let the folded totals count as batch 1, so that Flush waits for them.
			maxSeq, p.foldedThrough = 1, 1
		}
		r.w.seq = maxSeq
		r.lastBatch.Store(maxSeq)
		r.st.outboxBytes.Store(bytes)
		r.st.outboxBatches.Store(batches)
		r.st.outboxKeys.Store(int64(len(p.totals)))
		if p.pending != nil {
			r.st.pendingSeq.Store(p.pending.seq)
		}
		return nil
	})
}

func decodePending(seq uint64, v []byte) (*pending, error) {
	if len(v) < 8 {
		return nil, errCorrupt
	}
	var m Message
	if err := json.Unmarshal(v[8:], &m); err != nil {
		return nil, err
	}
	if m.Seq != seq {
		return nil, fmt.Errorf("%w: message seq %d under key seq %d", errCorrupt, m.Seq, seq)
	}
	return &pending{
		seq: seq, id: m.ID(), data: v[8:], records: int64(binary.BigEndian.Uint64(v)), deltas: len(m.Deltas),
	}, nil
}

// budgets returns how many delta bytes (estimated JSON) one message may carry and how
// many entries one transaction of the publisher may touch.
func (r *Recorder) budgets() (msgBytes, ops int) {
	// A message should hold every key that is active in a flush interval, so that a
	// backlog drains in few messages. Its value goes to Badger's value log, so its size
	// hardly counts against the transaction's limits.
	msgBytes = 768 << 10 // 3/4 of the default max_payload
	if mp := r.js.Conn().MaxPayload(); mp > 0 {
		msgBytes = min(int(mp/4*3), 4<<20)
	}
	ops = int(min(r.db.MaxBatchCount()/2, 20000))
	if r.p.opsLimit > 0 {
		ops = min(ops, r.p.opsLimit)
	}
	return msgBytes, ops
}

// shrinkOps halves the publisher's transactions after Badger found one too big, so that
// the next attempt fits.
func (r *Recorder) shrinkOps(err error, ops int) {
	if errors.Is(err, badger.ErrTxnTooBig) {
		r.p.opsLimit = max(ops/2, 16)
		r.log.Warn("usage outbox transaction too big for Badger; using smaller ones", zap.Int("entries", r.p.opsLimit))
	}
}

// deltaSet sums deltas per key, with a running estimate of their JSON size.
type deltaSet struct {
	m       map[limiter.CounterKey]*delta
	bytes   int
	records int64
}

func (s *deltaSet) add(k limiter.CounterKey, d *delta) {
	cur := s.m[k]
	if cur == nil {
		cur = &delta{}
		s.m[k] = cur
		s.bytes += len(k.Customer) + len(k.Feature) + deltaJSONOverhead
	}
	cur.add(d)
	s.records += d.records
}

// cut moves outbox content into a new pending message, in one transaction: first the
// folded totals, then batches oldest first, as much as one message carries.
func (r *Recorder) cut() error {
	p := &r.p
	wmark := r.lastBatch.Load() // every batch up to here is visible to the view below
	budget, maxOps := r.budgets()
	set := deltaSet{m: make(map[limiter.CounterKey]*delta)}
	// Each distinct key costs a counter update in the transaction too.
	full := func(ops int) bool { return len(set.m) > 0 && (set.bytes >= budget || ops+len(set.m) >= maxOps) }

	ops := 1
	var takenTotals []limiter.CounterKey
	var totalBytes int64
	for k, d := range p.totals {
		if full(ops) {
			break
		}
		set.add(k, d)
		takenTotals = append(takenTotals, k)
		totalBytes += totalSize(&k)
		ops++
	}
	allTotals := len(takenTotals) == len(p.totals)
	more := !allTotals
	var takenBatches [][]byte
	var batchBytes int64
	var maxSeq uint64
	if allTotals {
		var entries []batchEntry
		err := r.db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefixBatch), PrefetchValues: true, PrefetchSize: 64})
			defer it.Close()
			// Seek past the batches taken before: their tombstones would cost a step each.
			for it.Seek(batchKey(nil, p.batchFloor)); it.Valid(); it.Next() {
				if full(ops) {
					more = true
					return nil
				}
				item := it.Item()
				var err error
				if entries, err = readBatch(item, entries[:0]); err != nil {
					return fmt.Errorf("outbox batch %d: %w", batchSeq(item.Key()), err)
				}
				for i := range entries {
					set.add(entries[i].k, &entries[i].d)
				}
				takenBatches = append(takenBatches, item.KeyCopy(nil))
				batchBytes += int64(len(item.Key())) + item.ValueSize()
				maxSeq = batchSeq(item.Key())
				ops++
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("cut outbox: %w", err)
		}
	}
	p.backlog = more
	covers := p.ackedCovers
	if allTotals {
		covers = max(covers, p.foldedThrough, maxSeq)
		if !more {
			covers = max(covers, wmark)
		}
	}
	if len(set.m) == 0 {
		p.ackedCovers = covers // nothing to publish: everything up to covers is acknowledged
		return nil
	}

	// The usage moves from the outbox to the counters in the cut's transaction, so that
	// each unit is always in exactly one of batches, totals and counters (see Restore).
	if err := r.loadCounters(set.m); err != nil {
		return fmt.Errorf("cut outbox: %w", err)
	}
	counters := make(map[limiter.CounterKey]counter, len(set.m))
	for k, d := range set.m {
		c := p.counters[k]
		counters[k] = counter{end: max(c.end, d.end), quantity: c.quantity + d.quantity, overage: c.overage + d.overage}
	}
	seq := p.acked.seq + 1
	msg, from, to := r.message(seq, set.m)
	data, err := json.Marshal(msg)
	if err != nil {
		return fmt.Errorf("encode message: %w", err)
	}
	key, val := pendingKey(seq), appendPending(nil, set.records, data)
	err = r.db.Update(func(txn *badger.Txn) error {
		if err := txn.Set(key, val); err != nil {
			return err
		}
		for _, k := range takenBatches {
			if err := txn.Delete(k); err != nil {
				return err
			}
		}
		for i := range takenTotals {
			if err := txn.Delete(appendCK([]byte(prefixTotal), &takenTotals[i])); err != nil {
				return err
			}
		}
		for k, c := range counters {
			if err := txn.Set(appendCK([]byte(prefixCounter), &k), appendCounter(nil, c)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		r.shrinkOps(err, maxOps)
		return fmt.Errorf("cut outbox into message %d: %w", seq, err)
	}
	maps.Copy(p.counters, counters)
	if now := r.opts.Now(); now.After(p.pruneAt) {
		horizon := now.Add(-time.Hour).UnixNano()
		maps.DeleteFunc(p.counters, func(_ limiter.CounterKey, c counter) bool { return c.end <= horizon })
		p.pruneAt = now.Add(time.Minute)
	}
	for _, k := range takenTotals {
		delete(p.totals, k)
	}
	if maxSeq > 0 {
		p.batchFloor = maxSeq + 1
	}
	size := int64(len(key) + len(val))
	p.pending = &pending{seq: seq, id: msg.ID(), data: data, size: size, records: set.records, deltas: len(msg.Deltas), covers: covers}
	r.st.pendingSeq.Store(seq)
	r.st.outboxKeys.Add(-int64(len(takenTotals)))
	r.st.outboxBatches.Add(-int64(len(takenBatches)))
	r.st.outboxBytes.Add(size - batchBytes - totalBytes)
	if ce := r.log.Check(zap.DebugLevel, "usage message cut"); ce != nil {
		ce.Write(zap.String("msg_id", p.pending.id), zap.Int("deltas", len(msg.Deltas)), zap.Int64("records", set.records),
			zap.Int("batches", len(takenBatches)), zap.Int("totals", len(takenTotals)), zap.Time("from", from), zap.Time("to", to))
	}
	return nil
}

// loadCounters reads into p.counters the durable counters of the keys of m that it
// does not hold. Only the publisher writes counters, so what it holds is what is stored.
func (r *Recorder) loadCounters(m map[limiter.CounterKey]*delta) error {
	p := &r.p
	var key []byte
	return r.db.View(func(txn *badger.Txn) error {
		for k := range m {
			if _, ok := p.counters[k]; ok {
				continue
			}
			key = appendCK(append(key[:0], prefixCounter...), &k)
			var c counter
			item, err := txn.Get(key)
			switch {
			case errors.Is(err, badger.ErrKeyNotFound):
			case err != nil:
				return fmt.Errorf("read counter: %w", err)
			default:
				if err := item.Value(func(v []byte) (err error) { c, err = decodeCounter(v); return err }); err != nil {
					return fmt.Errorf("read counter %v: %w", k, err)
				}
			}
			p.counters[k] = c
		}
		return nil
	})
}

// message builds message seq from deltas, sorted by customer, feature and window.
func (r *Recorder) message(seq uint64, deltas map[limiter.CounterKey]*delta) (m *Message, from, to time.Time) {
	m = &Message{SidecarID: r.sidecarID, Epoch: r.epoch, Seq: seq, Deltas: make([]Delta, 0, len(deltas))}
	var f, t int64
	first := true
	for k, d := range deltas {
		if first || d.from < f {
			f = d.from
		}
		if first || d.to > t {
			t = d.to
		}
		first = false
		m.Deltas = append(m.Deltas, Delta{
			CustomerID: k.Customer, Feature: k.Feature, WindowStart: time.Unix(0, k.WindowStart).UTC(),
			Quantity: d.quantity, Overage: d.overage,
		})
	}
	slices.SortFunc(m.Deltas, func(a, b Delta) int {
		return cmp.Or(cmp.Compare(a.CustomerID, b.CustomerID), cmp.Compare(a.Feature, b.Feature), a.WindowStart.Compare(b.WindowStart))
	})
	m.From, m.To = time.Unix(0, f).UTC(), time.Unix(0, t).UTC()
	return m, m.From, m.To
}

type batchEntry struct {
	k limiter.CounterKey
	d delta
}

func readBatch(item *badger.Item, out []batchEntry) ([]batchEntry, error) {
	err := item.Value(func(v []byte) error {
		return decodeBatch(v, func(k limiter.CounterKey, d delta) { out = append(out, batchEntry{k, d}) })
	})
	return out, err
}

func totalSize(k *limiter.CounterKey) int64 { return int64(len(prefixTotal) + ckSize(k) + 48) }

// maybeFold applies the outbox bound: once the outbox holds MaxOutboxBytes, its batches
// are folded into one total per (customer, feature, window), so that its size follows
// the number of distinct keys rather than the number of requests. Usage is never dropped.
func (r *Recorder) maybeFold() {
	bytes := r.st.outboxBytes.Load()
	if bytes < r.opts.MaxOutboxBytes || r.st.outboxBatches.Load() == 0 {
		return
	}
	if time.Since(r.p.lastFold) < min(r.opts.FlushInterval, 250*time.Millisecond) {
		return
	}
	r.p.lastFold = time.Now()
	if !r.st.atBound.Swap(true) {
		r.log.Warn("usage outbox reached its bound: folding batches into per-key totals; admission and counting go on, nothing is dropped",
			zap.Int64("outbox_bytes", bytes), zap.Int64("max_outbox_bytes", r.opts.MaxOutboxBytes))
	}
	folded, err := r.fold()
	if err != nil {
		r.st.setError(err)
		r.log.Error("usage outbox fold failed; the outbox keeps growing", zap.Error(err))
		return
	}
	r.st.compactions.Add(1)
	after := r.st.outboxBytes.Load()
	r.log.Info("usage outbox folded", zap.Int("batches", folded), zap.Int("keys", len(r.p.totals)),
		zap.Int64("bytes_before", bytes), zap.Int64("bytes_after", after))
	if after >= r.opts.MaxOutboxBytes {
		r.log.Warn("usage outbox is over its bound even folded (too many distinct customer, feature and window keys); admission and counting go on",
			zap.Int64("outbox_bytes", after), zap.Int("keys", len(r.p.totals)))
	}
}

// fold folds every batch into the totals, in transactions that each delete some batches
// and write the totals they change.
func (r *Recorder) fold() (int, error) {
	p := &r.p
	_, maxOps := r.budgets()
	folded := 0
	var entries []batchEntry
	for {
		changed := make(map[limiter.CounterKey]*delta)
		var keys [][]byte
		var bytes int64
		var maxSeq uint64
		more := false
		err := r.db.View(func(txn *badger.Txn) error {
			it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefixBatch), PrefetchValues: true, PrefetchSize: 64})
			defer it.Close()
			for it.Seek(batchKey(nil, p.batchFloor)); it.Valid(); it.Next() {
				if len(keys)+len(changed) >= maxOps {
					more = true
					return nil
				}
				item := it.Item()
				var err error
				if entries, err = readBatch(item, entries[:0]); err != nil {
					return fmt.Errorf("outbox batch %d: %w", batchSeq(item.Key()), err)
				}
				for i := range entries {
					e := &entries[i]
					d := changed[e.k]
					if d == nil {
						d = &delta{}
						if old := p.totals[e.k]; old != nil {
							*d = *old
						}
						changed[e.k] = d
					}
					d.add(&e.d)
				}
				keys = append(keys, item.KeyCopy(nil))
				bytes += int64(len(item.Key())) + item.ValueSize()
				maxSeq = batchSeq(item.Key())
			}
			return nil
		})
		if err != nil || len(keys) == 0 {
			return folded, err
		}
		err = r.db.Update(func(txn *badger.Txn) error {
			for _, k := range keys {
				if err := txn.Delete(k); err != nil {
					return err
				}
			}
			for k, d := range changed {
				if err := txn.Set(appendCK([]byte(prefixTotal), &k), appendTotal(nil, d)); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			r.shrinkOps(err, maxOps)
			return folded, fmt.Errorf("fold outbox: %w", err)
		}
		for k, d := range changed {
			if p.totals[k] == nil {
				r.st.outboxKeys.Add(1)
				bytes -= totalSize(&k)
			}
			p.totals[k] = d
		}
		p.foldedThrough = max(p.foldedThrough, maxSeq)
		p.batchFloor = maxSeq + 1
		r.st.outboxBatches.Add(-int64(len(keys)))
		r.st.outboxBytes.Add(-bytes)
		folded += len(keys)
		if !more {
			return folded, nil
		}
	}
}
