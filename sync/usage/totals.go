package usage

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Total is the usage published for one customer's feature in one window.
type Total struct {
	CustomerID  string    `json:"customer_id"`
	Feature     string    `json:"feature"`
	WindowStart time.Time `json:"window_start"`
	Quantity    int64     `json:"quantity"`
	Overage     int64     `json:"overage"`
}

// Totals reads the whole usage stream and sums its deltas per customer, feature and
// window, sorted in that order. A missing stream has no totals. It is for operators
// (`gatehouse usage`) and tests; a billing consumer keeps its own position instead.
func Totals(ctx context.Context, js jetstream.JetStream) ([]Total, error) {
	type key struct {
		customer, feature string
		window            int64
	}
	sums := make(map[key]*Total)
	err := eachMessage(ctx, js, func(_ uint64, _ string, m *Message) error {
		for _, d := range m.Deltas {
			k := key{d.CustomerID, d.Feature, d.WindowStart.UnixNano()}
			t := sums[k]
			if t == nil {
				t = &Total{CustomerID: d.CustomerID, Feature: d.Feature, WindowStart: d.WindowStart.UTC()}
				sums[k] = t
			}
			t.Quantity += d.Quantity
			t.Overage += d.Overage
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]Total, 0, len(sums))
	for _, t := range sums {
		out = append(out, *t)
	}
	slices.SortFunc(out, func(a, b Total) int {
		return cmp.Or(cmp.Compare(a.CustomerID, b.CustomerID), cmp.Compare(a.Feature, b.Feature), a.WindowStart.Compare(b.WindowStart))
	})
	return out, nil
}

// eachMessage calls fn with every usage message in the stream, in stream order, with its
// stream sequence and Nats-Msg-Id.
func eachMessage(ctx context.Context, js jetstream.JetStream, fn func(seq uint64, id string, m *Message) error) error {
	s, err := js.Stream(ctx, Stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("usage totals: %w", err)
	}
	if s.CachedInfo().State.Msgs == 0 {
		return nil
	}
	c, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: []string{SubjectPrefix + ">"}})
	if err != nil {
		return fmt.Errorf("usage totals: consumer: %w", err)
	}
	// Fetch exactly what is pending, so that no fetch waits for messages that will not come.
	pending := c.CachedInfo().NumPending
	for pending > 0 {
		batch, err := c.Fetch(int(min(pending, 256)), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return fmt.Errorf("usage totals: fetch: %w", err)
		}
		n := 0
		for msg := range batch.Messages() {
			n++
			meta, err := msg.Metadata()
			if err != nil {
				return fmt.Errorf("usage totals: %w", err)
			}
			var m Message
			if err := json.Unmarshal(msg.Data(), &m); err != nil {
				return fmt.Errorf("usage totals: message %d: %w", meta.Sequence.Stream, err)
			}
			if err := fn(meta.Sequence.Stream, msg.Headers().Get(jetstream.MsgIDHeader), &m); err != nil {
				return err
			}
			pending = meta.NumPending
		}
		if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) {
			return fmt.Errorf("usage totals: fetch: %w", err)
		}
		if n == 0 {
			return fmt.Errorf("usage totals: stream stopped delivering with %d messages pending", pending)
		}
	}
	return ctx.Err()
}

// PrintTotals writes totals as an aligned table, or as a JSON array when asJSON is set.
func PrintTotals(w io.Writer, totals []Total, asJSON bool) error {
	if asJSON {
		if totals == nil {
			totals = []Total{}
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(totals)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "CUSTOMER\tFEATURE\tWINDOW START\tQUANTITY\tOVERAGE")
	for _, t := range totals {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\n", t.CustomerID, t.Feature, t.WindowStart.UTC().Format(time.RFC3339), t.Quantity, t.Overage)
	}
	return tw.Flush()
}
