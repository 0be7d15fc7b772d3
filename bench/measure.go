package main

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// latency is a latency distribution in milliseconds.
type latency struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p99_9"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

func summarize(h *hdrhistogram.Histogram) latency {
	if h.TotalCount() == 0 {
		return latency{}
	}
	ms := func(us int64) float64 { return float64(us) / 1000 }
	return latency{
		P50: ms(h.ValueAtQuantile(50)), P90: ms(h.ValueAtQuantile(90)), P99: ms(h.ValueAtQuantile(99)),
		P999: ms(h.ValueAtQuantile(99.9)), Max: ms(h.Max()), Mean: h.Mean() / 1000,
	}
}

// runRecord is one measured run, as results.json keeps it.
type runRecord struct {
	Phase      string           `json:"phase"` // closed | control | open | sweep | exhaust
	Target     string           `json:"target"`
	Round      int              `json:"round"`
	Open       bool             `json:"open_loop"`
	Rate       float64          `json:"offered_rate,omitempty"`
	Conns      int              `json:"conns"`
	Seconds    float64          `json:"seconds"`
	Requests   int64            `json:"requests"`
	Errors     int64            `json:"transport_errors"`
	Unsent     int64            `json:"unsent,omitempty"`
	Status     map[string]int64 `json:"status"`
	Throughput float64          `json:"throughput"`
	Latency    latency          `json:"latency_ms"`
	SendLagP50 float64          `json:"send_lag_p50_ms,omitempty"`
	SendLagP99 float64          `json:"send_lag_p99_ms,omitempty"`
	CPU        cpuUse           `json:"cpu"`
	TargetCPU  float64          `json:"target_cpu_us_per_request"`
	GenCPU     float64          `json:"generator_cpu_us_per_request"`
	Discarded  bool             `json:"discarded,omitempty"`
	// Accounting is what the target's usage accounting did over the recorded phase
	// (targets with proc.acct: the usage scenario).
	Accounting *accounting `json:"usage_accounting,omitempty"`
	Note       string      `json:"note,omitempty"`

	hist *hdrhistogram.Histogram
}

func (r *runRecord) non2xx() int64 {
	var n int64
	for k, v := range r.Status {
		if k != "2xx" {
			n += v
		}
	}
	return n + r.Errors
}

// saturated reports whether an open-loop run fell behind its schedule: requests left
// unsent, fewer answered than offered, or most requests waiting over a millisecond for a
// free connection (every connection busy: the target queues).
func (r *runRecord) saturated() bool {
	return r.Open && (r.Unsent > 0 || r.Throughput < 0.97*r.Rate || r.SendLagP50 > 1)
}

// besideUse is what something run beside a measured run (proc.beside) used: the CPU of
// its short-lived child processes, which the CPU monitor cannot see and would otherwise
// count as another process's noise.
type besideUse struct {
	cpu time.Duration
}

// members are the processes a target stands for: itself, or a view's group.
func (p *proc) members() []*proc {
	if p.group != nil {
		return p.group
	}
	return []*proc{p}
}

// view is a target that stands for group under name: loaded together, the connections
// spread over them, and with beside run next to each measured run.
func (e *env) view(name string, group []*proc, beside func(context.Context) func() besideUse) *proc {
	return &proc{name: name, addr: group[0].addr, group: group, beside: beside}
}

// measure loads target p (a process, or a view of several) and records the run.
func (e *env) measure(ctx context.Context, label, phase string, round int, p *proc, wl *workload, spec runSpec) (*runRecord, *loadResult, error) {
	var targets []loadTarget
	var names []string
	for _, m := range p.members() {
		targets = append(targets, loadTarget{addr: m.addr, admitted: e.admitted[m]})
		names = append(names, m.name)
	}
	var stopBeside func() besideUse
	if p.beside != nil {
		stopBeside = p.beside(ctx)
	}
	var edges []accountingReading
	if a := p.acct; a != nil {
		spec.edge = func() { edges = append(edges, a.read(ctx)) }
	}
	spec.slow, spec.label = e.slow, p.name+" "+label
	res, err := runLoad(ctx, targets, wl, spec, e.mon.sample)
	var bu besideUse
	if stopBeside != nil {
		bu = stopBeside()
	}
	if err != nil {
		return nil, nil, fmt.Errorf("%s against %s: %w", phase, p.name, err)
	}
	for _, m := range p.members() {
		if !m.alive() {
			return nil, nil, fmt.Errorf("%s exited during the run; log %s:\n%s", m.name, m.log, tail(m.log))
		}
	}
	r := &runRecord{
		Phase: phase, Target: p.name, Round: round, Open: spec.open, Conns: spec.conns,
		Seconds: res.elapsed.Seconds(), Requests: res.requests, Errors: res.errors, Unsent: res.unsent,
		Status: map[string]int64{}, hist: res.hist,
	}
	if spec.open {
		r.Rate = spec.rate
		r.SendLagP50 = float64(res.lag.ValueAtQuantile(50)) / 1000
		r.SendLagP99 = float64(res.lag.ValueAtQuantile(99)) / 1000
	}
	for c, n := range res.status {
		if n > 0 {
			r.Status[fmt.Sprintf("%dxx", c)] = n
		}
	}
	answered := res.requests - res.errors - res.unsent
	if r.Seconds > 0 {
		r.Throughput = float64(answered) / r.Seconds
	}
	r.Latency = summarize(res.hist)
	if len(edges) == 2 {
		r.Accounting = accountingBetween(edges[0], edges[1])
	}
	r.CPU = usage(res.cpuBefore, res.cpuAfter, e.up.name, names...)
	if bu.cpu > 0 && res.elapsed > 0 {
		// Not noise: ours, though the monitor could not see it.
		r.CPU.Beside = bu.cpu.Seconds() / (res.elapsed.Seconds() * float64(runtime.NumCPU()))
		r.CPU.Other = max(0, r.CPU.Other-r.CPU.Beside)
	}
	if answered > 0 {
		perTick := float64(time.Second/clockTicks) / float64(time.Microsecond)
		r.TargetCPU = float64(r.CPU.TargetTicks) * perTick / float64(answered)
		r.GenCPU = float64(r.CPU.GenTicks) * perTick / float64(answered)
	}
	e.logf("%-26s %-8s %s", label, p.name, r.line())
	return r, res, nil
}

// line is the run's progress line.
func (r *runRecord) line() string {
	var b strings.Builder
	if r.Open {
		fmt.Fprintf(&b, "%6.0f/%-6.0f req/s", r.Throughput, r.Rate)
	} else {
		fmt.Fprintf(&b, "%13s req/s", thousands(r.Throughput))
	}
	fmt.Fprintf(&b, "  p50 %s p99 %s p99.9 %s ms  cpu %5.1f µs/req  gen %2.0f%% tgt %2.0f%% up %2.0f%% noise %.1f%%",
		fmtMs(r.Latency.P50), fmtMs(r.Latency.P99), fmtMs(r.Latency.P999), r.TargetCPU,
		100*r.CPU.Generator, 100*r.CPU.Target, 100*r.CPU.Upstream, 100*r.CPU.noise())
	if n := r.non2xx(); n > 0 && r.Phase != "exhaust" {
		fmt.Fprintf(&b, "  NON-2xx %d", n)
	}
	if r.saturated() {
		b.WriteString("  SATURATED")
	}
	return b.String()
}

func fmtMs(v float64) string {
	switch {
	case v < 10:
		return fmt.Sprintf("%.3f", v)
	case v < 100:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.0f", v)
	}
}

// thousands formats a rate as 12,345.
func thousands(v float64) string {
	s := fmt.Sprintf("%.0f", v)
	var out []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 && s[i-1] != '-' {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	return string(out)
}
