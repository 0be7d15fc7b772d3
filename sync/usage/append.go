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
	k        limiter.CounterKey
	end      int64
	quantity int64
	limited  bool
	x        int64 // the limit when limited, else the overage
}

// decodeRecord calls fn with each usage of a log record, and returns the record's time.
// Customer and feature names go through intern, so that decoding allocates only for
// names it has not seen; the entry is valid during the call.
func decodeRecord(v []byte, intern *interner, fn func(at int64, e *logEntry)) error {
	if len(v) == 0 || v[0] != recordVersion {
		return fmt.Errorf("%w: log record version", errCorrupt)
	}
	d := decoder{b: v[1:]}
	at := int64(d.u64())
	n := d.uvarint()
	var e logEntry
	for i := uint64(0); i < n && d.err == nil; i++ {
		e.k.Customer = intern.str(&d)
		e.k.Feature = intern.str(&d)
		e.k.WindowStart = int64(d.u64())
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

// interner hands out one string per distinct name read from the log.
type interner struct{ m map[string]string }

func (in *interner) str(d *decoder) string {
	n := d.uvarint()
	if d.err != nil || uint64(len(d.b)) < n {
		d.err = errCorrupt
		return ""
	}
	b := d.b[:n]
	d.b = d.b[n:]
	if s, ok := in.m[string(b)]; ok {
		return s
	}
	if in.m == nil || len(in.m) > 1<<20 {
		in.m = make(map[string]string) // forget names of the past rather than grow forever
	}
	s := string(b)
	in.m[s] = s
	return s
}
