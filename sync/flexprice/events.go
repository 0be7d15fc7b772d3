package flexprice

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/usage"
)

// Mode says how a feature's usage becomes events.
const (
	// ModeSum sends one event per delta with the quantity in a property, for a SUM meter.
	ModeSum = "sum"
	// ModeCount sends one event per unit, for a COUNT meter: a delta of 17 is 17 events.
	ModeCount = "count"
)

// FeatureEvents maps one gatehouse feature to Flexprice events.
type FeatureEvents struct {
	EventName string // the meter's event_name
	Mode      string // ModeSum or ModeCount
	Property  string // sum: the property that carries the quantity; default "quantity"
}

// EventSource is the source field of every event the bridge sends.
const EventSource = "gatehouse"

// maxEventIDLen bounds a readable event id; longer ones are replaced by a digest.
const maxEventIDLen = 200

// eventID names the event of delta i of a message, and for count mode its unit u (u < 0
// in sum mode): "<Nats-Msg-Id>/<i>" or "<Nats-Msg-Id>/<i>/<u>". The same message gives
// the same ids on every delivery, so that a retry is the same event to Flexprice.
func eventID(msgID string, i, u int) string {
	id := msgID + "/" + strconv.Itoa(i)
	if u >= 0 {
		id += "/" + strconv.Itoa(u)
	}
	if len(id) > maxEventIDLen {
		sum := sha256.Sum256([]byte(id))
		id = "gh-" + hex.EncodeToString(sum[:24])
	}
	return id
}

// eventTime is the timestamp of every event of a message: its `to` (else `from`, else
// the delta's window start), in UTC and whole milliseconds, so that it survives
// Flexprice's storage unchanged and a retry repeats it exactly.
func eventTime(m *usage.Message, d *usage.Delta) time.Time {
	t := m.To
	if t.IsZero() {
		t = m.From
	}
	if t.IsZero() {
		t = d.WindowStart
	}
	return t.UTC().Truncate(time.Millisecond)
}

// errUnmapped is a delta of a feature that has no events configured.
var errUnmapped = errors.New("no event mapping configured for the feature")

// deltaEvents turns delta i of a message into events, or says why it cannot.
func deltaEvents(msgID string, m *usage.Message, i int, f *FeatureEvents, maxCount int64) ([]Event, error) {
	d := &m.Deltas[i]
	if f == nil {
		return nil, fmt.Errorf("feature %q: %w", d.Feature, errUnmapped)
	}
	if err := limiter.CheckCustomerID(d.CustomerID); err != nil {
		return nil, fmt.Errorf("customer_id: %w", err)
	}
	if strings.TrimSpace(f.EventName) == "" {
		return nil, fmt.Errorf("feature %q: empty event_name", d.Feature)
	}
	if d.Quantity < 0 {
		return nil, fmt.Errorf("quantity %d is negative", d.Quantity)
	}
	ts := eventTime(m, d)
	if ts.IsZero() {
		return nil, errors.New("message has no time (to, from, window_start)")
	}
	if d.Quantity == 0 {
		return nil, nil
	}
	base := Event{EventName: f.EventName, ExternalCustomerID: d.CustomerID, Timestamp: ts, Source: EventSource}
	switch f.Mode {
	case ModeSum:
		prop := f.Property
		if prop == "" {
			prop = "quantity"
		}
		e := base
		e.EventID = eventID(msgID, i, -1)
		e.Properties = map[string]any{prop: d.Quantity}
		return []Event{e}, nil
	case ModeCount:
		if d.Quantity > maxCount {
			return nil, fmt.Errorf("quantity %d is more than the %d events allowed for one count-mode delta", d.Quantity, maxCount)
		}
		out := make([]Event, d.Quantity)
		for u := range out {
			out[u] = base
			out[u].EventID = eventID(msgID, i, u)
		}
		return out, nil
	}
	return nil, fmt.Errorf("feature %q: mode %q is neither sum nor count", d.Feature, f.Mode)
}
