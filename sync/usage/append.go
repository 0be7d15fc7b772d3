package usage

import (
	"encoding/binary"
	"fmt"

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
// seen; the entry is valid during the call.
func decodeRecord(v []byte, keys *keyTable, fn func(at int64, e *logEntry)) error {
	if len(v) == 0 || v[0] != recordVersion {
		return fmt.Errorf("%w: log record version", errCorrupt)
	}
	d := decoder{b: v[1:]}
	at := int64(d.u64())
	n := d.uvarint()
	var e logEntry
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
			fn(at, &e)
		}
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = errCorrupt
	}
	return d.err
}

// keyTable hands out one keySlot per distinct encoded counter key read from the log:
// the key decoded once, and its place in the delta set being filled, so that the
// publisher looks up each usage it reads once, by the key's bytes.
type keyTable struct {
	m   map[string]*keySlot
	gen uint64 // the last deltaSet's generation
}

type keySlot struct {
	k   limiter.CounterKey
	gen uint64 // the deltaSet that i is a position in
	i   int
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
	if s, ok := t.m[string(key)]; ok {
		return s
	}
	if t.m == nil || len(t.m) > 1<<20 {
		t.m = make(map[string]*keySlot) // forget keys of the past rather than grow forever
	}
	kd := decoder{b: key}
	s := &keySlot{k: kd.ck()}
	t.m[string(key)] = s
	return s
}
