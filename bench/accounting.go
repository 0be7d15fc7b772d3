package main

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// What a sidecar's usage accounting did over a recorded phase, read from outside: its
// counters and its usage stream, for the usage scenario (usagecost.go). measure reads a
// target whose proc.acct is set at both edges of the recorded phase.

// The counters gatehouse exports for what accounting does (internal/sidecar/admin.go).
// A sidecar with usage off exports none of them.
const (
	badgerWritesMetric = "gatehouse_usage_badger_writes_total"
	recordsMetric      = "gatehouse_usage_records_total"
	publishedMetric    = "gatehouse_usage_published_messages_total"
)

// usageStream is the JetStream stream the sidecar publishes usage to.
const usageStream = "GATEHOUSE_USAGE"

// accountingReader reads what a sidecar's usage accounting has done so far: its
// gatehouse_usage_* counters (admin /metrics), the last sequence of its usage stream
// (its own NATS server), and the 2xx answers the harness counted. It reads only when
// asked, at the edges of a recorded phase, so it adds no work to the phase itself.
type accountingReader struct {
	p        *proc
	admitted []atomic.Int64
	nc       *nats.Conn // nil when the sidecar has no NATS server of its own to read
	js       jetstream.JetStream
}

func newAccountingReader(p *proc, admitted []atomic.Int64) (*accountingReader, error) {
	a := &accountingReader{p: p, admitted: admitted}
	if p.nats == "" {
		return a, nil
	}
	nc, err := nats.Connect("nats://"+p.nats, nats.Name("gatehouse-bench"), nats.Timeout(3*time.Second))
	if err != nil {
		return nil, fmt.Errorf("connect to %s's NATS at %s: %w", p.name, p.nats, err)
	}
	if a.js, err = jetstream.New(nc); err != nil {
		nc.Close()
		return nil, err
	}
	a.nc = nc
	return a, nil
}

func (a *accountingReader) close() {
	if a.nc != nil {
		a.nc.Close()
	}
}

// accountingReading is one read of accountingReader.
type accountingReading struct {
	at       time.Time
	admitted int64
	counters map[string]float64 // gatehouse_usage_*_total, summed over labels
	names    []string           // every gatehouse_usage_* metric exported
	seq      uint64             // the stream's last sequence; 0 while it does not exist
	err      error
}

func (a *accountingReader) read(ctx context.Context) accountingReading {
	r := accountingReading{at: time.Now(), counters: map[string]float64{}}
	for i := range a.admitted {
		r.admitted += a.admitted[i].Load()
	}
	var errs []error
	err := scrape(a.p.admin, func(metric, _ string, v float64) {
		if !strings.HasPrefix(metric, "gatehouse_usage_") {
			return
		}
		if !slices.Contains(r.names, metric) {
			r.names = append(r.names, metric)
		}
		if strings.HasSuffix(metric, "_total") {
			r.counters[metric] += v
		}
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("metrics: %w", err))
	}
	if a.js != nil {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		s, err := a.js.Stream(ctx, usageStream)
		switch {
		case errors.Is(err, jetstream.ErrStreamNotFound): // usage off, or nothing published yet
		case err != nil:
			errs = append(errs, fmt.Errorf("stream %s: %w", usageStream, err))
		default:
			r.seq = s.CachedInfo().State.LastSeq
		}
	}
	sort.Strings(r.names)
	r.err = errors.Join(errs...)
	return r
}

// accounting is what a target's usage accounting did over one run's recorded phase.
type accounting struct {
	Seconds        float64            `json:"seconds"`         // between the two readings
	Admitted       int64              `json:"admitted"`        // 2xx answers between them, as the harness counted them
	Counters       map[string]float64 `json:"counters"`        // change of each gatehouse_usage_*_total counter
	StreamMessages uint64             `json:"stream_messages"` // messages added to stream GATEHOUSE_USAGE
	Error          string             `json:"error,omitempty"`
	exported       []string
}

func accountingBetween(a, b accountingReading) *accounting {
	ac := &accounting{Seconds: b.at.Sub(a.at).Seconds(), Admitted: b.admitted - a.admitted, Counters: map[string]float64{}, exported: b.names}
	for k, v := range b.counters {
		ac.Counters[k] = v - a.counters[k]
	}
	if b.seq >= a.seq {
		ac.StreamMessages = b.seq - a.seq
	}
	if err := errors.Join(a.err, b.err); err != nil {
		ac.Error = err.Error()
	}
	return ac
}

// accountingFigures add up the accounting of several runs of one kind.
type accountingFigures struct {
	Phase     string  `json:"phase"`
	Offered   float64 `json:"offered_rate,omitempty"` // open loop
	Runs      int     `json:"runs"`
	Saturated bool    `json:"saturated,omitempty"` // an open-loop run could not keep the rate
	Seconds   float64 `json:"seconds"`
	Admitted  int64   `json:"admitted"`
	PerSecond float64 `json:"admitted_per_s"`
	// Badger write transactions of the usage recorder (message cuts, acknowledgements,
	// settling into the counters; none on the request path), from the counter named in
	// BadgerWritesFrom; nil when the sidecar does not export it.
	BadgerWrites      *float64 `json:"badger_writes,omitempty"`
	BadgerWritesPer1k *float64 `json:"badger_writes_per_1000_requests,omitempty"`
	BadgerWritesFrom  string   `json:"badger_writes_from"`
	// Usage records made durable (one per metered feature of an admitted request).
	Records      *float64 `json:"records,omitempty"`
	RecordsPer1k *float64 `json:"records_per_1000_requests,omitempty"`
	// Messages published: from the sidecar's counter when it exports one, else from
	// the stream's sequence (exact: nothing else publishes into a sidecar's own NATS).
	Published      float64  `json:"messages_published"`
	PublishedPerS  float64  `json:"messages_published_per_s"`
	PublishedFrom  string   `json:"messages_published_from"`
	StreamMessages uint64   `json:"stream_messages"`
	Errors         []string `json:"errors,omitempty"`
}

func accountingOf(phase string, offered float64, runs []*runRecord) accountingFigures {
	f := accountingFigures{Phase: phase, Offered: offered}
	counters := map[string]float64{}
	var exported []string
	for _, r := range runs {
		f.Saturated = f.Saturated || r.saturated()
		ac := r.Accounting
		if ac == nil {
			continue
		}
		f.Runs++
		f.Seconds += ac.Seconds
		f.Admitted += ac.Admitted
		f.StreamMessages += ac.StreamMessages
		for k, v := range ac.Counters {
			counters[k] += v
		}
		exported = ac.exported
		if ac.Error != "" {
			f.Errors = append(f.Errors, ac.Error)
		}
	}
	if f.Runs == 0 || f.Seconds <= 0 {
		f.BadgerWritesFrom, f.PublishedFrom = "not measured", "not measured"
		return f
	}
	f.PerSecond = float64(f.Admitted) / f.Seconds
	per1k := func(v float64) *float64 {
		if f.Admitted == 0 {
			return nil
		}
		return ptr(1000 * v / float64(f.Admitted))
	}
	if v, ok := counters[badgerWritesMetric]; ok {
		f.BadgerWrites, f.BadgerWritesPer1k, f.BadgerWritesFrom = ptr(v), per1k(v), badgerWritesMetric
	} else {
		f.BadgerWritesFrom = "not measured: the sidecar exports no " + badgerWritesMetric + " (its usage metrics: " + strings.Join(exported, ", ") + ")"
	}
	if v, ok := counters[recordsMetric]; ok {
		f.Records, f.RecordsPer1k = ptr(v), per1k(v)
	}
	if v, ok := counters[publishedMetric]; ok {
		f.Published, f.PublishedFrom = v, publishedMetric
	} else {
		f.Published, f.PublishedFrom = float64(f.StreamMessages), "stream "+usageStream+" (last sequence): the sidecar exports no "+publishedMetric
	}
	f.PublishedPerS = f.Published / f.Seconds
	return f
}
