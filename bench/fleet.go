package main

import (
	"context"
	"fmt"
	"io"
	"time"
)

// fleet: several sidecars, each its own process with its own data directory and ports,
// share one NATS (the first one's server; the others connect to it through
// nats.urls) and so each customer's hard limits, through leases in KV bucket
// gatehouse_quota. It answers two questions. What does a fleet do on this machine
// against one sidecar alone (closed loop, the same connections spread over the fleet)?
// And does the fleet hold hard limits exactly when customers run into them through all
// sidecars at once: admitted == sum of limits, never more?
type fleetScenario struct{}

func (fleetScenario) Name() string                    { return "fleet" }
func (fleetScenario) Available(e *env) (bool, string) { return needCaps(e, capNATS, capFleet) }

func (fleetScenario) about(o *options) string {
	return fmt.Sprintf("%d sidecars sharing one NATS (a server of its own process): %d customers far from their limits loaded closed-loop over the fleet and over one sidecar alone; then %d customers with hard limits of 0 to 250 requests (window NEVER) exhausted through all sidecars at once, in bursts of up to %d concurrent requests per customer",
		o.Fleet, o.FleetCusts, o.ExhaustCusts, o.Conns)
}

func (fleetScenario) plan(o *options) time.Duration {
	start := time.Second + time.Duration(o.Fleet)*500*time.Millisecond
	closed := time.Duration(2*o.FleetRounds) * (o.Warmup + o.CompareDur + perRun)
	return start + closed + 14*time.Second // first leases, exhaust, usage check, shutdown
}

// fleetResult is fleet's part of results.json.
type fleetResult struct {
	Sidecars  int `json:"sidecars"`
	Customers int `json:"customers"`
	// Closed loop, in rounds of (one sidecar, the fleet) back to back, alternating which
	// goes first, after one search per customer on each sidecar (its first leases).
	Warm            []*runRecord             `json:"warm_up_runs"`
	Closed          []*runRecord             `json:"closed_loop_runs"`
	Rounds          []round                  `json:"closed_loop_rounds"`
	ThroughputRatio stat                     `json:"throughput_ratio_fleet_vs_one"`
	ClosedSummary   map[string]targetSummary `json:"closed_loop_summary"`
	Non2xx          int64                    `json:"closed_loop_non_2xx"`
	// The exhaust phase over the whole fleet.
	Exhaust *exhaustResult `json:"exhaust"`
	Planned int64          `json:"exhaust_planned"`
	Over    int            `json:"customers_over_limit"`
	Under   int            `json:"customers_under_limit"`
	// Lease refills (gatehouse_lease_refills_total), by phase and sidecar.
	Refills      []fleetRefills `json:"lease_refills"`
	RefillErrors float64        `json:"lease_refill_errors"`
	Metrics      string         `json:"metrics_error,omitempty"`
}

// fleetRefills are the lease refills of one phase.
type fleetRefills struct {
	Phase      string    `json:"phase"`
	Requests   int64     `json:"requests"` // answered in the phase, all sidecars
	Refills    float64   `json:"refills"`
	PerSidecar []float64 `json:"per_sidecar"`
}

func (fleetScenario) Run(ctx context.Context, e *env) (*scenarioResult, error) {
	o := e.o
	res := &scenarioResult{Name: "fleet", About: fleetScenario{}.about(o)}
	fr := &fleetResult{Sidecars: o.Fleet, Customers: o.FleetCusts}
	res.Fleet = fr

	// One template space for both phases, so that each sidecar's 2xx counts cover both.
	thr := steadyWorkload(o.FleetCusts)
	plan := newExhaustPlan(o.ExhaustCusts, o.Conns)
	offset := uint32(len(thr.reqs))
	thr.reqs = append(thr.reqs, plan.wl.reqs...)
	thr.uses = append(thr.uses, plan.wl.uses...)
	exh := &workload{reqs: thr.reqs, uses: thr.uses, shared: true, track: true}
	for _, t := range plan.wl.order {
		exh.order = append(exh.order, t+offset)
	}

	e.logf("fleet: starting %d sidecars on one NATS (%d + %d customers)", o.Fleet, o.FleetCusts, o.ExhaustCusts)
	scs := make([]*proc, 0, o.Fleet)
	defer func() {
		for i := len(scs) - 1; i >= 0; i-- { // the one with the NATS server last
			e.stopProc(scs[i])
		}
	}()
	first, err := e.startSidecar(ctx, "fleet-1", append(steadySnapshots(o.FleetCusts), plan.snapshots()...))
	if err != nil {
		return nil, err
	}
	scs = append(scs, first)
	for i := 2; i <= o.Fleet; i++ {
		p, err := e.startSidecarWith(ctx, fmt.Sprintf("fleet-%d", i), nil, []string{"nats://" + first.nats})
		if err != nil {
			return nil, err
		}
		scs = append(scs, p)
	}
	for _, p := range scs {
		admitted := e.track(p, thr)
		if err := steadySanity(thr, admitted, p); err != nil {
			return nil, err
		}
	}

	// refills scrapes every sidecar's lease counters; refill errors are kept as totals.
	refills := func() []float64 {
		out := make([]float64, len(scs))
		fr.RefillErrors = 0
		for i, p := range scs {
			vs, err := metricSums(p.admin, "gatehouse_lease_refills_total", "gatehouse_lease_refill_errors_total")
			if err != nil {
				fr.Metrics = err.Error()
				continue
			}
			out[i] = vs["gatehouse_lease_refills_total"]
			fr.RefillErrors += vs["gatehouse_lease_refill_errors_total"]
		}
		return out
	}
	// phase records the refills since before, and returns the new counts.
	phase := func(name string, before []float64, requests int64) []float64 {
		after := refills()
		f := fleetRefills{Phase: name, Requests: requests}
		for i := range after {
			f.PerSidecar = append(f.PerSidecar, after[i]-before[i])
			f.Refills += after[i] - before[i]
		}
		fr.Refills = append(fr.Refills, f)
		return after
	}

	one := e.view("one", scs[:1], nil)
	all := e.view("fleet", scs, nil)
	closed := runSpec{conns: o.Conns, warmup: o.Warmup, duration: o.CompareDur}
	before := refills()
	var warmed int64
	for _, p := range scs {
		r, err := e.warmLeases(ctx, "fleet warm-up", p, thr, o.FleetCusts)
		if err != nil {
			return nil, err
		}
		fr.Warm = append(fr.Warm, r)
		warmed += r.Requests
	}
	before = phase("first leases (a search per customer)", before, warmed)
	order := func(i int) []*proc {
		if i%2 == 0 {
			return []*proc{one, all}
		}
		return []*proc{all, one}
	}
	rounds, err := e.rounds(ctx, "fleet closed", "closed", o.FleetRounds, order, thr, closed, func(r *runRecord) { fr.Closed = append(fr.Closed, r) })
	if err != nil {
		return nil, err
	}
	var ratios []float64
	var requests, lost int64
	for i, rs := range rounds {
		rs.Ratio = byName(rs.runs, "fleet").Throughput / byName(rs.runs, "one").Throughput
		ratios = append(ratios, rs.Ratio)
		rounds[i] = rs
	}
	for _, r := range append(append([]*runRecord{}, fr.Warm...), fr.Closed...) {
		requests += r.Requests
		fr.Non2xx += r.non2xx()
		lost += r.Errors
	}
	fr.Rounds, fr.ThroughputRatio = roundsOf(rounds, nil), newStat(ratios)
	fr.ClosedSummary = summarizeRuns(fr.Closed, "closed")
	before = phase("closed loop (far from the limits)", before, requests-warmed)

	// Exhaust through the whole fleet.
	xr := &exhaustResult{Customers: o.ExhaustCusts}
	fr.Exhaust, fr.Planned = xr, int64(len(exh.order))
	for i := range plan.limits {
		xr.Limits += plan.limits[i]
		xr.ExpectedRefuse += plan.extra[i]
	}
	e.logf("fleet: exhausting %d hard limits (sum %d) through %d sidecars", o.ExhaustCusts, xr.Limits, o.Fleet)
	rec, lr, err := e.measure(ctx, "fleet exhaust", "exhaust", 0, all, exh, runSpec{conns: o.Conns, duration: 2 * time.Minute})
	if err != nil {
		return nil, err
	}
	xr.Run, xr.Sent, xr.NoRetryAfter = rec, lr.requests, lr.noRetry
	lost += lr.errors
	for i := range plan.limits {
		ok, refused := lr.ok[int(offset)+i], lr.refused[int(offset)+i]
		xr.Admitted += ok
		xr.Refused += refused
		switch {
		case ok > plan.limits[i]:
			fr.Over++
		case ok < plan.limits[i]:
			fr.Under++
		}
		if ok != plan.limits[i] && len(xr.Mismatches) < 20 {
			xr.Mismatches = append(xr.Mismatches, mismatch{Customer: exhaustCustomer(i), Limit: plan.limits[i], Admitted: ok, Sent: plan.limits[i] + plan.extra[i]})
		}
	}
	xr.Other = xr.Sent - xr.Admitted - xr.Refused
	phase("exhaust (near the limits)", before, lr.requests)
	// Where did the units of a customer admitted less than its limit go? Ask each
	// sidecar what it still holds in its lease.
	for i := range xr.Mismatches {
		m := &xr.Mismatches[i]
		for _, p := range scs {
			n, pending, err := leaseUnits(p.admin, m.Customer, "reports")
			if err != nil {
				e.logf("fleet: %v", err)
				n, pending = -1, -1
			}
			m.Leased = append(m.Leased, n)
			m.Pending = append(m.Pending, pending)
		}
	}
	// And whether the bucket holds them as granted (to a sidecar that lost track) or free.
	if len(xr.Mismatches) > 0 {
		var customers []string
		for _, m := range xr.Mismatches {
			customers = append(customers, m.Customer)
		}
		if held, err := bucketGrants(ctx, first.nats, "reports", customers); err != nil {
			e.logf("fleet: read the quota bucket: %v", err)
		} else {
			for i := range xr.Mismatches {
				xr.Mismatches[i].Bucket = held[xr.Mismatches[i].Customer]
			}
		}
	}
	xr.MetricsAllowed = 0
	for _, p := range scs {
		n, err := decisionsAllowed(p.admin, "reports")
		if err != nil {
			xr.MetricsAllowed = -1
			e.logf("fleet: could not read %s's metrics: %v", p.name, err)
			break
		}
		xr.MetricsAllowed += n
	}

	res.UsageCheck = e.checkUsageOf(ctx, scs, thr, lost)
	fleetChecks(res, fr)
	return res, nil
}

func fleetChecks(res *scenarioResult, fr *fleetResult) {
	x := fr.Exhaust
	res.check("every closed-loop response 2xx", fr.Non2xx == 0, "%d non-2xx responses or transport errors over the warm-ups and all rounds", fr.Non2xx)
	res.check("every planned exhaust request sent", x.Sent == fr.Planned, "%d of %d", x.Sent, fr.Planned)
	res.check("never more than a limit", fr.Over == 0,
		"%d of %d customers admitted more than their limit across the fleet", fr.Over, x.Customers)
	res.check("admitted == sum of limits", x.Admitted == x.Limits && fr.Over == 0 && fr.Under == 0,
		"admitted %d through %d sidecars, limits %d; %d customers over, %d under their limit", x.Admitted, fr.Sidecars, x.Limits, fr.Over, fr.Under)
	res.check("every other request 429", x.Refused == x.ExpectedRefuse && x.Other == 0,
		"429: %d of %d expected; other responses or errors: %d (5xx: %d)", x.Refused, x.ExpectedRefuse, x.Other, x.Run.Status["5xx"])
	res.check("every 429 has Retry-After", x.NoRetryAfter == 0, "%d without", x.NoRetryAfter)
	res.check("sidecars' allow counters == admitted", x.MetricsAllowed == x.Admitted,
		"sum of gatehouse_decisions_total{route=\"reports\",result=\"allow\"} over the fleet = %d", x.MetricsAllowed)
	usageVerdict(res)
	res.settle()
}

func writeFleet(w io.Writer, fr *fleetResult) {
	dur := 0.0
	if len(fr.Closed) > 0 {
		dur = fr.Closed[0].Seconds
	}
	fmt.Fprintf(w, "\nClosed loop, the same connections all on one sidecar (one) or spread over %d (fleet): %d rounds of %.0f s, after a search per customer on each sidecar (its first leases); req/s and CPU (all sidecars): median over rounds.\n",
		fr.Sidecars, len(fr.Rounds), dur)
	writeRuns(w, fr.ClosedSummary, []string{"one", "fleet"}, false, "vs one", func(t string) string {
		if t == "fleet" {
			return ratio(fr.ThroughputRatio)
		}
		return "1"
	})
	if x := fr.Exhaust; x != nil && x.Run != nil {
		r := x.Run
		fmt.Fprintf(w, "\nexhaust through %d sidecars: customers %d, sum of limits %d, sent %d: admitted %d (customers over their limit %d, under %d), refused (429) %d of %d expected, other %d, 429 without Retry-After %d, sidecars' allow counters %d\n",
			fr.Sidecars, x.Customers, x.Limits, x.Sent, x.Admitted, fr.Over, fr.Under, x.Refused, x.ExpectedRefuse, x.Other, x.NoRetryAfter, x.MetricsAllowed)
		fmt.Fprintf(w, "%s req/s over %.2f s, every request near a limit: latency p50 %s p90 %s p99 %s p99.9 %s max %s ms; CPU %.1f µs/req (all sidecars)\n",
			thousands(r.Throughput), r.Seconds, fmtMs(r.Latency.P50), fmtMs(r.Latency.P90), fmtMs(r.Latency.P99), fmtMs(r.Latency.P999), fmtMs(r.Latency.Max), r.TargetCPU)
		if len(x.Mismatches) > 0 {
			fmt.Fprintf(w, "customers off their limit (the first %d), with the unused units each sidecar still holds in its lease, and those on their way back to the fleet:\n", len(x.Mismatches))
		}
		for _, m := range x.Mismatches {
			var sum, pending int64
			for _, n := range m.Leased {
				sum += max(n, 0)
			}
			for _, n := range m.Pending {
				pending += max(n, 0)
			}
			fmt.Fprintf(w, "  MISMATCH %s: limit %d, admitted %d of %d sent; leased unused %v = %d; pending return %v = %d\n",
				m.Customer, m.Limit, m.Admitted, m.Sent, m.Leased, sum, m.Pending, pending)
			if m.Bucket != "" {
				fmt.Fprintf(w, "    bucket: %s\n", m.Bucket)
			}
		}
	}
	fmt.Fprintf(w, "lease refills (gatehouse_lease_refills_total, per sidecar in brackets):")
	for _, f := range fr.Refills {
		per := ""
		for i, v := range f.PerSidecar {
			if i > 0 {
				per += " "
			}
			per += fmt.Sprintf("%.0f", v)
		}
		perK := 0.0
		if f.Requests > 0 {
			perK = 1000 * f.Refills / float64(f.Requests)
		}
		fmt.Fprintf(w, "\n  %-36s %7.0f [%s] over %s requests: %.2f per 1,000", f.Phase, f.Refills, per, thousands(float64(f.Requests)), perK)
	}
	fmt.Fprintf(w, "\n  refill errors, whole run: %.0f\n", fr.RefillErrors)
	if fr.Metrics != "" {
		fmt.Fprintf(w, "  (metrics: %s)\n", fr.Metrics)
	}
	if n := redone(fr.Closed); n > 0 {
		fmt.Fprintf(w, "%d runs were redone because other processes or steal took more than -max-noise of the machine\n", n)
	}
}
