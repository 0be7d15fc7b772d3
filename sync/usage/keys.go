package usage

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

// Key prefixes under u/ (see the package doc).
const (
	prefixCounter = "u/c/"
	prefixBatch   = "u/o/b/"
	prefixTotal   = "u/o/k/"
	prefixPending = "u/p/"
	keyAck        = "u/s/ack"
)

var errCorrupt = errors.New("usage: corrupt record")

// appendCK appends the encoded counter key k to b.
func appendCK(b []byte, k *limiter.CounterKey) []byte {
	b = binary.AppendUvarint(b, uint64(len(k.Customer)))
	b = append(b, k.Customer...)
	b = binary.AppendUvarint(b, uint64(len(k.Feature)))
	b = append(b, k.Feature...)
	return binary.BigEndian.AppendUint64(b, uint64(k.WindowStart))
}

// ckSize is the encoded size of a counter key.
func ckSize(k *limiter.CounterKey) int {
	return uvarintLen(len(k.Customer)) + len(k.Customer) + uvarintLen(len(k.Feature)) + len(k.Feature) + 8
}

func uvarintLen(n int) int {
	l := 1
	for n >= 0x80 {
		n >>= 7
		l++
	}
	return l
}

// decoder reads what the append functions wrote; the first error sticks.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errCorrupt
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.err = errCorrupt
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) u64() uint64 {
	if d.err != nil || len(d.b) < 8 {
		d.err = errCorrupt
		return 0
	}
	v := binary.BigEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}

func (d *decoder) str() string {
	n := d.uvarint()
	if d.err != nil || uint64(len(d.b)) < n {
		d.err = errCorrupt
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

func (d *decoder) ck() limiter.CounterKey {
	var k limiter.CounterKey
	k.Customer = d.str()
	k.Feature = d.str()
	k.WindowStart = int64(d.u64())
	return k
}

// counterKey decodes the counter key that follows prefix in key.
func counterKey(key []byte, prefix string) (limiter.CounterKey, error) {
	d := decoder{b: key[len(prefix):]}
	k := d.ck()
	if d.err == nil && len(d.b) != 0 {
		d.err = errCorrupt
	}
	return k, d.err
}

// counter is the durable value of a usage counter.
type counter struct {
	end, quantity, overage int64
}

func appendCounter(b []byte, c counter) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(c.end))
	b = binary.BigEndian.AppendUint64(b, uint64(c.quantity))
	return binary.BigEndian.AppendUint64(b, uint64(c.overage))
}

func decodeCounter(v []byte) (counter, error) {
	d := decoder{b: v}
	c := counter{end: int64(d.u64()), quantity: int64(d.u64()), overage: int64(d.u64())}
	return c, d.err
}

// delta is usage that is still to be published for one key, with the span of time in
// which it was committed.
type delta struct {
	end               int64
	from, to          int64 // unix nanoseconds
	records           int64 // usage records folded in, for stats
	quantity, overage int64
}

func (a *delta) add(b *delta) {
	if a.records == 0 || b.from < a.from {
		a.from = b.from
	}
	if b.to > a.to {
		a.to = b.to
	}
	if b.end > a.end {
		a.end = b.end
	}
	a.records += b.records
	a.quantity += b.quantity
	a.overage += b.overage
}

// batchKey is u/o/b/<seq>.
func batchKey(b []byte, seq uint64) []byte {
	b = append(b, prefixBatch...)
	return binary.BigEndian.AppendUint64(b, seq)
}

func batchSeq(key []byte) uint64 {
	if len(key) != len(prefixBatch)+8 {
		return 0
	}
	return binary.BigEndian.Uint64(key[len(prefixBatch):])
}

// A batch value is: version 1 | at:u64 | n:uvarint | n × (ck | end:u64 | records:uvarint |
// quantity:varint | overage:varint).
const batchVersion = 1

func appendBatchHeader(b []byte, at int64, n int) []byte {
	b = append(b, batchVersion)
	b = binary.BigEndian.AppendUint64(b, uint64(at))
	return binary.AppendUvarint(b, uint64(n))
}

func appendBatchEntry(b []byte, k *limiter.CounterKey, d *delta) []byte {
	b = appendCK(b, k)
	b = binary.BigEndian.AppendUint64(b, uint64(d.end))
	b = binary.AppendUvarint(b, uint64(d.records))
	b = binary.AppendVarint(b, d.quantity)
	return binary.AppendVarint(b, d.overage)
}

// decodeBatch calls fn for each entry of a batch value.
func decodeBatch(v []byte, fn func(k limiter.CounterKey, d delta)) error {
	if len(v) == 0 || v[0] != batchVersion {
		return fmt.Errorf("%w: batch version", errCorrupt)
	}
	dec := decoder{b: v[1:]}
	at := int64(dec.u64())
	n := dec.uvarint()
	for i := uint64(0); i < n && dec.err == nil; i++ {
		k := dec.ck()
		d := delta{from: at, to: at}
		d.end = int64(dec.u64())
		d.records = int64(dec.uvarint())
		d.quantity = dec.varint()
		d.overage = dec.varint()
		if dec.err == nil {
			fn(k, d)
		}
	}
	return dec.err
}

// A total value (u/o/k/<ck>) is: end | from | to | records | quantity | overage, each u64.
func appendTotal(b []byte, d *delta) []byte {
	for _, v := range [...]int64{d.end, d.from, d.to, d.records, d.quantity, d.overage} {
		b = binary.BigEndian.AppendUint64(b, uint64(v))
	}
	return b
}

func decodeTotal(v []byte) (delta, error) {
	d := decoder{b: v}
	t := delta{end: int64(d.u64()), from: int64(d.u64()), to: int64(d.u64())}
	t.records = int64(d.u64())
	t.quantity = int64(d.u64())
	t.overage = int64(d.u64())
	return t, d.err
}

// pendingKey is u/p/<seq>.
func pendingKey(seq uint64) []byte {
	return binary.BigEndian.AppendUint64([]byte(prefixPending), seq)
}

// A pending value is: records:u64 | the message's JSON.
func appendPending(b []byte, records int64, msg []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, uint64(records))
	return append(b, msg...)
}

// ackState is the last acknowledged message: its sequence and its stream sequence.
type ackState struct {
	seq       uint64 // message sequence (Message.Seq); 0 when none was acknowledged
	streamSeq uint64 // stream sequence of the last message on this sidecar's subject
}

func (a ackState) encode() []byte {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, 16), a.seq)
	return binary.BigEndian.AppendUint64(b, a.streamSeq)
}

func decodeAck(v []byte) (ackState, error) {
	d := decoder{b: v}
	a := ackState{seq: d.u64(), streamSeq: d.u64()}
	return a, d.err
}
