package usage

import (
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

// maxCutRecords bounds the log records one message takes, so that one cut takes bounded
// time after a long outage.
const maxCutRecords = 1 << 18

// deltaJSONOverhead bounds the JSON bytes of one delta beyond its customer and feature.
const deltaJSONOverhead = 160

// load reads the folded totals, the messages (pending and acknowledged but not yet
// settled into the counters) and the publisher's marks; the log is read after it.
func (r *Recorder) load() error {
	p := &r.p
	p.totals = make(map[limiter.CounterKey]*delta)
	p.counters = make(map[limiter.CounterKey]counter)
	p.settled = idleMark(1)
	return r.db.View(func(txn *badger.Txn) error {
		if err := getValue(txn, keyAck, func(v []byte) (err error) { p.acked, err = decodeAck(v); return err }); err != nil {
			return err
		}
		if err := getValue(txn, keyLogFloor, func(v []byte) (err error) { p.logFloor, err = decodeU64(v); return err }); err != nil {
			return err
		}
		if err := getValue(txn, keySettled, func(v []byte) (err error) { p.settled, err = decodeSettleMark(v); return err }); err != nil {
			return err
		}
		r.st.ackedSeq.Store(p.acked.seq)

		var bytes int64
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
			case seq <= p.acked.seq && !mv.counted && seq >= p.settled.lo:
				// Acknowledged; its deltas are still to be settled into the counters.
				p.log = append(p.log, &logMsg{seq: seq, entries: mv.entries, at: time.Now()})
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
		if len(p.totals) > 0 {
			p.foldedThrough = p.logFloor // Flush waits for the folded totals too
		}
		p.ackedCovers = p.logFloor
		if len(p.totals) > 0 || p.pending != nil {
			p.ackedCovers = 0
		}
		r.st.outboxBytes.Store(bytes)
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
			data: appendMessageJSON(nil, r.sidecarID, r.epoch, seq, mv.from, mv.to, mv.entries, nil), entries: mv.entries,
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
	idx     map[limiter.CounterKey]int // key -> position in es, once indexed
	indexed bool                       // idx holds every key of es (see entryLogged)
	gen     uint64                     // the set's generation in p.keys
	durable map[limiter.CounterKey]*durableTotal
	durGen  uint64 // p.durableGen while the set is filled (p.durable does not change then)
	es      []batchEntry
	logged  []int64 // per entry of es: its quantity from the log (not yet in p.durable)
	before  []int64 // per entry of es: its durable quantity outside the log (p.durable)
	bytes   int
	records int64
}

// entry returns the position of k's delta, adding one if it has none.
func (s *deltaSet) entry(k limiter.CounterKey) int {
	if !s.indexed {
		for i := range s.es {
			s.idx[s.es[i].k] = i
		}
		s.indexed = true
	}
	i, ok := s.idx[k]
	if !ok {
		i = s.push(k, nil)
		s.idx[k] = i
	}
	return i
}

// entryLogged returns the position of the delta of a key read from the log that is not
// in the set yet (its keySlot says so). Until a folded total joins the set, only the log's
// keys are in it, each once (keySlot), so no index is needed.
func (s *deltaSet) entryLogged(sl *keySlot) int {
	if s.indexed {
		return s.entry(sl.k)
	}
	return s.push(sl.k, sl)
}

// push adds k's delta; sl is k's slot when it came from the log, else nil.
func (s *deltaSet) push(k limiter.CounterKey, sl *keySlot) int {
	s.es = append(s.es, batchEntry{k: k})
	s.logged = append(s.logged, 0)
	var before int64
	if t := durableOf(s.durable, s.durGen, k, sl); t != nil {
		before = t.quantity
	}
	s.before = append(s.before, before)
	s.bytes += len(k.Customer) + len(k.Feature) + deltaJSONOverhead
	return len(s.es) - 1
}

func (s *deltaSet) add(k limiter.CounterKey, d *delta) {
	s.es[s.entry(k)].d.add(d)
	s.records += d.records
}

// addLogged adds one usage of a log record. The overage of a limited feature is the part
// beyond the limit of the key's durable total in log order: what is outside the log
// (p.durable, which does not change while a set is filled), plus what this set took
// from the log before it.
func (r *Recorder) addLogged(s *deltaSet, at int64, e *logEntry) {
	sl := e.key
	if sl.gen != s.gen {
		sl.i, sl.gen = s.entryLogged(sl), s.gen
		if s.es[sl.i].slot == nil {
			s.es[sl.i].slot = sl // (an entry made by a folded total has none)
		}
	}
	i := sl.i
	d := delta{end: e.end, from: at, to: at, records: 1, quantity: e.quantity, overage: e.x}
	if e.limited {
		after := s.before[i] + s.logged[i] + e.quantity
		d.overage = min(max(after-e.x, 0), e.quantity)
	}
	s.logged[i] += e.quantity
	s.es[i].d.add(&d)
	s.records++
}

// settleLogged adds what the set took from the log to p.durable, once the transaction
// that moved it out of the log committed.
func (r *Recorder) settleLogged(s *deltaSet) {
	p := &r.p
	for i := range s.es {
		if i%yieldEvery == yieldEvery-1 {
			p.br.yield()
		}
		if s.logged[i] == 0 && s.es[i].d.records == 0 {
			continue
		}
		k, sl := s.es[i].k, s.es[i].slot
		t := durableOf(p.durable, p.durableGen, k, sl)
		if t == nil {
			t = &durableTotal{}
			p.durable[k] = t
			if sl != nil {
				sl.dur, sl.durGen = t, p.durableGen
			}
		}
		t.quantity += s.logged[i]
		t.end = max(t.end, s.es[i].d.end)
	}
	if now := r.opts.Now(); now.After(p.pruneDurableAt) {
		n := now.UnixNano()
		maps.DeleteFunc(p.durable, func(_ limiter.CounterKey, t *durableTotal) bool { return t.end <= n })
		p.durableGen++ // the slots' pointers may name totals no longer in the map
		p.pruneDurableAt = now.Add(time.Minute)
	}
}

// durableTotal is a key's durable quantity outside the log.
type durableTotal struct{ end, quantity int64 }

// durableOf returns k's total in durable, which is in generation gen, or nil. sl, k's
// slot when k came from the log, remembers the total it found: a slot is read on every
// cut that has usage of its key, and the map's keys are two strings to hash and compare,
// from memory more often than not. A total stays in the map until a prune, which starts
// a new generation; so a remembered total of this generation is the map's.
func durableOf(durable map[limiter.CounterKey]*durableTotal, gen uint64, k limiter.CounterKey, sl *keySlot) *durableTotal {
	if sl != nil && sl.dur != nil && sl.durGen == gen {
		return sl.dur
	}
	t := durable[k]
	if sl != nil && t != nil {
		sl.dur, sl.durGen = t, gen
	}
	return t
}

// readLog adds to s the log records from pos up to end, until full says the set is
// full; it returns the position after the last record taken and whether records were
// left behind.
func (r *Recorder) readLog(s *deltaSet, pos, end uint64, full func() bool, maxRecords int) (_ uint64, taken int, more bool, err error) {
	add := func(at int64, e *logEntry) { r.addLogged(s, at, e) }
	for pos < end {
		if full() || taken >= maxRecords {
			return pos, taken, true, nil
		}
		payload, after, err := r.j.next(pos, end)
		if err != nil {
			return pos, taken, false, err
		}
		if payload == nil {
			return after, taken, false, nil
		}
		if err := decodeRecord(payload, &r.p.keys, add); err != nil {
			return pos, taken, false, fmt.Errorf("usage log record at %d: %w", pos, err)
		}
		pos = after
		taken++
		if taken%yieldEvery == 0 {
			// A cut reads a second of records in one go (30,000 at saturation, ~10 ms):
			// let the requests queued behind it on this P run in between.
			r.p.br.yield()
		}
	}
	return pos, taken, false, nil
}

// yieldEvery is how many log records (or deltas) the publisher handles between yields
// (breather.yield): about 0.05 ms of work.
const yieldEvery = 128

// newSet starts the next message's delta set. It starts with room for as many deltas
// as the last cut took, and with that cut's per-delta scratch, so that a set of tens of
// thousands of deltas does not grow by doubling every interval (the largest of the
// publisher's allocations otherwise, and the collections they bring).
func (r *Recorder) newSet() deltaSet {
	p := &r.p
	p.ahead = nil // it shares setIdx
	if p.setIdx == nil {
		p.setIdx = make(map[limiter.CounterKey]int)
	}
	clear(p.setIdx)
	s := deltaSet{idx: p.setIdx, gen: p.keys.newSet(), durable: p.durable, durGen: p.durableGen}
	if n := p.lastSet + p.lastSet/8; n > 0 {
		s.es = make([]batchEntry, 0, n) // the message keeps it: never reused
		s.logged, s.before = p.spareLogged[:0], p.spareBefore[:0]
		p.spareLogged, p.spareBefore = nil, nil
		if cap(s.logged) < n || cap(s.before) < n {
			s.logged, s.before = make([]int64, 0, n), make([]int64, 0, n)
		}
	}
	return s
}

// recycle keeps what a cut's set leaves for the next one: its size, and its per-delta
// scratch, which nothing reads once the cut is over.
func (r *Recorder) recycle(s *deltaSet) {
	p := &r.p
	p.lastSet = len(s.es)
	p.spareLogged, p.spareBefore = s.logged[:0], s.before[:0]
	s.logged, s.before = nil, nil
}

// readAhead is the log read ahead of the next cut: the set holds the log records from
// p.logFloor to pos, of which there are taken. It lives in memory only: the records stay
// in the log until a cut moves them into a message, and a failed cut or a fold drops it.
type readAhead struct {
	set   deltaSet
	pos   uint64
	taken int
}

// readAheadStep reads the log written since the last step into the next message's set,
// so that a cut reads only what came after the last step: the publisher's work spreads
// over the flush interval instead of coming as one burst per message. It does nothing
// while folded totals wait (the cut takes them first) or when the set is full.
func (r *Recorder) readAheadStep() error {
	p := &r.p
	if len(p.totals) > 0 {
		return nil
	}
	end := r.j.end.Load()
	if p.ahead == nil {
		if end == p.logFloor {
			return nil
		}
		p.ahead = &readAhead{set: r.newSet(), pos: p.logFloor}
	}
	a := p.ahead
	if a.pos == end || a.taken >= maxCutRecords {
		return nil
	}
	budget, _ := r.budgets()
	full := func() bool { return len(a.set.es) > 0 && a.set.bytes >= budget }
	pos, taken, _, err := r.readLog(&a.set, a.pos, end, full, maxCutRecords-a.taken)
	if err != nil {
		p.ahead = nil
		return fmt.Errorf("read usage log ahead: %w", err)
	}
	a.pos, a.taken = pos, a.taken+taken
	r.st.readAhead.Add(uint64(taken))
	return nil
}

// cut moves outbox content into a new pending message, in one transaction: first the
// folded totals, then log records oldest first, as much as one message carries. The
// transaction is small whatever the load: the message (one entry), the floor below which
// the log is in messages (its segments are deleted in the background, see sweepStep) and
// the folded totals it took. The usage moves into the counters after the
// acknowledgement, in small steps (see settleStep).
func (r *Recorder) cut() error {
	p := &r.p
	wmark := r.j.end.Load() // every record below it is complete
	budget, maxOps := r.budgets()
	ahead := p.ahead
	var set deltaSet
	if ahead != nil {
		set = ahead.set
	} else {
		set = r.newSet()
	}
	p.ahead = nil // taken by this cut, whether or not it succeeds
	defer r.recycle(&set)
	// Each folded total taken costs a deletion in the cut's transaction; log records
	// cost nothing there (the floor covers them), but one cut reads at most
	// maxCutRecords.
	ops := 1
	full := func() bool { return len(set.es) > 0 && (set.bytes >= budget || ops >= maxOps) }
	var takenTotals []limiter.CounterKey
	var totalBytes int64
	for k, d := range p.totals {
		if full() {
			break
		}
		set.add(k, d)
		takenTotals = append(takenTotals, k)
		totalBytes += totalSize(&k)
		ops++
	}
	allTotals := len(takenTotals) == len(p.totals)
	more := !allTotals
	floor, taken := p.logFloor, 0
	if ahead != nil {
		floor, taken = ahead.pos, ahead.taken
	}
	if allTotals {
		var err error
		var n int
		if floor, n, more, err = r.readLog(&set, floor, wmark, full, maxCutRecords-taken); err != nil {
			return fmt.Errorf("cut outbox: %w", err)
		}
		taken += n
	}
	p.backlog = more
	covers := p.ackedCovers
	if allTotals {
		covers = max(covers, p.foldedThrough, floor)
		if !more {
			covers = max(covers, wmark)
		}
	}
	if len(set.es) == 0 {
		p.ackedCovers = covers // nothing to publish: everything below covers is acknowledged
		return nil
	}

	seq := p.acked.seq + 1
	entries := set.es
	if taken > 0 {
		r.settleLogged(&set) // before sorting: set.logged follows set.es
	}
	if !sortByRank(&p.keys, entries, &p.br) {
		sortEntries(entries, &p.br)
	}
	p.br.yield()
	from, to := entries[0].d.from, entries[0].d.to
	for i := range entries {
		from, to = min(from, entries[i].d.from), max(to, entries[i].d.to)
	}
	key, val := pendingKey(seq), appendMessageValue(make([]byte, 0, 64+len(entries)*40), set.records, from, to, entries)
	p.br.yield()
	data := appendMessageJSON(slices.Grow(p.spareMsg[:0], set.bytes+256), r.sidecarID, r.epoch, seq, from, to, entries, &p.br)
	p.spareMsg = nil // data is the pending message's until its acknowledgement
	p.br.yield()
	err := r.update(func(txn *badger.Txn) error {
		if err := txn.Set(key, val); err != nil {
			return err
		}
		if floor != p.logFloor {
			if err := txn.Set([]byte(keyLogFloor), encodeU64(floor)); err != nil {
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
		if taken > 0 {
			r.unsettleLogged(&set)
		}
		r.shrinkOps(err, maxOps)
		return fmt.Errorf("cut outbox into message %d: %w", seq, err)
	}
	for _, k := range takenTotals {
		delete(p.totals, k)
	}
	r.setLogFloor(floor, taken)
	size := int64(len(key) + len(val))
	p.pending = &pending{seq: seq, id: MsgID(r.sidecarID, r.epoch, seq), data: data, size: size, records: set.records,
		deltas: len(entries), covers: covers, entries: entries}
	r.st.pendingSeq.Store(seq)
	r.st.outboxKeys.Add(-int64(len(takenTotals)))
	r.st.outboxBytes.Add(size - totalBytes)
	if ce := r.log.Check(zap.DebugLevel, "usage message cut"); ce != nil {
		ce.Write(zap.String("msg_id", p.pending.id), zap.Int("deltas", len(entries)), zap.Int64("records", set.records),
			zap.Int("log_records", taken), zap.Int("totals", len(takenTotals)),
			zap.Time("from", time.Unix(0, from)), zap.Time("to", time.Unix(0, to)))
	}
	return nil
}

// unsettleLogged takes back what settleLogged added, after the transaction failed.
func (r *Recorder) unsettleLogged(s *deltaSet) {
	for i := range s.es {
		if t := r.p.durable[s.es[i].k]; t != nil {
			t.quantity -= s.logged[i]
		}
	}
}

// setLogFloor records that the log below floor is out of it, taken records having left.
func (r *Recorder) setLogFloor(floor uint64, taken int) {
	r.p.logFloor = floor
	r.logFloor.Store(floor)
	r.st.recordsOut.Add(uint64(taken))
}

// update runs fn in a Badger write transaction, counted in Stats.BadgerWrites.
func (r *Recorder) update(fn func(txn *badger.Txn) error) error {
	r.st.badgerWrites.Add(1)
	return r.db.Update(fn)
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
			if i%32 == 31 {
				p.br.yield() // a Badger read is microseconds: a step of 256 took 1-4 ms in one go
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

// sortEntries orders a message's deltas by customer, feature and window (compareKeys).
// It sorts runs of sortRun deltas, then merges them, yielding to the scheduler between
// runs and every yieldEvery merged deltas (see yieldEvery): a cut sorts tens of
// thousands of deltas.
func sortEntries(es []batchEntry, br *breather) {
	cmp := func(a, b batchEntry) int { return compareKeys(&a.k, &b.k) }
	for i := 0; i < len(es); i += sortRun {
		slices.SortFunc(es[i:min(i+sortRun, len(es))], cmp)
		if len(es) > sortRun {
			br.yield()
		}
	}
	if len(es) <= sortRun {
		return
	}
	src, dst := es, make([]batchEntry, len(es))
	n := 0
	for width := sortRun; width < len(es); width *= 2 {
		for lo := 0; lo < len(es); lo += 2 * width {
			mid, hi := min(lo+width, len(es)), min(lo+2*width, len(es))
			i, j, k := lo, mid, lo
			for ; i < mid && j < hi; k++ {
				if compareKeys(&src[j].k, &src[i].k) < 0 {
					dst[k], j = src[j], j+1
				} else {
					dst[k], i = src[i], i+1
				}
				if n++; n%yieldEvery == 0 {
					br.yield()
				}
			}
			k += copy(dst[k:], src[i:mid])
			copy(dst[k:], src[j:hi])
		}
		src, dst = dst, src
	}
	if &src[0] != &es[0] {
		copy(es, src)
	}
}

// sortRun is how many deltas sortEntries sorts between yields: about 0.1 ms of work.
const sortRun = 256

type batchEntry struct {
	k    limiter.CounterKey
	d    delta
	slot *keySlot // the key's slot when the delta came from the log (see sortByRank)
}

func totalSize(k *limiter.CounterKey) int64 { return int64(len(prefixTotal) + ckSize(k) + 48) }

// maybeFold applies the outbox bound: once the outbox holds MaxOutboxBytes, the log is
// folded into one total per (customer, feature, window), so that its size follows the
// number of distinct keys rather than the number of requests. Usage is never dropped.
func (r *Recorder) maybeFold() {
	bytes := r.outboxBytes()
	if bytes < r.opts.MaxOutboxBytes || r.j.end.Load() == r.logFloor.Load() {
		return
	}
	// Folding is paced while the outbox is near its bound, not once it is well past it
	// (appends can outpace the pace).
	if bytes < 2*r.opts.MaxOutboxBytes && time.Since(r.p.lastFold) < min(r.opts.FlushInterval, 250*time.Millisecond) {
		return
	}
	r.p.lastFold = time.Now()
	if !r.st.atBound.Swap(true) {
		r.log.Warn("usage outbox reached its bound: folding the log into per-key totals; admission and counting go on, nothing is dropped",
			zap.Int64("outbox_bytes", bytes), zap.Int64("max_outbox_bytes", r.opts.MaxOutboxBytes))
	}
	folded, err := r.fold()
	if err != nil {
		r.st.setError(err)
		r.log.Error("usage outbox fold failed; the outbox keeps growing", zap.Error(err))
		return
	}
	r.st.compactions.Add(1)
	after := r.outboxBytes()
	r.log.Info("usage outbox folded", zap.Int("log_records", folded), zap.Int("keys", len(r.p.totals)),
		zap.Int64("bytes_before", bytes), zap.Int64("bytes_after", after))
	if after >= r.opts.MaxOutboxBytes {
		r.log.Warn("usage outbox is over its bound even folded (too many distinct customer, feature and window keys); admission and counting go on",
			zap.Int64("outbox_bytes", after), zap.Int("keys", len(r.p.totals)))
	}
	if err := r.sweepLog(); err != nil {
		r.houseFailed("deleting folded usage log segments", err)
	}
}

// fold folds the log into the totals, in transactions that each write the totals they
// change and raise the floor past the records they read.
func (r *Recorder) fold() (int, error) {
	p := &r.p
	_, maxOps := r.budgets()
	folded := 0
	for {
		end := r.j.end.Load()
		set := r.newSet()
		full := func() bool { return len(set.es) >= maxOps-1 }
		floor, taken, more, err := r.readLog(&set, p.logFloor, end, full, maxCutRecords)
		if err != nil || taken == 0 {
			return folded, err
		}
		changed := make([]delta, len(set.es))
		for i := range set.es {
			changed[i] = set.es[i].d
			if old := p.totals[set.es[i].k]; old != nil {
				changed[i].add(old)
			}
		}
		r.settleLogged(&set)
		err = r.update(func(txn *badger.Txn) error {
			for i := range set.es {
				if err := txn.Set(appendCK([]byte(prefixTotal), &set.es[i].k), appendTotal(nil, &changed[i])); err != nil {
					return err
				}
			}
			return txn.Set([]byte(keyLogFloor), encodeU64(floor))
		})
		if err != nil {
			r.unsettleLogged(&set)
			r.shrinkOps(err, maxOps)
			return folded, fmt.Errorf("fold outbox: %w", err)
		}
		for i := range set.es {
			k := set.es[i].k
			if p.totals[k] == nil {
				r.st.outboxKeys.Add(1)
				r.st.outboxBytes.Add(totalSize(&k))
			}
			d := changed[i]
			p.totals[k] = &d
		}
		p.foldedThrough = max(p.foldedThrough, floor)
		r.setLogFloor(floor, taken)
		folded += taken
		if !more {
			return folded, nil
		}
	}
}
