package usage

import (
	"encoding/binary"
	"fmt"
	"hash/maphash"
	"slices"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

// A log record (see journal.go) is the usage of one Record call: version 1 | at:u64 |
// n:uvarint | n × (ck | end:u64 | quantity:varint | limited:u8 | limit or overage:varint).
// For a limited feature the overage is computed when the record is taken out of the log,
// from the durable total before it, so that it follows the order in which usage became
// durable; otherwise it is the overage the limiter counted.
const recordVersion = 1

// recordSize bounds the encoded size of the usage of one Record call.
func recordSize(us []limiter.Usage) int {
	n := 1 + 8 + binary.MaxVarintLen64
	for i := range us {
		n += ckSize(&us[i].Key) + 8 + binary.MaxVarintLen64 + 1 + binary.MaxVarintLen64
	}
	return n
}

func appendRecord(b []byte, at int64, us []limiter.Usage) []byte {
	b = append(b, recordVersion)
	b = binary.BigEndian.AppendUint64(b, uint64(at))
	b = binary.AppendUvarint(b, uint64(len(us)))
	for i := range us {
		u := &us[i]
		b = appendCK(b, &u.Key)
		b = binary.BigEndian.AppendUint64(b, uint64(u.End))
		b = binary.AppendVarint(b, u.Quantity)
		if u.Limited {
			b = append(b, 1)
			b = binary.AppendVarint(b, u.Limit)
		} else {
			b = append(b, 0)
			b = binary.AppendVarint(b, u.Overage)
		}
	}
	return b
}

// logEntry is one usage of a log record.
type logEntry struct {
	key      *keySlot // its counter key
	end      int64
	quantity int64
	limited  bool
	x        int64 // the limit when limited, else the overage
}

// decodeRecord calls fn with each usage of a log record, and returns the record's time.
// Counter keys go through keys, so that decoding allocates only for keys it has not
// seen; the entry is valid during the call. (It is the table's scratch entry: one on
// the stack would escape to the heap through fn, an allocation per record.)
func decodeRecord(v []byte, keys *keyTable, fn func(at int64, e *logEntry)) error {
	if len(v) == 0 || v[0] != recordVersion {
		return fmt.Errorf("%w: log record version", errCorrupt)
	}
	d := decoder{b: v[1:]}
	at := int64(d.u64())
	n := d.uvarint()
	e := &keys.entry
	*e = logEntry{}
	for i := uint64(0); i < n && d.err == nil; i++ {
		e.key = keys.slot(&d)
		e.end = int64(d.u64())
		e.quantity = d.varint()
		if len(d.b) == 0 {
			d.err = errCorrupt
			break
		}
		e.limited = d.b[0] == 1
		d.b = d.b[1:]
		e.x = d.varint()
		if d.err == nil {
			fn(at, e)
		}
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = errCorrupt
	}
	return d.err
}

// keyTable hands out one keySlot per distinct encoded counter key read from the log:
// the key decoded once, its place in the delta set being filled, so that the publisher
// looks up each usage it reads once, by the key's bytes, and its rank in key order, so
// that a cut sorts its deltas by comparing integers (sortByRank).
//
// The lookup is an open-addressing table of (hash, slot) pairs with linear probing, not
// a Go map: it runs for every usage of every request, over tens of thousands of keys, so
// it reads memory more often than the CPU's caches. It reads one pair (four to a cache
// line), then the slot, which holds the key's bytes; a map keyed by the bytes reads its
// directory, table and group, then the key's bytes from a place of their own, then the
// slot. Keys are never removed one by one: forget drops them all.
type keyTable struct {
	seed  maphash.Seed
	refs  []keyRef   // a power of two long, at most 3/4 full; nil until the first forget
	n     int        // keys in refs
	gen   uint64     // the last deltaSet's generation
	epoch uint64     // bumped whenever the table forgets its keys: older slots have no rank
	order []*keySlot // this epoch's ranked slots, in key order (compareKeys)
	fresh []*keySlot // this epoch's slots not ranked yet
	spare []*keySlot // the previous order's array, reused by rank
	max   int        // how many keys the table holds before it forgets them (maxTableKeys)
	entry logEntry   // decodeRecord's scratch
	// sortByRank's scratch.
	sortOrder []uint64
	sortBuf   []batchEntry
}

// maxTableKeys is how many keys the table remembers; beyond, it forgets the keys of the
// past (ended windows, gone customers) rather than grow forever.
const maxTableKeys = 1 << 20

type keyRef struct {
	h uint64
	s *keySlot // nil: free
}

// minKeyRefs is the table's size once it holds anything.
const minKeyRefs = 1024

type keySlot struct {
	raw   string // the encoded key, as the log holds it
	k     limiter.CounterKey
	gen   uint64 // the deltaSet that i is a position in
	i     int
	epoch uint64 // the table's epoch when the slot was made
	rank  uint32 // position in the table's order, once ranked
	// The key's durable total outside the log, as last found in p.durable, and the
	// generation of p.durable it was found in (see durableOf).
	dur    *durableTotal
	durGen uint64
}

// newSet readies the table for a new delta set: it is the only time the table may
// forget its keys, since a slot replaced while a set is filled would give that set a
// second entry for the key.
func (t *keyTable) newSet() uint64 {
	if t.refs == nil || t.n > t.maxKeys() {
		t.forget()
	}
	t.gen++
	return t.gen
}

// forget starts the table afresh, in a new epoch.
func (t *keyTable) forget() {
	t.refs, t.n = make([]keyRef, minKeyRefs), 0
	if t.seed == (maphash.Seed{}) {
		t.seed = maphash.MakeSeed()
	}
	t.epoch++
	t.order, t.fresh, t.spare = nil, nil, nil
}

func (t *keyTable) maxKeys() int {
	if t.max > 0 {
		return t.max
	}
	return maxTableKeys
}

// rank gives the slots made since the last call their place in key order, and every
// slot of the epoch its position in it.
func (t *keyTable) rank(br *breather) {
	if len(t.fresh) == 0 {
		return
	}
	slices.SortFunc(t.fresh, func(a, b *keySlot) int { return compareKeys(&a.k, &b.k) })
	merged := t.spare[:0]
	i, j := 0, 0
	for i < len(t.order) && j < len(t.fresh) {
		if compareKeys(&t.fresh[j].k, &t.order[i].k) < 0 {
			merged, j = append(merged, t.fresh[j]), j+1
		} else {
			merged, i = append(merged, t.order[i]), i+1
		}
		if len(merged)%(32*yieldEvery) == 0 {
			br.yield()
		}
	}
	merged = append(append(merged, t.order[i:]...), t.fresh[j:]...)
	for r, s := range merged {
		s.rank = uint32(r)
	}
	clear(t.fresh)
	t.order, t.spare, t.fresh = merged, t.order, t.fresh[:0]
}

// sortByRank sorts a cut's deltas into key order by their slots' ranks, as sortEntries
// would with compareKeys, comparing integers instead of strings. It returns false, and
// leaves es as it was, when a delta has no slot of the table's epoch (a folded total).
func sortByRank(t *keyTable, es []batchEntry, br *breather) bool {
	for i := range es {
		if s := es[i].slot; s == nil || s.epoch != t.epoch {
			return false
		}
	}
	t.rank(br)
	// The scratch is kept from cut to cut: a cut at saturation sorts tens of thousands
	// of deltas, and two fresh arrays of them were most of a cut's garbage.
	order := slices.Grow(t.sortOrder[:0], len(es))[:len(es)]
	for i := range es {
		order[i] = uint64(es[i].slot.rank)<<32 | uint64(i)
	}
	slices.Sort(order)
	sorted := slices.Grow(t.sortBuf[:0], len(es))[:len(es)]
	for k, v := range order {
		sorted[k] = es[uint32(v)]
	}
	copy(es, sorted)
	clear(sorted) // it holds the keys' strings and slots: let them go with the message
	t.sortOrder, t.sortBuf = order, sorted
	return true
}

// slot reads an encoded counter key from d and returns its slot.
func (t *keyTable) slot(d *decoder) *keySlot {
	b := d.b
	raw := decoder{b: b}
	for range 2 {
		n := raw.uvarint()
		if raw.err != nil || uint64(len(raw.b)) < n {
			d.err = errCorrupt
			return nil
		}
		raw.b = raw.b[n:]
	}
	raw.u64()
	if raw.err != nil {
		d.err = raw.err
		return nil
	}
	key := b[:len(b)-len(raw.b)]
	d.b = raw.b
	if t.refs == nil {
		t.forget()
	}
	h := maphash.Bytes(t.seed, key)
	mask := len(t.refs) - 1
	i := int(h) & mask
	for ; t.refs[i].s != nil; i = (i + 1) & mask {
		if r := &t.refs[i]; r.h == h && r.s.raw == string(key) {
			return r.s
		}
	}
	kd := decoder{b: key}
	s := &keySlot{raw: string(key), k: kd.ck(), epoch: t.epoch}
	t.refs[i] = keyRef{h: h, s: s}
	if t.n++; t.n*4 > len(t.refs)*3 {
		t.grow()
	}
	t.fresh = append(t.fresh, s)
	return s
}

// grow doubles the table.
func (t *keyTable) grow() {
	old := t.refs
	t.refs = make([]keyRef, 2*len(old))
	mask := len(t.refs) - 1
	for _, r := range old {
		if r.s == nil {
			continue
		}
		i := int(r.h) & mask
		for t.refs[i].s != nil {
			i = (i + 1) & mask
		}
		t.refs[i] = r
	}
}
