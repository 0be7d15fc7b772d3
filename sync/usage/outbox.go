package usage

import (
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"go.uber.org/zap"
)

// maxCutBatches bounds the batches one message takes, so that one cut takes bounded
// time after a long outage.
const maxCutBatches = 1 << 16

// deltaJSONOverhead bounds the JSON bytes of one delta beyond its customer and feature.
const deltaJSONOverhead = 160

// load reads the outbox, the messages (pending and acknowledged but not yet settled into
// the counters) and the publisher's marks.
func (r *Recorder) load() error {
	p := &r.p
	p.totals = make(map[limiter.CounterKey]*delta)
	p.counters = make(map[limiter.CounterKey]counter)
	return r.db.View(func(txn *badger.Txn) error {
		if err := getValue(txn, keyAck, func(v []byte) (err error) { p.acked, err = decodeAck(v); return err }); err != nil {
			return err
		}
		if err := getValue(txn, keyFloor, func(v []byte) (err error) { p.batchFloor, err = decodeU64(v); return err }); err != nil {
			return err
		}
		if err := getValue(txn, keySettled, func(v []byte) (err error) { p.settled, err = decodeSettleMark(v); return err }); err != nil {
			return err
		}
		r.st.ackedSeq.Store(p.acked.seq)

		var bytes, batches int64
		var maxSeq uint64
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte("u/")})
		defer it.Close()
		for it.Seek([]byte(prefixPending)); it.ValidForPrefix([]byte(prefixPending)); it.Next() {
			item := it.Item()
			seq := binary.BigEndian.Uint64(item.Key()[len(prefixPending):])
			v, err := item.ValueCopy(nil)
			if err != nil {
				return err
			}
			mv, err := decodeMessageValue(v)
			if err != nil {
				return fmt.Errorf("usage message %d: %w", seq, err)
			}
			switch {
			case seq <= p.acked.seq && !mv.counted && seq >= p.settled.seq:
				// Acknowledged; its deltas are still to be settled into the counters.
				p.log = append(p.log, &logMsg{seq: seq, entries: mv.entries})
			case seq <= p.acked.seq:
				p.dead = append(p.dead, item.KeyCopy(nil)) // acknowledged and counted
			case seq == p.acked.seq+1 && p.pending == nil:
				pm, err := r.newPending(seq, mv)
				if err != nil {
					return fmt.Errorf("pending message: %w", err)
				}
				pm.size = int64(len(item.Key())) + item.ValueSize()
				p.pending = pm
				bytes += pm.size
			default:
				// Never written so; keep it for an operator.
				r.log.Error("unexpected usage message in the outbox; left alone", zap.Uint64("seq", seq),
					zap.Uint64("acked_seq", p.acked.seq))
			}
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
			seq := batchSeq(item.Key())
			maxSeq = max(maxSeq, seq)
			if seq < p.batchFloor {
				p.dead = append(p.dead, item.KeyCopy(nil)) // in a message already
				continue
			}
			bytes += int64(len(item.Key())) + item.ValueSize()
			batches++
		}
		maxSeq = max(maxSeq, p.batchFloor-min(p.batchFloor, 1))
		if batches == 0 && len(p.totals) > 0 {
			// Let the folded totals count as one more batch, so that Flush waits for them.
			maxSeq++
			p.foldedThrough = maxSeq
		}
		r.w.seq = maxSeq
		r.lastBatch.Store(maxSeq)
		r.st.outboxBytes.Store(bytes)
		r.st.outboxBatches.Store(batches)
		r.st.outboxKeys.Store(int64(len(p.totals)))
		r.st.unsettled.Store(int64(len(p.log)))
		if p.pending != nil {
			r.st.pendingSeq.Store(p.pending.seq)
		}
		return nil
	})
}

// getValue calls fn with the value of key, if it is there.
func getValue(txn *badger.Txn, key string, fn func([]byte) error) error {
	item, err := txn.Get([]byte(key))
	switch {
	case errors.Is(err, badger.ErrKeyNotFound):
		return nil
	case err != nil:
		return fmt.Errorf("%s: %w", key, err)
	}
	if err := item.Value(fn); err != nil {
		return fmt.Errorf("%s: %w", key, err)
	}
	return nil
}

func (r *Recorder) newPending(seq uint64, mv messageValue) (*pending, error) {
	if !mv.counted {
		return &pending{
			seq: seq, id: MsgID(r.sidecarID, r.epoch, seq), records: mv.records, deltas: len(mv.entries),
			data: appendMessageJSON(nil, r.sidecarID, r.epoch, seq, mv.from, mv.to, mv.entries), entries: mv.entries,
		}, nil
	}
	var m Message
	if err := json.Unmarshal(mv.json, &m); err != nil {
		return nil, err
	}
	if m.Seq != seq {
		return nil, fmt.Errorf("%w: message seq %d under key seq %d", errCorrupt, m.Seq, seq)
	}
	return &pending{seq: seq, id: m.ID(), data: mv.json, records: mv.records, deltas: len(m.Deltas), counted: true}, nil
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

// deltaSet sums deltas per key, in the order the keys first came, with a running
// estimate of their JSON size. Its index is reused from cut to cut.
type deltaSet struct {
	idx     map[limiter.CounterKey]int // key -> position in es
	es      []batchEntry
	bytes   int
	records int64
}

func (s *deltaSet) add(k limiter.CounterKey, d *delta) {
	i, ok := s.idx[k]
	if !ok {
		i = len(s.es)
		s.idx[k] = i
		s.es = append(s.es, batchEntry{k: k})
		s.bytes += len(k.Customer) + len(k.Feature) + deltaJSONOverhead
	}
	s.es[i].d.add(d)
	s.records += d.records
}

// cut moves outbox content into a new pending message, in one transaction: first the
// folded totals, then batches oldest first, as much as one message carries.
func (r *Recorder) cut() error {
	p := &r.p
	wmark := r.lastBatch.Load() // every batch up to here is visible to the view below
	budget, maxOps := r.budgets()
	if p.setIdx == nil {
		p.setIdx = make(map[limiter.CounterKey]int)
	}
	clear(p.setIdx)
	set := deltaSet{idx: p.setIdx}
	// Each folded total taken costs a deletion in the cut's transaction; batches cost
	// nothing there (the floor covers them), but one cut reads at most maxCutBatches.
	full := func(ops int) bool { return len(set.es) > 0 && (set.bytes >= budget || ops >= maxOps) }

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
				if full(ops) || len(takenBatches) >= maxCutBatches {
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
	if len(set.es) == 0 {
		p.ackedCovers = covers // nothing to publish: everything up to covers is acknowledged
		return nil
	}

	// The cut's transaction is small whatever the load: the message (one entry), the
	// floor below which batches are in a message (their deletion follows in the
	// background, see sweepStep) and the folded totals it took. The usage moves into the
	// counters after the acknowledgement, in small steps (see settleStep).
	seq := p.acked.seq + 1
	entries := set.es
	sortEntries(entries)
	from, to := entries[0].d.from, entries[0].d.to
	for i := range entries {
		from, to = min(from, entries[i].d.from), max(to, entries[i].d.to)
	}
	key, val := pendingKey(seq), appendMessageValue(make([]byte, 0, 64+len(entries)*40), set.records, from, to, entries)
	data := appendMessageJSON(make([]byte, 0, set.bytes+256), r.sidecarID, r.epoch, seq, from, to, entries)
	err := r.db.Update(func(txn *badger.Txn) error {
		if err := txn.Set(key, val); err != nil {
			return err
		}
		if maxSeq > 0 {
			if err := txn.Set([]byte(keyFloor), encodeU64(maxSeq+1)); err != nil {
				return err
			}
		}
		for i := range takenTotals {
			if err := txn.Delete(appendCK([]byte(prefixTotal), &takenTotals[i])); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		r.shrinkOps(err, maxOps)
		return fmt.Errorf("cut outbox into message %d: %w", seq, err)
	}
	for _, k := range takenTotals {
		delete(p.totals, k)
	}
	if maxSeq > 0 {
		p.batchFloor = maxSeq + 1
	}
	p.dead = append(p.dead, takenBatches...)
	size := int64(len(key) + len(val))
	p.pending = &pending{seq: seq, id: MsgID(r.sidecarID, r.epoch, seq), data: data, size: size, records: set.records,
		deltas: len(entries), covers: covers, entries: entries}
	r.st.pendingSeq.Store(seq)
	r.st.outboxKeys.Add(-int64(len(takenTotals)))
	r.st.outboxBatches.Add(-int64(len(takenBatches)))
	r.st.outboxBytes.Add(size - batchBytes - totalBytes)
	if ce := r.log.Check(zap.DebugLevel, "usage message cut"); ce != nil {
		ce.Write(zap.String("msg_id", p.pending.id), zap.Int("deltas", len(entries)), zap.Int64("records", set.records),
			zap.Int("batches", len(takenBatches)), zap.Int("totals", len(takenTotals)),
			zap.Time("from", time.Unix(0, from)), zap.Time("to", time.Unix(0, to)))
	}
	return nil
}

// loadCounters reads into p.counters the durable counters of the keys of es that it
// does not hold. Only the publisher writes counters, so what it holds is what is stored.
func (r *Recorder) loadCounters(es []batchEntry) error {
	p := &r.p
	var key []byte
	return r.db.View(func(txn *badger.Txn) error {
		for i := range es {
			k := &es[i].k
			if _, ok := p.counters[*k]; ok {
				continue
			}
			key = appendCK(append(key[:0], prefixCounter...), k)
			var c counter
			item, err := txn.Get(key)
			switch {
			case errors.Is(err, badger.ErrKeyNotFound):
			case err != nil:
				return fmt.Errorf("read counter: %w", err)
			default:
				if err := item.Value(func(v []byte) (err error) { c, err = decodeCounter(v); return err }); err != nil {
					return fmt.Errorf("read counter %v: %w", *k, err)
				}
			}
			p.counters[*k] = c
		}
		return nil
	})
}

// sortEntries orders a message's deltas by customer, feature and window.
func sortEntries(es []batchEntry) {
	slices.SortFunc(es, func(a, b batchEntry) int {
		if c := strings.Compare(a.k.Customer, b.k.Customer); c != 0 { // cmp.Or would compute all three
			return c
		}
		if c := strings.Compare(a.k.Feature, b.k.Feature); c != 0 {
			return c
		}
		return cmp.Compare(a.k.WindowStart, b.k.WindowStart)
	})
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
	// Folding is paced while the outbox is near its bound, not once it is well past it
	// (group commits can outpace the pace).
	if bytes < 2*r.opts.MaxOutboxBytes && time.Since(r.p.lastFold) < min(r.opts.FlushInterval, 250*time.Millisecond) {
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
