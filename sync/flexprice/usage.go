package flexprice

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gatehouse-dev/gatehouse/sync/usage"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// Names of what usage out uses in JetStream.
const (
	UsageSubjects = usage.SubjectPrefix + ">" // what the usage stream holds
	DeadStream    = "GATEHOUSE_USAGE_DEAD"    // where events Flexprice refused are parked
	DeadSubject   = "gatehouse.usage_dead.flexprice"
	ConsumerName  = "gatehouse_flexprice" // the bridge's durable consumer on GATEHOUSE_USAGE
)

// MaxBulkEvents is the most events one POST /v1/events/bulk carries.
const MaxBulkEvents = 1000

// DeadLetter is what the bridge parks on DeadSubject: the original message and why (part
// of) it could not become accepted events.
type DeadLetter struct {
	Reason   string          `json:"reason"` // decode, unmapped_feature, invalid, rejected
	Error    string          `json:"error"`
	Status   int             `json:"status,omitempty"` // Flexprice's status, for rejected
	Subject  string          `json:"subject"`
	MsgID    string          `json:"msg_id"`
	Delta    *int            `json:"delta,omitempty"` // the delta, when it is about one
	Event    *Event          `json:"event,omitempty"` // the event Flexprice refused
	Message  json.RawMessage `json:"message"`         // the original message
	ParkedAt time.Time       `json:"parked_at"`
}

// usageOut consumes GATEHOUSE_USAGE and sends its deltas to Flexprice as events.
type usageOut struct {
	js         jetstream.JetStream
	api        *client
	log        *zap.Logger
	m          *metrics
	features   map[string]*FeatureEvents
	ackWait    time.Duration
	fetchBatch int
	fetchWait  time.Duration
	maxCount   int64
	backoff    time.Duration
	maxWait    time.Duration
	replicas   int
	running    atomic.Bool
}

// setup creates what is absent: the usage stream, the dead-letter stream and the durable
// consumer. Existing streams are left as they are.
func (u *usageOut) setup(ctx context.Context) (jetstream.Consumer, error) {
	// The same configuration as the sidecars create the usage stream with (sync/usage):
	// whoever comes first creates it, and limits added later refuse rather than drop.
	for _, cfg := range []jetstream.StreamConfig{
		{Name: usage.Stream, Subjects: []string{UsageSubjects},
			Description: "gatehouse usage: one message of deltas per sidecar flush (DESIGN.md section 7)",
			Retention:   jetstream.LimitsPolicy, Discard: jetstream.DiscardNew, Storage: jetstream.FileStorage,
			Replicas: u.replicas, Duplicates: 2 * time.Minute},
		{Name: DeadStream, Subjects: []string{"gatehouse.usage_dead.>"},
			Description: "gatehouse usage that a billing bridge could not deliver, with the reason",
			Retention:   jetstream.LimitsPolicy, Discard: jetstream.DiscardNew, Storage: jetstream.FileStorage,
			Replicas: u.replicas, Duplicates: 2 * time.Minute},
	} {
		if _, err := u.js.Stream(ctx, cfg.Name); errors.Is(err, jetstream.ErrStreamNotFound) {
			if _, err := u.js.CreateStream(ctx, cfg); err != nil && !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
				return nil, fmt.Errorf("create stream %s: %w", cfg.Name, err)
			}
		} else if err != nil {
			return nil, fmt.Errorf("stream %s: %w", cfg.Name, err)
		}
	}
	c, err := u.js.CreateOrUpdateConsumer(ctx, usage.Stream, jetstream.ConsumerConfig{
		Durable: ConsumerName, Description: "gatehouse bridge: usage to Flexprice events",
		AckPolicy: jetstream.AckExplicitPolicy, AckWait: u.ackWait, MaxDeliver: -1,
		FilterSubject: UsageSubjects, MaxAckPending: 4 * u.fetchBatch,
	})
	if err != nil {
		return nil, fmt.Errorf("consumer %s on %s: %w", ConsumerName, usage.Stream, err)
	}
	return c, nil
}

// run fetches and processes batches of messages until ctx ends.
func (u *usageOut) run(ctx context.Context, c jetstream.Consumer) {
	u.running.Store(true)
	defer u.running.Store(false)
	failures := 0
	for ctx.Err() == nil {
		fctx, cancel := context.WithTimeout(ctx, u.fetchWait)
		batch, err := c.Fetch(u.fetchBatch, jetstream.FetchContext(fctx))
		var msgs []jetstream.Msg
		if err == nil {
			for msg := range batch.Messages() {
				msgs = append(msgs, msg)
			}
			err = batch.Error()
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, nats.ErrTimeout) && len(msgs) == 0 {
			failures++
			u.log.Warn("fetch usage messages", zap.Error(err))
			_ = sleep(ctx, min(u.backoff<<min(failures, 10), u.maxWait))
			continue
		}
		failures = 0
		if len(msgs) > 0 {
			u.process(ctx, msgs)
		}
	}
}

// pending is one message whose events are in flight.
type pending struct {
	msg    jetstream.Msg
	raw    []byte
	id     string
	left   int  // events and parkings not settled yet
	failed bool // a parking failed: leave it unacked, JetStream delivers it again
	done   atomic.Bool
}

type outEvent struct {
	Event
	p *pending
}

// process turns messages into events, sends them, parks what Flexprice refuses, and
// acknowledges each message once all its events were accepted or parked. While it works,
// it tells JetStream every ackWait/3 that the messages are in progress, so that they
// are not delivered again meanwhile.
func (u *usageOut) process(ctx context.Context, msgs []jetstream.Msg) {
	ps := make([]*pending, len(msgs))
	var events []outEvent
	for i, msg := range msgs {
		p := &pending{msg: msg, raw: msg.Data(), id: msg.Headers().Get(jetstream.MsgIDHeader)}
		ps[i] = p
		var m usage.Message
		err := json.Unmarshal(p.raw, &m)
		if p.id == "" && err == nil {
			p.id = m.ID()
		}
		if p.id == "" { // names the dead letter of an undecodable message without an id
			if meta, merr := msg.Metadata(); merr == nil {
				p.id = fmt.Sprintf("%s#%d", usage.Stream, meta.Sequence.Stream)
			}
		}
		if err != nil {
			u.park(ctx, p, "decode", err, nil, nil, 0, 1)
			continue
		}
		for di := range m.Deltas {
			evs, err := deltaEvents(p.id, &m, di, u.features[m.Deltas[di].Feature], u.maxCount)
			if err != nil {
				reason := "invalid"
				if errors.Is(err, errUnmapped) {
					reason = "unmapped_feature"
				}
				u.park(ctx, p, reason, err, &di, nil, 0, 1)
				continue
			}
			p.left += len(evs)
			for _, e := range evs {
				events = append(events, outEvent{e, p})
			}
		}
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // owned here: stopped and waited for below
		defer wg.Done()
		t := time.NewTicker(u.ackWait / 3)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				for _, p := range ps {
					if !p.done.Load() {
						_ = p.msg.InProgress()
					}
				}
			case <-stop:
				return
			}
		}
	}()
	for start := 0; start < len(events) && ctx.Err() == nil; start += MaxBulkEvents {
		u.send(ctx, events[start:min(start+MaxBulkEvents, len(events))])
	}
	close(stop)
	wg.Wait()
	if ctx.Err() != nil {
		return // unacknowledged: delivered again after a restart, with the same ids
	}
	for _, p := range ps {
		if p.left == 0 && !p.failed {
			actx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if err := p.msg.DoubleAck(actx); err != nil {
				u.log.Warn("ack usage message", zap.String("msg_id", p.id), zap.Error(err))
			} else {
				u.m.messagesAcked.Inc()
			}
			cancel()
		}
		p.done.Store(true)
	}
}

// send posts events until Flexprice accepted each or it was parked, retrying what may
// succeed later with the same ids for as long as ctx lasts. A 400 names the refused
// event k: those before it were accepted, k is parked, and the rest is sent again. When
// the answer does not say which event, the batch is split until it does.
func (u *usageOut) send(ctx context.Context, evs []outEvent) {
	for failures := 0; len(evs) > 0 && ctx.Err() == nil; {
		body := struct {
			Events []Event `json:"events"`
		}{Events: make([]Event, len(evs))}
		for i := range evs {
			body.Events[i] = evs[i].Event
		}
		data, err := json.Marshal(body)
		if err == nil {
			err = u.api.call(ctx, "events_bulk", http.MethodPost, "/events/bulk", data, nil, 0)
		}
		if err == nil {
			u.accepted(evs)
			return
		}
		if ctx.Err() != nil {
			return
		}
		var ae *APIError
		if errors.As(err, &ae) && (ae.Status == http.StatusBadRequest || ae.Status == http.StatusUnprocessableEntity) {
			k := ae.badEventIndex(body.Events)
			switch {
			case k >= 0:
				u.accepted(evs[:k])
				u.park(ctx, evs[k].p, "rejected", ae, nil, &evs[k].Event, ae.Status, 1)
				evs = evs[k+1:]
			case len(evs) == 1:
				u.park(ctx, evs[0].p, "rejected", ae, nil, &evs[0].Event, ae.Status, 1)
				return
			default:
				u.send(ctx, evs[:len(evs)/2])
				u.send(ctx, evs[len(evs)/2:])
				return
			}
			continue
		}
		// Anything else (401, 403, 404, 413, …) is not the events' fault: keep them and
		// retry, loudly, until the operator fixes it.
		failures++
		wait := min(u.backoff<<min(failures, 10), u.maxWait)
		u.log.Error("send usage events; will retry", zap.Int("events", len(evs)), zap.Duration("wait", wait), zap.Error(err))
		_ = sleep(ctx, wait)
	}
}

func (u *usageOut) accepted(evs []outEvent) {
	for _, e := range evs {
		e.p.left--
	}
	u.m.eventsSent.Add(float64(len(evs)))
}

// park publishes a dead letter and waits for JetStream to store it; count is what it adds
// to the parked metric. Parking an event (ev != nil) settles that event; a message or a
// delta parked whole had no events counted in p.left.
func (u *usageOut) park(ctx context.Context, p *pending, reason string, cause error, delta *int, ev *Event, status int, count int) {
	dl := DeadLetter{Reason: reason, Error: cause.Error(), Status: status, Subject: p.msg.Subject(),
		MsgID: p.id, Delta: delta, Event: ev, ParkedAt: time.Now().UTC()}
	if json.Valid(p.raw) {
		dl.Message = p.raw
	} else {
		dl.Message, _ = json.Marshal(string(p.raw))
	}
	data, _ := json.Marshal(dl)
	dedupe := "flexprice:" + reason + ":" + p.id
	switch {
	case ev != nil:
		dedupe = "flexprice:" + reason + ":" + ev.EventID
	case delta != nil:
		dedupe += fmt.Sprintf("/%d", *delta)
	}
	u.m.eventsParked.WithLabelValues(reason).Add(float64(count))
	u.log.Warn("usage parked on dead-letter subject", zap.String("reason", reason), zap.String("msg_id", p.id),
		zap.String("subject", DeadSubject), zap.Error(cause))
	for failures := 0; ; failures++ {
		_, err := u.js.Publish(ctx, DeadSubject, data, jetstream.WithMsgID(dedupe))
		if err == nil {
			if ev != nil {
				p.left--
			}
			return
		}
		if ctx.Err() != nil || failures >= 5 {
			p.failed = true
			u.log.Error("park usage on dead-letter subject failed; message left for redelivery",
				zap.String("msg_id", p.id), zap.Error(err))
			return
		}
		_ = sleep(ctx, min(u.backoff<<failures, u.maxWait))
	}
}
