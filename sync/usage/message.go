package usage

import (
	"strconv"
	"time"
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
