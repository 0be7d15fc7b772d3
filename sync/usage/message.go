package usage

import (
	"strconv"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/jsonx"
)

// Stream is the JetStream stream that carries usage; SubjectPrefix + sidecar id is the
// subject each sidecar publishes on.
const (
	Stream        = "GATEHOUSE_USAGE"
	SubjectPrefix = "gatehouse.usage."
)

// Message is one published batch of usage deltas (DESIGN.md section 7).
type Message struct {
	SidecarID string    `json:"sidecar_id"`
	Epoch     string    `json:"epoch"`
	Seq       uint64    `json:"seq"`
	From      time.Time `json:"from"`
	To        time.Time `json:"to"`
	Deltas    []Delta   `json:"deltas"`
}

// Delta is the usage of one customer's feature in one window that a message adds.
// Overage is the part of Quantity that ran over a soft limit.
type Delta struct {
	CustomerID  string    `json:"customer_id"`
	Feature     string    `json:"feature"`
	WindowStart time.Time `json:"window_start"`
	Quantity    int64     `json:"quantity"`
	Overage     int64     `json:"overage"`
}

// MsgID is the Nats-Msg-Id of a message: <sidecar_id>:<epoch>:<seq>.
func MsgID(sidecarID, epoch string, seq uint64) string {
	return sidecarID + ":" + epoch + ":" + strconv.FormatUint(seq, 10)
}

// Subject is the subject a sidecar publishes its usage on.
func Subject(sidecarID string) string { return SubjectPrefix + sidecarID }

// ID is the message's Nats-Msg-Id.
func (m *Message) ID() string { return MsgID(m.SidecarID, m.Epoch, m.Seq) }

// appendMessageJSON appends message seq of deltas es spanning [from, to] (unix
// nanoseconds) as encoding/json marshals the equivalent Message (the same bytes, which a
// test checks), without reflection: a message carries every key active in a flush
// interval, and encoding it is a large part of the publisher's work.
func appendMessageJSON(b []byte, sidecarID, epoch string, seq uint64, from, to int64, es []batchEntry, br *breather) []byte {
	b = append(b, `{"sidecar_id":`...)
	b = jsonx.AppendString(b, sidecarID)
	b = append(b, `,"epoch":`...)
	b = jsonx.AppendString(b, epoch)
	b = append(b, `,"seq":`...)
	b = strconv.AppendUint(b, seq, 10)
	b = append(b, `,"from":`...)
	b = appendJSONTime(b, from)
	b = append(b, `,"to":`...)
	b = appendJSONTime(b, to)
	b = append(b, `,"deltas":[`...)
	for i := range es {
		e := &es[i]
		if i > 0 {
			b = append(b, ',')
			if i%(4*yieldEvery) == 0 {
				br.yield()
			}
		}
		b = append(b, `{"customer_id":`...)
		b = jsonx.AppendString(b, e.k.Customer)
		b = append(b, `,"feature":`...)
		b = jsonx.AppendString(b, e.k.Feature)
		b = append(b, `,"window_start":`...)
		b = appendJSONTime(b, e.k.WindowStart)
		b = append(b, `,"quantity":`...)
		b = strconv.AppendInt(b, e.d.quantity, 10)
		b = append(b, `,"overage":`...)
		b = strconv.AppendInt(b, e.d.overage, 10)
		b = append(b, '}')
	}
	return append(b, "]}"...)
}

// appendJSONTime appends unix nanoseconds ns as a quoted RFC 3339 time in UTC.
func appendJSONTime(b []byte, ns int64) []byte {
	b = append(b, '"')
	b = time.Unix(0, ns).UTC().AppendFormat(b, time.RFC3339Nano)
	return append(b, '"')
}
