package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// What a sidecar's usage accounting did over a recorded phase, read from outside: its
// counters, its usage stream, and its outbox, for the usage scenario (usagecost.go).
// measure reads a target whose proc.acct is set at both edges of the recorded phase.

// The counters gatehouse exports for what accounting does (internal/sidecar/admin.go);
// builds from before they existed fall back to the outbox sampling and the stream.
var (
	commitMetrics    = []string{"gatehouse_usage_commits_total"}
	recordMetrics    = []string{"gatehouse_usage_records_total"}
	publishedMetrics = []string{"gatehouse_usage_published_messages_total"}
)

// usageStream is the JetStream stream the sidecar publishes usage to.
const usageStream = "GATEHOUSE_USAGE"

// accountingReader reads what a sidecar's usage accounting has done so far: its
// gatehouse_usage_* counters (admin /metrics), the last sequence of its usage stream
// (its embedded NATS), and the 2xx answers the harness counted. Between begin and end it
// samples the outbox's batch count (admin /v1/status) every outboxSampleEvery, from
// which it estimates the group commits when the build exports no counter of them.
type accountingReader struct {
	p        *proc
	admitted []atomic.Int64
	nc       *nats.Conn // nil when the sidecar has no embedded NATS to read
	js       jetstream.JetStream
	hc       *http.Client
	sampling *outboxSampler // between begin and end
}

func newAccountingReader(p *proc, admitted []atomic.Int64) (*accountingReader, error) {
	a := &accountingReader{p: p, admitted: admitted, hc: &http.Client{Timeout: time.Second}}
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
	a.hc.CloseIdleConnections()
}

// begin reads the counters at the start of a recorded phase and starts sampling.
func (a *accountingReader) begin(ctx context.Context) accountingReading {
	r := a.read(ctx)
	a.sampling = a.sample(ctx)
	return r
}

// end stops sampling and reads the counters at the end of a recorded phase.
func (a *accountingReader) end(ctx context.Context) accountingReading {
	var s outboxSample
	if a.sampling != nil {
		s = a.sampling.finish()
		a.sampling = nil
	}
	r := a.read(ctx)
	r.sampled = s
	return r
}

// accountingReading is one read of accountingReader.
type accountingReading struct {
	at       time.Time
	admitted int64
	counters map[string]float64 // gatehouse_usage_*_total, summed over labels
	names    []string           // every gatehouse_usage_* metric exported
	seq      uint64             // the stream's last sequence; 0 while it does not exist
	sampled  outboxSample       // end: what sampling saw since begin
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

// outboxSampleEvery is how often the outbox is sampled during a recorded phase.
const outboxSampleEvery = 10 * time.Millisecond

// outboxSampler follows gatehouse's outbox batch count (one batch per group commit; a
// publish takes every batch there is) to count group commits: the sum of its rises,
// and after each fall (a publish) the count it fell to. That misses only the commits
// between the last sample before a publish and the publish: at most one interval's
// worth per publish (usage.flush_interval, 1 s by default), so it is a lower bound
// within about outboxSampleEvery / flush_interval.
type outboxSampler struct {
	stop chan struct{}
	done chan struct{}
	res  outboxSample
}

// outboxSample is what an outboxSampler saw.
type outboxSample struct {
	Commits int64  `json:"group_commits"`
	Samples int    `json:"samples"`
	Falls   int    `json:"publishes_seen"`
	Usage   bool   `json:"-"` // the sidecar reports an outbox (usage on)
	Error   string `json:"error,omitempty"`
}

func (a *accountingReader) sample(ctx context.Context) *outboxSampler {
	s := &outboxSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(outboxSampleEvery)
		defer t.Stop()
		last := int64(-1)
		for {
			n, ok, err := a.outboxBatches()
			switch {
			case err != nil:
				if s.res.Error == "" {
					s.res.Error = err.Error()
				}
			case ok:
				s.res.Usage = true
				s.res.Samples++
				if last >= 0 {
					if n >= last {
						s.res.Commits += n - last
					} else {
						s.res.Commits += n
						s.res.Falls++
					}
				}
				last = n
			}
			select {
			case <-s.stop:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return s
}

func (s *outboxSampler) finish() outboxSample {
	close(s.stop)
	<-s.done
	return s.res
}

// outboxBatches reads usage.outbox_batches from the sidecar's admin /v1/status; ok is
// false when it has no usage outbox.
func (a *accountingReader) outboxBatches() (n int64, ok bool, err error) {
	resp, err := a.hc.Get("http://" + a.p.admin + "/v1/status")
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	var st struct {
		Usage *struct {
			OutboxBatches int64 `json:"outbox_batches"`
		} `json:"usage"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return 0, false, fmt.Errorf("GET /v1/status: %w", err)
	}
	if st.Usage == nil {
		return 0, false, nil
	}
	return st.Usage.OutboxBatches, true, nil
}

// accounting is what a target's usage accounting did over one run's recorded phase.
type accounting struct {
	Seconds        float64            `json:"seconds"`                  // between the two readings
	Admitted       int64              `json:"admitted"`                 // 2xx answers between them, as the harness counted them
	Counters       map[string]float64 `json:"counters"`                 // change of each gatehouse_usage_*_total counter
	StreamMessages uint64             `json:"stream_messages"`          // messages added to stream GATEHOUSE_USAGE
	Outbox         *outboxSample      `json:"outbox_sampled,omitempty"` // usage on: the group commits sampling saw
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
	if b.sampled.Usage {
		ac.Outbox = &b.sampled
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
	// Group commits (Badger write transactions of the usage writer), from CommitsFrom:
	// the sidecar's counter when it exports one, else the outbox sampling's estimate.
	Commits      *float64 `json:"group_commits,omitempty"`
	CommitsPer1k *float64 `json:"group_commits_per_1000_requests,omitempty"`
	CommitsFrom  string   `json:"group_commits_from"`
	Estimated    bool     `json:"group_commits_estimated,omitempty"`
	SampledPer1k *float64 `json:"group_commits_sampled_per_1000_requests,omitempty"` // always, as a cross-check
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
	var sampled outboxSample
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
		if o := ac.Outbox; o != nil {
			sampled.Usage = true
			sampled.Commits += o.Commits
			sampled.Samples += o.Samples
			sampled.Falls += o.Falls
			if o.Error != "" {
				f.Errors = append(f.Errors, "sampling the outbox: "+o.Error)
			}
		}
	}
	if f.Runs == 0 || f.Seconds <= 0 {
		f.CommitsFrom, f.PublishedFrom = "not measured", "not measured"
		return f
	}
	f.PerSecond = float64(f.Admitted) / f.Seconds
	per1k := func(v float64) *float64 {
		if f.Admitted == 0 {
			return nil
		}
		return ptr(1000 * v / float64(f.Admitted))
	}
	find := func(names []string) (string, float64, bool) {
		for _, n := range names {
			if v, ok := counters[n]; ok {
				return n, v, true
			}
		}
		return "", 0, false
	}
	if sampled.Usage {
		f.SampledPer1k = per1k(float64(sampled.Commits))
	}
	switch name, v, ok := find(commitMetrics); {
	case ok:
		f.Commits, f.CommitsPer1k, f.CommitsFrom = ptr(v), per1k(v), name
	case sampled.Usage:
		v := float64(sampled.Commits)
		f.Commits, f.CommitsPer1k, f.Estimated = ptr(v), per1k(v), true
		f.CommitsFrom = fmt.Sprintf("estimated from the outbox's batch count (admin /v1/status usage.outbox_batches, one batch per group commit) sampled every %s, %d samples, %d publishes seen: a lower bound, short by at most the commits of one interval per publish; this build exports no counter of group commits (its usage metrics: %s)",
			outboxSampleEvery, sampled.Samples, sampled.Falls, strings.Join(exported, ", "))
	default:
		f.CommitsFrom = "not measured: this build exports no counter of group commits (its usage metrics: " + strings.Join(exported, ", ") + ") and reports no outbox"
	}
	if _, v, ok := find(recordMetrics); ok {
		f.RecordsPer1k = per1k(v)
	}
	if name, v, ok := find(publishedMetrics); ok {
		f.Published, f.PublishedFrom = v, name
	} else {
		f.Published, f.PublishedFrom = float64(f.StreamMessages), "stream "+usageStream+" (last sequence): this build exports no gatehouse_usage_published counter"
	}
	f.PublishedPerS = f.Published / f.Seconds
	return f
}
