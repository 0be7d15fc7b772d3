package usage

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

// Key prefixes under u/ (see the package doc).
const (
	prefixCounter = "u/c/"
	prefixBatch   = "u/o/b/"
	prefixTotal   = "u/o/k/"
	prefixPending = "u/p/"
	keyAck        = "u/s/ack"
	keyLogFloor   = "u/s/logfloor"
	keySettled    = "u/s/settled"
	keyFloor      = "u/s/floor" // of the batches of an earlier version (see migrateBatches)
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

// Batches (u/o/b/<seq>) are how an earlier version kept committed usage in Badger; they
// are read once, by migrateBatches.

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

// A message value (u/p/<seq>) is: version 2 | records:u64 | from:u64 | to:u64 |
// n:uvarint | n × (ck | end:u64 | quantity:varint | overage:varint). The message's JSON
// is a function of the value, the sidecar id, the epoch and the sequence
// (appendMessageJSON), so it is not stored: each publish attempt of a message sends the
// same bytes. Settling into the counters and Restore read the deltas without JSON. A
// value whose first byte is 0 is version 1 (records:u64 | the JSON), written by a
// gatehouse that moved usage into the counters at the cut: its deltas are counted
// already.
const messageVersion = 2

func appendMessageValue(b []byte, records, from, to int64, entries []batchEntry) []byte {
	b = append(b, messageVersion)
	b = binary.BigEndian.AppendUint64(b, uint64(records))
	b = binary.BigEndian.AppendUint64(b, uint64(from))
	b = binary.BigEndian.AppendUint64(b, uint64(to))
	b = binary.AppendUvarint(b, uint64(len(entries)))
	for i := range entries {
		e := &entries[i]
		b = appendCK(b, &e.k)
		b = binary.BigEndian.AppendUint64(b, uint64(e.d.end))
		b = binary.AppendVarint(b, e.d.quantity)
		b = binary.AppendVarint(b, e.d.overage)
	}
	return b
}

// messageValue is a decoded u/p/ value.
type messageValue struct {
	counted  bool         // version 1: the deltas are in the counters already
	records  int64        // usage records in the message
	from, to int64        // version 2: the message's time span, unix nanoseconds
	entries  []batchEntry // version 2: the deltas, in message order
	json     []byte       // version 1: the bytes published
}

// decodeMessageValue decodes v; json aliases v.
func decodeMessageValue(v []byte) (messageValue, error) {
	if len(v) > 0 && v[0] == 0 { // version 1
		if len(v) < 8 {
			return messageValue{}, errCorrupt
		}
		return messageValue{counted: true, records: int64(binary.BigEndian.Uint64(v)), json: v[8:]}, nil
	}
	if len(v) == 0 || v[0] != messageVersion {
		return messageValue{}, fmt.Errorf("%w: message version", errCorrupt)
	}
	d := decoder{b: v[1:]}
	m := messageValue{records: int64(d.u64()), from: int64(d.u64()), to: int64(d.u64())}
	n := d.uvarint()
	if d.err == nil && n > uint64(len(d.b)) {
		d.err = errCorrupt
	}
	if d.err == nil {
		m.entries = make([]batchEntry, 0, n)
	}
	for i := uint64(0); i < n && d.err == nil; i++ {
		var e batchEntry
		e.k = d.ck()
		e.d.end = int64(d.u64())
		e.d.quantity = d.varint()
		e.d.overage = d.varint()
		m.entries = append(m.entries, e)
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = errCorrupt
	}
	return m, d.err
}

// settleMark is how far acknowledged messages are settled into the counters. Settling
// merges messages lo..hi into one pass that writes each key once, in key order
// (compareKeys), a chunk per transaction:
//
//   - messages below lo are settled;
//   - of messages lo..hi, the deltas whose key sorts before key are settled (none of them
//     when !hasKey);
//   - messages above hi are not settled.
//
// hi < lo when no pass is under way. A mark of the first version (16 bytes: seq | index,
// one message settled at a time) reads as lo = hi = seq with its first index deltas
// settled (legacy), which is the same thing since a message's deltas are in key order.
type settleMark struct {
	lo, hi uint64
	key    limiter.CounterKey
	hasKey bool
	legacy bool   // a version-1 mark: index, not key, says how much of message lo is settled
	index  uint64 // legacy only
}

const settleMarkVersion = 2

// idleMark is the mark when messages below next are settled and no pass is under way.
func idleMark(next uint64) settleMark { return settleMark{lo: next, hi: next - 1} }

func (f settleMark) encode() []byte {
	b := make([]byte, 0, 18+ckSize(&f.key)+1)
	b = append(b, settleMarkVersion)
	b = binary.BigEndian.AppendUint64(b, f.lo)
	b = binary.BigEndian.AppendUint64(b, f.hi)
	if !f.hasKey {
		return append(b, 0)
	}
	return appendCK(append(b, 1), &f.key)
}

func decodeSettleMark(v []byte) (settleMark, error) {
	d := decoder{b: v}
	if len(v) == 16 { // version 1
		seq, index := d.u64(), d.u64()
		return settleMark{lo: seq, hi: seq, legacy: true, index: index}, d.err
	}
	if len(v) == 0 || v[0] != settleMarkVersion {
		return settleMark{}, fmt.Errorf("%w: settle mark version", errCorrupt)
	}
	d.b = d.b[1:]
	f := settleMark{lo: d.u64(), hi: d.u64()}
	if len(d.b) == 0 {
		return f, errCorrupt
	}
	f.hasKey, d.b = d.b[0] == 1, d.b[1:]
	if f.hasKey {
		f.key = d.ck()
	}
	if d.err == nil && len(d.b) != 0 {
		d.err = errCorrupt
	}
	return f, d.err
}

// unsettled returns the deltas of message seq, es in key order, that are not settled
// into the counters.
func (f *settleMark) unsettled(seq uint64, es []batchEntry) []batchEntry {
	switch {
	case seq < f.lo:
		return nil
	case seq > f.hi:
		return es
	case f.legacy:
		return es[min(f.index, uint64(len(es))):]
	case !f.hasKey:
		return es
	}
	i, _ := slices.BinarySearchFunc(es, &f.key, func(e batchEntry, k *limiter.CounterKey) int { return compareKeys(&e.k, k) })
	return es[i:]
}

// compareKeys orders counter keys by customer, feature and window: the order of a
// message's deltas and of settling.
func compareKeys(a, b *limiter.CounterKey) int {
	if c := strings.Compare(a.Customer, b.Customer); c != 0 { // cmp.Or would compute all three
		return c
	}
	if c := strings.Compare(a.Feature, b.Feature); c != 0 {
		return c
	}
	return cmp.Compare(a.WindowStart, b.WindowStart)
}

func encodeU64(v uint64) []byte { return binary.BigEndian.AppendUint64(make([]byte, 0, 8), v) }

func decodeU64(v []byte) (uint64, error) {
	d := decoder{b: v}
	x := d.u64()
	return x, d.err
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
