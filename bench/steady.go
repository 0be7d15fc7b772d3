package main

import (
	"context"
	"fmt"
	"sort"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
)

// steady: 10,000 customers on a mix of boolean and metered routes, nobody near a limit.
// It answers "what does the check cost?" against the bare fasthttp proxy (the ceiling
// for any fasthttp sidecar) and nginx, closed-loop (throughput) and open-loop (latency
// at a fixed rate, and latency against load for the chart).
type steadyScenario struct{}

func (steadyScenario) Name() string                  { return "steady" }
func (steadyScenario) Available(*env) (bool, string) { return true, "" }

const steadyAbout = "customers on a mix of boolean and metered routes (hello: metered + static header; analytics: boolean; search: two metered, one costed by a request header), nobody near a limit"

// steadyResult is steady's part of results.json.
type steadyResult struct {
	Customers int    `json:"customers"`
	Nginx     string `json:"nginx"`
	// Warm is one search per customer before anything is measured (its first leases).
	Warm *runRecord `json:"warm_up_run"`
	// Closed loop, in rounds: each round measures sidecar and bare proxy back to back
	// (alternating which goes first) and nginx next to the bare proxy.
	Closed            []*runRecord             `json:"closed_loop_runs"`
	Rounds            []round                  `json:"closed_loop_rounds"`
	ThroughputVsBare  stat                     `json:"throughput_ratio_sidecar_vs_bare"`
	ThroughputVsNginx stat                     `json:"throughput_ratio_sidecar_vs_nginx"`
	BareVsNginx       stat                     `json:"throughput_ratio_bare_vs_nginx"`
	Control           stat                     `json:"control_ratio_bare_vs_bare"`
	AddedCPU          stat                     `json:"added_cpu_us_per_request"`
	ClosedSummary     map[string]targetSummary `json:"closed_loop_summary"`
	// Open loop at -rate, in (sidecar, bare) pairs; nginx and the upstream once each.
	Rate        float64                  `json:"rate"`
	Open        []*runRecord             `json:"open_loop_runs"`
	OpenPairs   []round                  `json:"open_loop_pairs"`
	P50Added    stat                     `json:"p50_added_ms"`
	P99Added    stat                     `json:"p99_added_ms"`
	P999Added   stat                     `json:"p99_9_added_ms"`
	OpenSummary map[string]targetSummary `json:"open_loop_summary"`
	Sweep       []*runRecord             `json:"sweep_runs"`
	Profiles    []profileResult          `json:"profiles,omitempty"`
	Non2xx      int64                    `json:"non_2xx"`
}

// round is one round (closed loop) or pair (open loop).
type round struct {
	Round     int      `json:"round"`
	Order     []string `json:"order"`
	Ratio     float64  `json:"sidecar_vs_bare"` // throughput ratio, or p99 difference in ms
	Noise     float64  `json:"noise"`           // the most another process or steal took in any run
	Discarded bool     `json:"discarded,omitempty"`
	Note      string   `json:"note,omitempty"`
}

// targetSummary merges a target's kept runs of one phase.
type targetSummary struct {
	Runs       int     `json:"runs"`
	Throughput stat    `json:"throughput"`
	CPU        stat    `json:"cpu_us_per_request"`
	Latency    latency `json:"latency_ms"`
	Saturated  bool    `json:"saturated,omitempty"`
}

// plan is steady's length when nothing is redone, with nginx and the control round.
func (steadyScenario) plan(o *options) time.Duration {
	closed := time.Duration(1+3*o.Pairs) * (o.Warmup + o.Duration + perRun)
	if o.Control {
		closed += 2 * (o.Warmup + o.Duration + perRun)
	}
	open := time.Duration(2*o.Pairs+2) * (o.OpenWarmup + planOpen(o) + perRun)
	sweep := time.Duration(4*len(o.Rates)) * (o.OpenWarmup + o.SweepDuration + perRun)
	return closed + open + sweep + 10*time.Second // start, sanity, leases, usage check
}

func (steadyScenario) Run(ctx context.Context, e *env) (*scenarioResult, error) {
	o := e.o
	res := &scenarioResult{Name: "steady", About: fmt.Sprintf("%d %s", o.Customers, steadyAbout)}
	sr := &steadyResult{Customers: o.Customers, Rate: o.Rate}
	res.Steady = sr

	ts, err := startSteadyTargets(ctx, e)
	if err != nil {
		return nil, err
	}
	defer ts.stop(e)
	sidecar, bare, bareB, ngx := ts.sidecar, ts.bare, ts.bareB, ts.nginx
	sr.Nginx = ts.nginxNote
	wl := steadyWorkload(o.Customers)
	admitted := e.track(sidecar, wl)
	if err := steadySanity(wl, admitted, sidecar, bare, bareB, ngx, e.up); err != nil {
		return nil, err
	}
	warm, err := e.warmLeases(ctx, "steady warm-up", sidecar, wl, o.Customers)
	if err != nil {
		return nil, err
	}
	sr.Warm = warm

	closed := runSpec{conns: o.Conns, warmup: o.Warmup, duration: o.Duration}
	keep := func(dst *[]*runRecord) func(*runRecord) { return func(r *runRecord) { *dst = append(*dst, r) } }

	// Closed loop: the upstream alone once, then rounds.
	if _, err := e.runOnce(ctx, "steady closed", "closed", 0, e.up, wl, closed, keep(&sr.Closed)); err != nil {
		return nil, err
	}
	order := func(i int) []*proc {
		if i%2 == 0 {
			return nonNil(sidecar, bare, ngx)
		}
		return nonNil(ngx, bare, sidecar)
	}
	rounds, err := e.rounds(ctx, "steady closed", "closed", o.Pairs, order, wl, closed, keep(&sr.Closed))
	if err != nil {
		return nil, err
	}
	var vsBare, vsNginx, bareNginx, addedCPU []float64
	for i, rs := range rounds {
		s, b, n := byName(rs.runs, "sidecar"), byName(rs.runs, "bare"), byName(rs.runs, "nginx")
		rs.Ratio = s.Throughput / b.Throughput
		vsBare = append(vsBare, rs.Ratio)
		addedCPU = append(addedCPU, s.TargetCPU-b.TargetCPU)
		if n != nil {
			vsNginx = append(vsNginx, s.Throughput/n.Throughput)
			bareNginx = append(bareNginx, b.Throughput/n.Throughput)
		}
		rounds[i] = rs
	}
	sr.Rounds = roundsOf(rounds, sr.Rounds)
	sr.ThroughputVsBare, sr.ThroughputVsNginx, sr.BareVsNginx = newStat(vsBare), newStat(vsNginx), newStat(bareNginx)
	sr.AddedCPU = newStat(addedCPU)
	if bareB != nil {
		ctl, err := e.rounds(ctx, "steady control", "control", 1, func(int) []*proc { return []*proc{bare, bareB} }, wl, closed, keep(&sr.Closed))
		if err != nil {
			return nil, err
		}
		var v []float64
		for _, rs := range ctl {
			v = append(v, byName(rs.runs, "bare").Throughput/byName(rs.runs, "bare-b").Throughput)
		}
		sr.Control = newStat(v)
	}
	sr.ClosedSummary = summarizeRuns(sr.Closed, "closed")
	if o.Profile {
		if sr.Profiles, err = e.profile(ctx, wl, closed, sidecar, bare); err != nil {
			return nil, err
		}
	}

	// Open loop at the fixed rate: (sidecar, bare) pairs, then nginx and the upstream.
	openFor := e.openDuration(sidecar)
	open := runSpec{open: true, rate: o.Rate, conns: o.Conns, warmup: o.OpenWarmup, duration: openFor, drain: drainFor(openFor)}
	pairOrder := func(i int) []*proc {
		if i%2 == 0 {
			return []*proc{sidecar, bare}
		}
		return []*proc{bare, sidecar}
	}
	label := fmt.Sprintf("steady open %.0f/s", o.Rate)
	pairs, err := e.rounds(ctx, label, "open", o.Pairs, pairOrder, wl, open, keep(&sr.Open))
	if err != nil {
		return nil, err
	}
	var d50, d99, d999 []float64
	for i, rs := range pairs {
		s, b := byName(rs.runs, "sidecar"), byName(rs.runs, "bare")
		rs.Ratio = s.Latency.P99 - b.Latency.P99
		d50 = append(d50, s.Latency.P50-b.Latency.P50)
		d99 = append(d99, rs.Ratio)
		d999 = append(d999, s.Latency.P999-b.Latency.P999)
		pairs[i] = rs
	}
	sr.OpenPairs = roundsOf(pairs, nil)
	sr.P50Added, sr.P99Added, sr.P999Added = newStat(d50), newStat(d99), newStat(d999)
	for _, p := range nonNil(ngx, e.up) {
		if _, err := e.runOnce(ctx, label, "open", 0, p, wl, open, keep(&sr.Open)); err != nil {
			return nil, err
		}
	}
	sr.OpenSummary = summarizeRuns(sr.Open, "open")

	// Latency against load, for the chart.
	for i, rate := range o.Rates {
		if rate == o.Rate {
			continue
		}
		spec := runSpec{open: true, rate: rate, conns: o.Conns, warmup: o.OpenWarmup, duration: o.SweepDuration, drain: drainFor(o.SweepDuration)}
		ts := nonNil(e.up, bare, sidecar, ngx)
		if i%2 == 1 {
			ts = nonNil(ngx, sidecar, bare, e.up)
		}
		for _, p := range ts {
			if _, err := e.runOnce(ctx, fmt.Sprintf("steady sweep %.0f/s", rate), "sweep", 0, p, wl, spec, keep(&sr.Sweep)); err != nil {
				return nil, err
			}
		}
	}

	var lost int64
	for _, rs := range [][]*runRecord{{sr.Warm}, sr.Closed, sr.Open, sr.Sweep} {
		for _, r := range rs {
			sr.Non2xx += r.non2xx()
			if r.Target == "sidecar" {
				lost += r.Errors
			}
		}
	}
	res.UsageCheck = e.checkUsage(ctx, sidecar, wl, lost)
	steadyChecks(res, sr)
	return res, nil
}

func steadyChecks(res *scenarioResult, sr *steadyResult) {
	t := sr.ThroughputVsBare
	control := "not measured"
	if sr.Control.N > 0 {
		control = fmt.Sprintf("%.3f", sr.Control.Median)
	}
	res.check("throughput >= 0.90 x bare proxy", t.Median >= 0.90,
		"sidecar/bare median %.3f over %d rounds (min %.3f, max %.3f); control bare/bare-b %s",
		t.Median, t.N, t.Min, t.Max, control)
	p := sr.P99Added
	s, b := sr.OpenSummary["sidecar"], sr.OpenSummary["bare"]
	res.check(fmt.Sprintf("p99 at %.0f req/s <= bare + 0.3 ms", sr.Rate), atMostMs(p.Median, 0.3) && !s.Saturated,
		"sidecar p99 - bare p99: median %+.3f ms over %d pairs (min %+.3f, max %+.3f); merged p99 sidecar %.3f ms, bare %.3f ms",
		p.Median, p.N, p.Min, p.Max, s.Latency.P99, b.Latency.P99)
	res.check("every steady response 2xx", sr.Non2xx == 0, "%d non-2xx responses or transport errors over all runs", sr.Non2xx)
	usageVerdict(res)
	res.settle()
}

// steadyTargets are the processes steady loads besides the upstream.
type steadyTargets struct {
	sidecar, bare, bareB, nginx *proc // bareB and nginx may be nil
	nginxNote                   string
}

func startSteadyTargets(ctx context.Context, e *env) (ts *steadyTargets, err error) {
	ts = &steadyTargets{}
	defer func() {
		if err != nil {
			ts.stop(e)
		}
	}()
	e.logf("steady: starting the sidecar (%d customers), the bare proxy and the baselines", e.o.Customers)
	if ts.sidecar, err = e.startSidecar(ctx, "sidecar", steadySnapshots(e.o.Customers)); err != nil {
		return nil, err
	}
	if ts.bare, err = e.startBare(ctx, "bare"); err != nil {
		return nil, err
	}
	if e.o.Control {
		if ts.bareB, err = e.startBare(ctx, "bare-b"); err != nil {
			return nil, err
		}
	}
	ts.nginxNote = e.nginxNo
	if e.nginx != "" {
		if ts.nginx, err = e.startNginx(ctx); err != nil {
			ts.nginxNote, err = "not measured: "+err.Error(), nil
		} else {
			ts.nginxNote = e.machine.Nginx
		}
	}
	if ts.nginx == nil {
		e.logf("nginx: %s", ts.nginxNote)
	}
	return ts, nil
}

func (ts *steadyTargets) stop(e *env) {
	for _, p := range []*proc{ts.nginx, ts.bareB, ts.bare, ts.sidecar} {
		e.stopProc(p)
	}
}

// roundResult is one round's kept runs.
type roundResult struct {
	round
	runs []*runRecord
}

// rounds runs n rounds; round i measures the targets order(i) back to back. A round in
// which another process or the hypervisor took more than -max-noise of the machine is
// redone, up to -max-redo times per call; sink receives every run, redone ones marked.
func (e *env) rounds(ctx context.Context, label, phase string, n int, order func(int) []*proc, wl *workload, spec runSpec, sink func(*runRecord)) ([]roundResult, error) {
	var out []roundResult
	redos := 0
	e.waitQuiet(ctx, label)
	for i := 0; i < n; i++ {
		ts := order(i)
		rr := roundResult{round: round{Round: i + 1}}
		started := time.Now()
		for _, p := range ts {
			rr.Order = append(rr.Order, p.name)
			r, _, err := e.measure(ctx, fmt.Sprintf("%s %d/%d", label, i+1, n), phase, i+1, p, wl, spec)
			if err != nil {
				return nil, err
			}
			rr.Noise = max(rr.Noise, r.CPU.noise())
			rr.runs = append(rr.runs, r)
			sink(r)
		}
		if rr.Noise > e.o.MaxNoise {
			if redos < e.o.MaxRedo && e.spend(time.Since(started)) {
				redos++
				for _, r := range rr.runs {
					r.Discarded, r.Note = true, fmt.Sprintf("redone: noise %.1f%% > %.1f%%", 100*rr.Noise, 100*e.o.MaxNoise)
				}
				e.logf("%s %d/%d: other processes took %.1f%% of the machine; redoing it", label, i+1, n, 100*rr.Noise)
				e.waitQuiet(ctx, label)
				i--
				continue
			}
			rr.Note = fmt.Sprintf("noisy (%.1f%%) but out of redos or time", 100*rr.Noise)
			e.logf("%s %d/%d: other processes took %.1f%% of the machine; kept (no redos or time left)", label, i+1, n, 100*rr.Noise)
		}
		out = append(out, rr)
	}
	return out, nil
}

// runOnce measures one target once.
func (e *env) runOnce(ctx context.Context, label, phase string, round int, p *proc, wl *workload, spec runSpec, sink func(*runRecord)) (*runRecord, error) {
	r, _, err := e.measure(ctx, label, phase, round, p, wl, spec)
	if err != nil {
		return nil, err
	}
	sink(r)
	return r, nil
}

func roundsOf(rs []roundResult, dst []round) []round {
	for _, r := range rs {
		dst = append(dst, r.round)
	}
	return dst
}

// summarizeRuns merges the kept runs of one phase by target.
func summarizeRuns(runs []*runRecord, phase string) map[string]targetSummary {
	type acc struct {
		h        *hdrhistogram.Histogram
		thr, cpu []float64
		sat      bool
	}
	m := map[string]*acc{}
	for _, r := range runs {
		if r.Discarded || r.Phase != phase {
			continue
		}
		a := m[r.Target]
		if a == nil {
			a = &acc{h: newHist()}
			m[r.Target] = a
		}
		a.h.Merge(r.hist)
		a.thr = append(a.thr, r.Throughput)
		a.cpu = append(a.cpu, r.TargetCPU)
		a.sat = a.sat || r.saturated()
	}
	out := map[string]targetSummary{}
	for name, a := range m {
		out[name] = targetSummary{Runs: len(a.thr), Throughput: newStat(a.thr), CPU: newStat(a.cpu), Latency: summarize(a.h), Saturated: a.sat}
	}
	return out
}

func byName(rs []*runRecord, name string) *runRecord {
	for _, r := range rs {
		if r.Target == name {
			return r
		}
	}
	return nil
}

func nonNil(ps ...*proc) []*proc {
	var out []*proc
	for _, p := range ps {
		if p != nil {
			out = append(out, p)
		}
	}
	return out
}

// drainFor bounds how long an open-loop run waits for its queue after the last send.
func drainFor(d time.Duration) time.Duration {
	return min(5*time.Second, max(2*time.Second, d))
}

// steadySanity sends one request of each route to every target before anything is
// measured: all must answer 200, and the sidecar must refuse an unknown customer.
func steadySanity(wl *workload, admitted []atomic.Int64, sidecar *proc, others ...*proc) error {
	for _, p := range append([]*proc{sidecar}, others...) {
		if p == nil {
			continue
		}
		w := &worker{addr: p.addr}
		for i := range steadyRoutes {
			st := w.do(wl.reqs[i])
			if st != 200 {
				return fmt.Errorf("sanity: %s answered %d to route %s:\n%s\nlog %s", p.name, st, steadyRoutes[i].name, w.resp.Body(), p.log)
			}
			if p == sidecar && admitted != nil {
				admitted[i].Add(1)
			}
		}
		if p == sidecar {
			if st := w.do(request("GET", "/v1/hello", "nobody-at-all")); st != 403 {
				return fmt.Errorf("sanity: the sidecar answered %d, not 403, to an unknown customer", st)
			}
		}
		if w.conn != nil {
			w.conn.Close()
		}
	}
	return nil
}

// sortedTargets lists summary keys in display order.
func sortedTargets(m map[string]targetSummary) []string {
	rank := map[string]int{"sidecar": 0, "bare": 1, "bare-b": 2, "nginx": 3, "upstream": 4}
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Slice(ks, func(a, b int) bool { return rank[ks[a]] < rank[ks[b]] })
	return ks
}
