package main

import (
	"context"
	"fmt"
	"io"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
)

// usage: what usage accounting costs the request path, in one run. Two sidecars from the
// same binary, with steady's customers and workload, each with its own data directory,
// ports and NATS server (its own process); the second runs with usage: {enabled: false}. They are
// compared as steady compares the sidecar with the bare proxy: closed-loop rounds back to
// back (alternating which goes first) for throughput, open-loop pairs at -rate for
// latency, every run with its own warm-up, noisy rounds redone. Over the usage-on
// sidecar's recorded phases the harness reads what its accounting did (accounting.go):
// the recorder's Badger writes and its usage records per 1,000 requests (its counters)
// and messages published per second (its counter, or the last sequence of stream
// GATEHOUSE_USAGE on its NATS server), also in one open-loop run at -usage-rate. Not in the default set: it answers one question, for the usage work.
type usageCostScenario struct{}

func (usageCostScenario) Name() string                    { return "usage" }
func (usageCostScenario) Available(e *env) (bool, string) { return needCaps(e, capNATS, capUsage) }
func (usageCostScenario) about(o *options) string         { return usageCostAbout(o) }

// The two targets.
const (
	targetOn  = "usage-on"
	targetOff = "usage-off"
)

func usageCostAbout(o *options) string {
	return fmt.Sprintf("steady's mix on %d customers through two sidecars of one build, usage accounting on and off (usage: {enabled: false}): throughput (closed loop) and latency at %s req/s (open loop) in adjacent runs; the usage-on sidecar's Badger writes and publishes, also at %s req/s",
		o.Customers, thousands(o.Rate), thousands(o.UsageRate))
}

func (usageCostScenario) plan(o *options) time.Duration {
	closed := time.Duration(2*o.Pairs) * (o.Warmup + max(o.Duration, config.Default().Usage.FlushInterval) + perRun)
	open := time.Duration(2*o.Pairs) * (o.OpenWarmup + max(o.OpenDuration, config.Default().Usage.FlushInterval) + perRun)
	open += o.OpenWarmup + max(o.OpenDuration, 2*config.Default().Usage.FlushInterval+time.Second) + perRun
	return closed + open + 15*time.Second // two starts, sanity, leases, usage check
}

// usageCostResult is the usage scenario's part of results.json.
type usageCostResult struct {
	Customers int          `json:"customers"`
	Warm      []*runRecord `json:"warm_up_runs"` // one search per customer on each sidecar (its first leases)
	// Closed loop, in rounds of (usage-on, usage-off) back to back, alternating which
	// goes first.
	Closed          []*runRecord             `json:"closed_loop_runs"`
	Rounds          []round                  `json:"closed_loop_rounds"`
	ThroughputRatio stat                     `json:"throughput_ratio_on_vs_off"`
	AddedCPU        stat                     `json:"added_cpu_us_per_request"` // on - off, per round
	ClosedSummary   map[string]targetSummary `json:"closed_loop_summary"`
	// Open loop at -rate, in (usage-on, usage-off) pairs.
	Rate         float64                  `json:"rate"`
	Open         []*runRecord             `json:"open_loop_runs"`
	OpenPairs    []round                  `json:"open_loop_pairs"`
	P50Added     stat                     `json:"p50_added_ms"` // on - off, per pair
	P99Added     stat                     `json:"p99_added_ms"`
	P999Added    stat                     `json:"p99_9_added_ms"`
	OpenAddedCPU stat                     `json:"open_added_cpu_us_per_request"`
	OpenSummary  map[string]targetSummary `json:"open_loop_summary"`
	// One open-loop run of the usage-on sidecar at -usage-rate.
	HighRate float64      `json:"high_rate"`
	High     []*runRecord `json:"high_rate_runs"`
	// What the usage-on sidecar's accounting did: over its kept closed-loop runs, its
	// open-loop runs at -rate, and its run at -usage-rate.
	Accounting []accountingFigures `json:"accounting"`
	Exported   []string            `json:"usage_metrics_exported"` // the sidecar's gatehouse_usage_* metrics
	// What the usage-off sidecar showed of accounting over its recorded phases: it
	// must be nothing, or the comparison is not of accounting on and off.
	OffMessages uint64  `json:"usage_off_stream_messages"`
	OffRecords  float64 `json:"usage_off_records"` // gatehouse_usage_records_total; 0 when not exported
	Non2xx      int64   `json:"non_2xx"`
}

func (usageCostScenario) Run(ctx context.Context, e *env) (*scenarioResult, error) {
	o := e.o
	res := &scenarioResult{Name: "usage", About: usageCostAbout(o)}
	ur := &usageCostResult{Customers: o.Customers, Rate: o.Rate, HighRate: o.UsageRate}
	res.UsageCost = ur

	e.logf("usage: starting two sidecars with %d customers, usage accounting on and off", o.Customers)
	on, err := e.launchSidecar(ctx, targetOn, steadySnapshots(o.Customers), nil, true)
	if err != nil {
		return nil, err
	}
	defer e.stopProc(on)
	off, err := e.launchSidecar(ctx, targetOff, steadySnapshots(o.Customers), nil, false)
	if err != nil {
		return nil, err
	}
	defer e.stopProc(off)
	wl := steadyWorkload(o.Customers)
	// Both are tracked, so that the generator does the same work for each.
	admOn, admOff := e.track(on, wl), e.track(off, wl)
	if err := steadySanity(wl, admOn, on); err != nil {
		return nil, err
	}
	if err := steadySanity(wl, admOff, off); err != nil {
		return nil, err
	}
	for _, p := range []*proc{on, off} {
		w, err := e.warmLeases(ctx, "usage warm-up", p, wl, o.Customers)
		if err != nil {
			return nil, err
		}
		ur.Warm = append(ur.Warm, w)
	}
	// Both are read at the edges of every recorded phase, so that both pay for it.
	for p, adm := range map[*proc][]atomic.Int64{on: admOn, off: admOff} {
		a, err := newAccountingReader(p, adm)
		if err != nil {
			return nil, err
		}
		defer a.close()
		p.acct = a
	}

	keep := func(dst *[]*runRecord) func(*runRecord) { return func(r *runRecord) { *dst = append(*dst, r) } }
	order := func(i int) []*proc {
		if i%2 == 0 {
			return []*proc{on, off}
		}
		return []*proc{off, on}
	}

	// A closed-loop run of usage-on holds whole flush intervals too (see openDuration):
	// a 4 s run held one of the 5 s cuts or none, and the rounds' ratios with it.
	closed := runSpec{conns: o.Conns, warmup: o.Warmup, duration: e.wholeIntervals(on, o.Duration)}
	rounds, err := e.rounds(ctx, "usage closed", "closed", o.Pairs, order, wl, closed, keep(&ur.Closed))
	if err != nil {
		return nil, err
	}
	var ratios, cpu []float64
	for i, rs := range rounds {
		a, b := byName(rs.runs, targetOn), byName(rs.runs, targetOff)
		rs.Ratio = a.Throughput / b.Throughput
		ratios = append(ratios, rs.Ratio)
		cpu = append(cpu, a.TargetCPU-b.TargetCPU)
		rounds[i] = rs
	}
	ur.Rounds, ur.ThroughputRatio, ur.AddedCPU = roundsOf(rounds, nil), newStat(ratios), newStat(cpu)
	ur.ClosedSummary = summarizeRuns(ur.Closed, "closed")

	openFor := e.openDuration(on) // usage-off runs as long, in pairs
	open := runSpec{open: true, rate: o.Rate, conns: o.Conns, warmup: o.OpenWarmup, duration: openFor, drain: drainFor(openFor)}
	pairs, err := e.rounds(ctx, fmt.Sprintf("usage open %.0f/s", o.Rate), "open", o.Pairs, order, wl, open, keep(&ur.Open))
	if err != nil {
		return nil, err
	}
	var d50, d99, d999, ocpu []float64
	for i, rs := range pairs {
		a, b := byName(rs.runs, targetOn), byName(rs.runs, targetOff)
		rs.Ratio = a.Latency.P99 - b.Latency.P99
		d50 = append(d50, a.Latency.P50-b.Latency.P50)
		d99 = append(d99, rs.Ratio)
		d999 = append(d999, a.Latency.P999-b.Latency.P999)
		ocpu = append(ocpu, a.TargetCPU-b.TargetCPU)
		pairs[i] = rs
	}
	ur.OpenPairs = roundsOf(pairs, nil)
	ur.P50Added, ur.P99Added, ur.P999Added, ur.OpenAddedCPU = newStat(d50), newStat(d99), newStat(d999), newStat(ocpu)
	ur.OpenSummary = summarizeRuns(ur.Open, "open")

	// Long enough for two messages at the default flush interval, so that messages per
	// second means something.
	highFor := max(o.OpenDuration, 2*config.Default().Usage.FlushInterval+time.Second)
	high := runSpec{open: true, rate: o.UsageRate, conns: o.Conns, warmup: o.OpenWarmup, duration: highFor, drain: drainFor(highFor)}
	if _, err := e.rounds(ctx, fmt.Sprintf("usage open %.0f/s", o.UsageRate), "high", 1, func(int) []*proc { return []*proc{on} }, wl, high, keep(&ur.High)); err != nil {
		return nil, err
	}

	ur.Accounting = []accountingFigures{
		accountingOf("closed loop", 0, kept(ur.Closed, targetOn)),
		accountingOf("open loop", o.Rate, kept(ur.Open, targetOn)),
		accountingOf("open loop", o.UsageRate, kept(ur.High, targetOn)),
	}
	for _, r := range kept(ur.Closed, targetOn) {
		if r.Accounting != nil {
			ur.Exported = r.Accounting.exported
		}
	}
	var lost int64
	for _, rs := range [][]*runRecord{ur.Warm, ur.Closed, ur.Open, ur.High} {
		for _, r := range rs {
			ur.Non2xx += r.non2xx()
			if r.Target == targetOn {
				lost += r.Errors
			}
			if ac := r.Accounting; ac != nil && r.Target == targetOff {
				ur.OffMessages += ac.StreamMessages
				ur.OffRecords += ac.Counters[recordsMetric]
			}
		}
	}
	res.UsageCheck = e.checkUsage(ctx, on, wl, lost)
	usageCostChecks(res, ur)
	return res, nil
}

func usageCostChecks(res *scenarioResult, ur *usageCostResult) {
	t := ur.ThroughputRatio
	on, off := ur.ClosedSummary[targetOn], ur.ClosedSummary[targetOff]
	res.check("throughput with usage >= 0.95 x without", t.N > 0 && t.Median >= 0.95,
		"usage-on/usage-off median %.3f over %d rounds (min %.3f, max %.3f); CPU %.1f vs %.1f µs/req, added %+.1f (median of per-round differences)",
		t.Median, t.N, t.Min, t.Max, on.CPU.Median, off.CPU.Median, ur.AddedCPU.Median)
	p := ur.P99Added
	a, b := ur.OpenSummary[targetOn], ur.OpenSummary[targetOff]
	res.check(fmt.Sprintf("p99 at %.0f req/s with usage <= without + 0.3 ms", ur.Rate), p.N > 0 && atMostMs(p.Median, 0.3) && !a.Saturated,
		"usage-on p99 - usage-off p99: median %+.3f ms over %d pairs (min %+.3f, max %+.3f); merged p99 usage-on %.3f ms, usage-off %.3f ms",
		p.Median, p.N, p.Min, p.Max, a.Latency.P99, b.Latency.P99)
	res.check("every response 2xx", ur.Non2xx == 0, "%d non-2xx responses or transport errors over all runs of both sidecars", ur.Non2xx)
	res.check("usage-off sidecar accounted nothing", ur.OffMessages == 0 && ur.OffRecords == 0,
		"over its recorded phases it published %d usage messages and recorded %.0f usage records (%s)", ur.OffMessages, ur.OffRecords, recordsMetric)
	usageVerdict(res)
	res.settle()
}

// kept are the runs of target in rs that were not redone.
func kept(rs []*runRecord, target string) []*runRecord {
	var out []*runRecord
	for _, r := range rs {
		if r.Target == target && !r.Discarded {
			out = append(out, r)
		}
	}
	return out
}

func writeUsageCost(w io.Writer, ur *usageCostResult) {
	dur := 0.0
	if len(ur.Closed) > 0 {
		dur = ur.Closed[0].Seconds
	}
	order := []string{targetOn, targetOff}
	fmt.Fprintf(w, "\nClosed loop: %d rounds of (usage-on, usage-off) back to back, %.0f s each; req/s and CPU: median over rounds; latency: all rounds merged.\n", len(ur.Rounds), dur)
	writeRuns(w, ur.ClosedSummary, order, false, "vs usage-off", func(t string) string {
		if t == targetOn {
			return ratio(ur.ThroughputRatio)
		}
		return "1"
	})
	fmt.Fprintf(w, "\nOpen loop at %s req/s: %d (usage-on, usage-off) pairs; latency from the intended send time, pairs merged; added = median of per-pair differences.\n",
		thousands(ur.Rate), len(ur.OpenPairs))
	writeRuns(w, ur.OpenSummary, order, true, "added p99 ms", func(t string) string {
		if t == targetOn {
			return delta(ur.P99Added)
		}
		return "-"
	})
	fmt.Fprintf(w, "usage-on − usage-off: p50 %s ms, p99 %s ms, p99.9 %s ms; CPU %s µs/req closed loop, %s µs/req open loop\n",
		delta(ur.P50Added), delta(ur.P99Added), delta(ur.P999Added), delta(ur.AddedCPU), delta(ur.OpenAddedCPU))

	fmt.Fprintf(w, "\nUsage accounting of the usage-on sidecar over its recorded phases (kept runs):\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "runs\toffered/s\tadmitted/s\tBadger writes /1k req\trecords /1k req\tpublished msg/s\tstream msg/s\t")
	opt := func(v *float64) string {
		if v == nil {
			return "n/a"
		}
		return fmt.Sprintf("%.2f", *v)
	}
	for _, f := range ur.Accounting {
		offered, achieved := "-", thousands(f.PerSecond)
		if f.Offered > 0 {
			offered = thousands(f.Offered)
		}
		if f.Saturated {
			achieved += " (saturated)"
		}
		streamPerS := 0.0
		if f.Seconds > 0 {
			streamPerS = float64(f.StreamMessages) / f.Seconds
		}
		fmt.Fprintf(tw, "%s ×%d\t%s\t%s\t%s\t%s\t%.2f\t%.2f\t\n", f.Phase, f.Runs, offered, achieved,
			opt(f.BadgerWritesPer1k), opt(f.RecordsPer1k), f.PublishedPerS, streamPerS)
	}
	tw.Flush()
	if len(ur.Accounting) > 0 {
		f := ur.Accounting[0]
		fmt.Fprintf(w, "Badger writes: %s\npublished: %s\n", f.BadgerWritesFrom, f.PublishedFrom)
	}
	for _, f := range ur.Accounting {
		for _, e := range f.Errors {
			fmt.Fprintf(w, "  reading the counters (%s): %s\n", f.Phase, e)
		}
	}
	if n := redone(ur.Closed, ur.Open, ur.High); n > 0 {
		fmt.Fprintf(w, "%d runs were redone because other processes or steal took more than -max-noise of the machine\n", n)
	}
}
