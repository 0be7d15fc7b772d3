package main

import (
	"fmt"
	"io"
	"sort"
	"text/tabwriter"
)

// writeScenario prints a scenario's tables.
func writeScenario(w io.Writer, s *scenarioResult) {
	fmt.Fprintf(w, "\n== %s: %s ==\n", s.Name, s.About)
	if s.Status == "error" {
		fmt.Fprintf(w, "error: %s\n", s.Reason)
		return
	}
	if s.Steady != nil {
		writeSteady(w, s.Steady)
	}
	if s.Exhaust != nil {
		writeExhaust(w, s.Exhaust)
	}
	if s.Churn != nil {
		writeChurn(w, s.Churn)
	}
	if s.Fleet != nil {
		writeFleet(w, s.Fleet)
	}
	if s.Outage != nil {
		writeOutage(w, s.Outage)
	}
	if s.UsageCost != nil {
		writeUsageCost(w, s.UsageCost)
	}
}

// writeRuns prints merged runs of targets in order: the closed-loop columns, or with
// open the open-loop ones; vs gives each target's comparison column.
func writeRuns(w io.Writer, sum map[string]targetSummary, order []string, open bool, vsHead string, vs func(string) string) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	if open {
		fmt.Fprintf(tw, "run\tachieved/s\tp50 ms\tp90 ms\tp99 ms\tp99.9 ms\tmax ms\tCPU µs/req\t%s\t\n", vsHead)
	} else {
		fmt.Fprintf(tw, "run\treq/s\tp50 ms\tp90 ms\tp99 ms\tp99.9 ms\tCPU µs/req\t%s\t\n", vsHead)
	}
	for _, t := range order {
		s, ok := sum[t]
		if !ok {
			continue
		}
		thr := thousands(s.Throughput.Median)
		if s.Saturated {
			thr += " (saturated)"
		}
		l := s.Latency
		if open {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.1f\t%s\t\n", t, thr, fmtMs(l.P50), fmtMs(l.P90), fmtMs(l.P99), fmtMs(l.P999), fmtMs(l.Max), s.CPU.Median, vs(t))
		} else {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%.1f\t%s\t\n", t, thr, fmtMs(l.P50), fmtMs(l.P90), fmtMs(l.P99), fmtMs(l.P999), s.CPU.Median, vs(t))
		}
	}
	tw.Flush()
}

// redone counts the runs that were redone for noise.
func redone(runs ...[]*runRecord) int {
	n := 0
	for _, rs := range runs {
		for _, r := range rs {
			if r.Discarded {
				n++
			}
		}
	}
	return n
}

func ratio(s stat) string {
	if s.N == 0 {
		return "-"
	}
	if s.N == 1 {
		return fmt.Sprintf("%.3f", s.Median)
	}
	return fmt.Sprintf("%.3f [%.3f–%.3f]", s.Median, s.Min, s.Max)
}

func delta(s stat) string {
	if s.N == 0 {
		return "-"
	}
	if s.N == 1 {
		return fmt.Sprintf("%+.3f", s.Median)
	}
	return fmt.Sprintf("%+.3f [%+.3f, %+.3f]", s.Median, s.Min, s.Max)
}

func writeSteady(w io.Writer, sr *steadyResult) {
	cs := sr.ClosedSummary
	rounds := 0
	if s, ok := cs["sidecar"]; ok {
		rounds = s.Runs
	}
	conns, dur := 0, 0.0
	for _, r := range sr.Closed {
		conns, dur = r.Conns, r.Seconds
		break
	}
	fmt.Fprintf(w, "\nClosed loop: %d connections as fast as answered, %d rounds of %.0f s. req/s and CPU: median over rounds; latency: all rounds merged.\n", conns, rounds, dur)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\treq/s\tp50 ms\tp90 ms\tp99 ms\tp99.9 ms\tCPU µs/req\tgen CPU\tthroughput vs bare\t")
	genShare := medianBy(sr.Closed, "closed", func(r *runRecord) float64 { return r.CPU.Generator })
	for _, t := range sortedTargets(cs) {
		s := cs[t]
		vs := "-"
		switch t {
		case "sidecar":
			vs = ratio(sr.ThroughputVsBare)
		case "bare":
			vs = "1"
		case "nginx":
			if sr.BareVsNginx.N > 0 {
				vs = fmt.Sprintf("%.3f", 1/sr.BareVsNginx.Median)
			}
		case "bare-b":
			vs = ratio(stat{Median: 1 / sr.Control.Median, Min: 1 / sr.Control.Max, Max: 1 / sr.Control.Min, N: sr.Control.N})
		case "upstream":
			if b, ok := cs["bare"]; ok {
				vs = fmt.Sprintf("%.3f", s.Throughput.Median/b.Throughput.Median)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%.1f\t%.0f%%\t%s\t\n", t, thousands(s.Throughput.Median),
			fmtMs(s.Latency.P50), fmtMs(s.Latency.P90), fmtMs(s.Latency.P99), fmtMs(s.Latency.P999),
			s.CPU.Median, 100*genShare[t], vs)
	}
	tw.Flush()
	fmt.Fprintf(w, "sidecar vs nginx: %s   bare vs nginx: %s   control bare/bare-b: %s   added CPU sidecar-bare: %s µs/req\n",
		ratio(sr.ThroughputVsNginx), ratio(sr.BareVsNginx), ratio(sr.Control), delta(sr.AddedCPU))
	if sr.Nginx != "" && sr.ThroughputVsNginx.N == 0 {
		fmt.Fprintf(w, "nginx: %s\n", sr.Nginx)
	}

	ol := sr.OpenSummary
	fmt.Fprintf(w, "\nOpen loop at %s req/s: %d (sidecar, bare) pairs; latency from the intended send time, all pairs merged; added = median of per-pair differences.\n",
		thousands(sr.Rate), sr.P99Added.N)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "target\tachieved/s\tp50 ms\tp90 ms\tp99 ms\tp99.9 ms\tmax ms\tCPU µs/req\tadded p50\tadded p99\tadded p99.9\t")
	for _, t := range sortedTargets(ol) {
		s := ol[t]
		a50, a99, a999 := "-", "-", "-"
		if t == "sidecar" {
			a50, a99, a999 = delta(sr.P50Added), delta(sr.P99Added), delta(sr.P999Added)
		}
		sat := ""
		if s.Saturated {
			sat = " (saturated)"
		}
		fmt.Fprintf(tw, "%s\t%s%s\t%s\t%s\t%s\t%s\t%s\t%.1f\t%s\t%s\t%s\t\n", t, thousands(s.Throughput.Median), sat,
			fmtMs(s.Latency.P50), fmtMs(s.Latency.P90), fmtMs(s.Latency.P99), fmtMs(s.Latency.P999), fmtMs(s.Latency.Max),
			s.CPU.Median, a50, a99, a999)
	}
	tw.Flush()
	lag := medianBy(sr.Open, "open", func(r *runRecord) float64 { return r.SendLagP99 })
	gen := medianBy(sr.Open, "open", func(r *runRecord) float64 { return r.CPU.Generator })
	fmt.Fprintf(w, "generator: send lag p99 %.3f ms, CPU %.0f%% of the machine (medians, sidecar runs)\n", lag["sidecar"], 100*gen["sidecar"])

	if len(sr.Sweep) > 0 {
		fmt.Fprintf(w, "\nLatency against load (open loop; p50 / p99 / p99.9 ms; * = could not keep the rate):\n")
		pts := chartPoints(sr)
		var rates []float64
		seen := map[float64]bool{}
		for _, ps := range pts {
			for _, p := range ps {
				if !seen[p.rate] {
					seen[p.rate] = true
					rates = append(rates, p.rate)
				}
			}
		}
		sort.Float64s(rates)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprint(tw, "target\t")
		for _, r := range rates {
			fmt.Fprintf(tw, "%s/s\t", thousands(r))
		}
		fmt.Fprintln(tw)
		for _, t := range chartOrder(pts) {
			fmt.Fprintf(tw, "%s\t", t)
			for _, r := range rates {
				cell := "-"
				for _, p := range pts[t] {
					if p.rate == r {
						cell = fmt.Sprintf("%s / %s / %s", fmtMs(p.lat.P50), fmtMs(p.lat.P99), fmtMs(p.lat.P999))
						if p.saturated {
							cell += "*"
						}
					}
				}
				fmt.Fprintf(tw, "%s\t", cell)
			}
			fmt.Fprintln(tw)
		}
		tw.Flush()
	}
	for _, p := range sr.Profiles {
		fmt.Fprintf(w, "\nperf profile, %s: %.1f µs CPU/request; hottest own-time symbols:\n", p.Target, p.CPUPerReq)
		for i, r := range p.Self {
			if i == 12 {
				break
			}
			fmt.Fprintf(w, "  %5.1f%% %5.2f µs  %s\n", r.Percent, r.USPerRq, r.Symbol)
		}
		fmt.Fprintf(w, "  (full list: %s)\n", p.Files[len(p.Files)-1])
	}
	var redone int
	for _, r := range append(append([]*runRecord{}, sr.Closed...), sr.Open...) {
		if r.Discarded {
			redone++
		}
	}
	if redone > 0 {
		fmt.Fprintf(w, "%d runs were redone because other processes or steal took more than -max-noise of the machine\n", redone)
	}
}

// medianBy is the median of f over the kept runs of one phase, by target.
func medianBy(runs []*runRecord, phase string, f func(*runRecord) float64) map[string]float64 {
	v := map[string][]float64{}
	for _, r := range runs {
		if r.Phase == phase && !r.Discarded {
			v[r.Target] = append(v[r.Target], f(r))
		}
	}
	out := map[string]float64{}
	for t, xs := range v {
		out[t] = newStat(xs).Median
	}
	return out
}

func writeExhaust(w io.Writer, x *exhaustResult) {
	fmt.Fprintf(w, "\ncustomers %d, sum of limits %d, sent %d: admitted %d, refused (429) %d of %d expected, other %d, 429 without Retry-After %d, sidecar allow counter %d\n",
		x.Customers, x.Limits, x.Sent, x.Admitted, x.Refused, x.ExpectedRefuse, x.Other, x.NoRetryAfter, x.MetricsAllowed)
	if r := x.Run; r != nil {
		fmt.Fprintf(w, "%s req/s over %.2f s; latency p50 %s p99 %s p99.9 %s ms; sidecar CPU %.1f µs/req\n",
			thousands(r.Throughput), r.Seconds, fmtMs(r.Latency.P50), fmtMs(r.Latency.P99), fmtMs(r.Latency.P999), r.TargetCPU)
	}
	for _, m := range x.Mismatches {
		fmt.Fprintf(w, "  MISMATCH %s: limit %d, admitted %d of %d sent\n", m.Customer, m.Limit, m.Admitted, m.Sent)
	}
}
