package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"text/tabwriter"
	"time"
)

// outage: open-loop load at a fixed rate on one sidecar whose NATS goes away and comes
// back. NATS is a nats-server of its own (bench/internal/natssrv, JetStream on a file
// store), because a sidecar's embedded server cannot be stopped apart from the sidecar;
// the sidecar reaches it through nats.urls. Midway through the run the harness kills it
// (SIGKILL, as a crash) and, -outage later, starts it again on the same address and
// store. It answers: are requests still answered while NATS is away, and how fast (p99
// before, during and after)? Does the replica resume when NATS is back (a change pushed
// afterwards is enforced)? And is the usage published afterwards exactly what was
// admitted, with nothing lost in the outage and nothing published twice?
type outageScenario struct{}

func (outageScenario) Name() string                    { return "outage" }
func (outageScenario) Available(e *env) (bool, string) { return needCaps(e, capNATS, capUsage) }

func (outageScenario) about(o *options) string {
	before, after := outageEdges(o.Outage)
	return fmt.Sprintf("open loop at %s req/s on one sidecar with %d customers (steady's mix) and NATS in its own process; %s after the start NATS is killed, and %s later started again on the same address and store; %s more of load after",
		thousands(o.OutageRate), o.Customers, before, o.Outage, after)
}

// outageEdges are the recorded load before the outage and after NATS is back.
func outageEdges(outage time.Duration) (before, after time.Duration) {
	before = min(3*time.Second, max(time.Second, outage))
	return before, before + time.Second
}

func (outageScenario) plan(o *options) time.Duration {
	before, after := outageEdges(o.Outage)
	return 5*time.Second + o.OpenWarmup + before + o.Outage + after + perRun + 5*time.Second // start; run; probe and usage check
}

// outageResult is outage's part of results.json.
type outageResult struct {
	Customers int                `json:"customers"`
	Rate      float64            `json:"rate"`
	Warm      *runRecord         `json:"warm_up_run"` // one search per customer, before the run
	Run       *runRecord         `json:"run"`
	Refusals  map[string]float64 `json:"refusals"` // the sidecar's non-allow decisions during the run, by result and reason
	Segments  []outageSeg        `json:"segments"` // before, during, after
	Events    outageEvents       `json:"events"`
	Resume    probe              `json:"resume_probe"` // a change pushed after NATS returned
	Bad       int64              `json:"not_2xx"`      // non-2xx answers, transport errors and unsent requests: warm-up and all segments
	Metrics   map[string]any     `json:"sidecar_after,omitempty"`
}

// outageSeg is one part of the run.
type outageSeg struct {
	Name     string           `json:"name"`
	Seconds  float64          `json:"seconds"`
	Requests int64            `json:"requests"`
	Answered float64          `json:"answered_per_s"`
	Status   map[string]int64 `json:"status"`
	Errors   int64            `json:"transport_errors"`
	Unsent   int64            `json:"unsent"`
	Latency  latency          `json:"latency_ms"`
}

// outageEvents is what happened to NATS and what the sidecar showed of it; times are
// seconds from the start of the recorded phase.
type outageEvents struct {
	KilledAt      float64 `json:"killed_at_s"`
	RestartedAt   float64 `json:"restarted_at_s"`      // the new server accepted connections
	RestartMs     float64 `json:"restart_ms"`          // process start to accepting connections
	OutboxBefore  float64 `json:"outbox_bytes_before"` // gatehouse_usage_outbox_bytes just before the kill
	OutboxEnd     float64 `json:"outbox_bytes_end"`    // ... just before the restart
	PublishErrors float64 `json:"publish_errors"`      // gatehouse_usage_publish_errors_total, kill to restart
	Error         string  `json:"error,omitempty"`
}

func (outageScenario) Run(ctx context.Context, e *env) (*scenarioResult, error) {
	o := e.o
	res := &scenarioResult{Name: "outage", About: outageScenario{}.about(o)}
	or := &outageResult{Customers: o.Customers, Rate: o.OutageRate}
	res.Outage = or
	before, after := outageEdges(o.Outage)

	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	store := filepath.Join(e.tmp, "outage-nats")
	if err := os.MkdirAll(store, 0o755); err != nil {
		return nil, err
	}
	e.logf("outage: starting NATS (its own process) and a sidecar with %d customers on it", o.Customers)
	var natsMu sync.Mutex // guards ns: the run restarts it
	ns, err := e.startProc(ctx, "nats", addr, 0, e.bin.natssrv, "-listen", addr, "-store", store)
	if err != nil {
		return nil, err
	}
	defer func() {
		natsMu.Lock()
		defer natsMu.Unlock()
		e.stopProc(ns)
	}()
	sc, err := e.startSidecarWith(ctx, "sidecar-outage", append(steadySnapshots(o.Customers), probeSnapshot(true)), []string{"nats://" + addr})
	if err != nil {
		return nil, err
	}
	defer e.stopProc(sc)
	wl := steadyWorkload(o.Customers)
	admitted := e.track(sc, wl)
	if err := steadySanity(wl, admitted, sc); err != nil {
		return nil, err
	}
	// One search per customer first, so that each holds its fleet lease of api_calls
	// before NATS goes: the outage then tests serving from what the sidecar has. (A
	// customer first seen while NATS is away has no lease to spend, and its hard-limited
	// routes answer as on_unavailable says: 503 quota_unavailable with the default deny.)
	if or.Warm, err = e.warmLeases(ctx, "outage warm-up", sc, wl, o.Customers); err != nil {
		return nil, err
	}

	// The outage, beside the run: kill at warm-up + before, restart -outage later.
	ev := &or.Events
	metric := func(name string) float64 {
		v, err := metricSum(sc.admin, name)
		if err != nil && ev.Error == "" {
			ev.Error = "metrics: " + err.Error()
		}
		return v
	}
	beside := func(ctx context.Context) func() besideUse {
		done := make(chan struct{})
		base := time.Now().Add(o.OpenWarmup) // about where the recorded phase starts
		go func() {
			defer close(done)
			t := newPreciseTimer()
			defer t.close()
			t.sleep(time.Until(base.Add(before)))
			if ctx.Err() != nil {
				return
			}
			ev.OutboxBefore = metric("gatehouse_usage_outbox_bytes")
			errs := metric("gatehouse_usage_publish_errors_total")
			natsMu.Lock()
			ns.kill()
			e.mon.remove(ns)
			natsMu.Unlock()
			ev.KilledAt = time.Since(base).Seconds()
			e.logf("outage: NATS killed")
			t.sleep(time.Until(base.Add(before + o.Outage)))
			ev.OutboxEnd = metric("gatehouse_usage_outbox_bytes")
			ev.PublishErrors = metric("gatehouse_usage_publish_errors_total") - errs
			started := time.Now()
			p, err := e.startProc(ctx, "nats-2", addr, 0, e.bin.natssrv, "-listen", addr, "-store", store)
			if err != nil {
				ev.Error = "restart NATS: " + err.Error()
				return
			}
			ev.RestartMs = msSince(started)
			ev.RestartedAt = time.Since(base).Seconds()
			natsMu.Lock()
			ns = p
			natsMu.Unlock()
			e.logf("outage: NATS back after %.1f s (restart took %.0f ms)", ev.RestartedAt-ev.KilledAt, ev.RestartMs)
		}()
		return func() besideUse { <-done; return besideUse{} }
	}
	refusedBefore, _ := refusals(sc.admin)
	spec := runSpec{open: true, rate: o.OutageRate, conns: o.Conns, warmup: o.OpenWarmup,
		duration: before + o.Outage + after, drain: drainFor(after), segments: []time.Duration{before, before + o.Outage}}
	rec, lr, err := e.measure(ctx, fmt.Sprintf("outage open %.0f/s", o.OutageRate), "outage", 0, e.view("sidecar", []*proc{sc}, beside), wl, spec)
	if err != nil {
		return nil, err
	}
	if ev.Error != "" && ev.RestartedAt == 0 {
		return nil, fmt.Errorf("outage: %s", ev.Error)
	}
	or.Run = rec
	if after, err := refusals(sc.admin); err == nil {
		or.Refusals = diff(refusedBefore, after)
	}
	for i, s := range lr.segments {
		d := []time.Duration{before, o.Outage, after}[i]
		seg := outageSeg{Name: []string{"before", "during", "after"}[i], Seconds: d.Seconds(), Requests: s.requests,
			Errors: s.errors, Unsent: s.unsent, Status: map[string]int64{}, Latency: summarize(s.hist)}
		for c, n := range s.status {
			if n > 0 {
				seg.Status[fmt.Sprintf("%dxx", c)] = n
			}
		}
		seg.Answered = float64(s.requests-s.errors-s.unsent) / d.Seconds()
		or.Bad += s.requests - s.status[2]
		or.Segments = append(or.Segments, seg)
	}

	// The replica resumed: a change pushed now is enforced. The push may meet a
	// JetStream that is still recovering its store, so it is tried a few times.
	for try := 0; try < 5; try++ {
		or.Resume, _ = e.probeChange(ctx, sc, false, 15*time.Second)
		if or.Resume.Error == "" || ctx.Err() != nil {
			break
		}
		sleepCtx(ctx, time.Second)
	}
	or.Resume.When = "after NATS returned"

	or.Bad += or.Warm.non2xx()
	res.UsageCheck = e.checkUsage(ctx, sc, wl, lr.errors+or.Warm.Errors)
	or.Metrics = map[string]any{}
	for _, m := range []string{"gatehouse_usage_outbox_bytes", "gatehouse_usage_outbox_records", "gatehouse_usage_publish_errors_total", "gatehouse_replica_caught_up"} {
		if v, err := metricSum(sc.admin, m); err == nil {
			or.Metrics[m] = v
		}
	}
	outageChecks(res, or)
	return res, nil
}

func outageChecks(res *scenarioResult, or *outageResult) {
	seg := func(name string) outageSeg {
		for _, s := range or.Segments {
			if s.Name == name {
				return s
			}
		}
		return outageSeg{}
	}
	b, d, a := seg("before"), seg("during"), seg("after")
	ev := or.Events
	res.check("every request answered 2xx, NATS or not", or.Bad == 0,
		"not 2xx (refused, failed, unsent): %d of %d requests, warm-up included; during the outage %d of %d, %d transport errors, p99 %.3f ms (before %.3f, after %.3f)",
		or.Bad, or.Warm.Requests+b.Requests+d.Requests+a.Requests, d.Requests-d.Status["2xx"], d.Requests, d.Errors, d.Latency.P99, b.Latency.P99, a.Latency.P99)
	res.check("the sidecar saw NATS go", ev.KilledAt > 0 && (ev.PublishErrors > 0 || ev.OutboxEnd > ev.OutboxBefore),
		"NATS killed at %.1f s, back at %.1f s; meanwhile %.0f failed publishes, and the usage outbox went from %.0f to %.0f bytes",
		ev.KilledAt, ev.RestartedAt, ev.PublishErrors, ev.OutboxBefore, ev.OutboxEnd)
	r := or.Resume
	res.check("the replica resumed after NATS returned", r.Enforced >= 0,
		"a change pushed after the restart was enforced %.1f ms after the push started (push %.1f ms)%s",
		r.Enforced, r.PushMs, errSuffix(r.Error))
	usageVerdict(res)
	res.settle()
}

func errSuffix(s string) string {
	if s == "" {
		return ""
	}
	return "; push error: " + s
}

func writeOutage(w io.Writer, or *outageResult) {
	ev := or.Events
	fmt.Fprintf(w, "\nNATS killed at %.1f s, accepting again at %.1f s (its restart took %.0f ms). While it was away the sidecar failed %.0f publishes, and its usage outbox went from %.0f to %.0f bytes.\n",
		ev.KilledAt, ev.RestartedAt, ev.RestartMs, ev.PublishErrors, ev.OutboxBefore, ev.OutboxEnd)
	if ev.Error != "" {
		fmt.Fprintf(w, "error: %s\n", ev.Error)
	}
	fmt.Fprintf(w, "Open loop at %s req/s, latency from the intended send time, by when each request was due:\n", thousands(or.Rate))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "part\tseconds\tanswered/s\t2xx\tnot 2xx\terrors\tunsent\tp50 ms\tp90 ms\tp99 ms\tp99.9 ms\tmax ms\t")
	for _, s := range or.Segments {
		l := s.Latency
		fmt.Fprintf(tw, "%s\t%.1f\t%s\t%d\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t\n", s.Name, s.Seconds, thousands(s.Answered), s.Status["2xx"],
			s.Requests-s.Status["2xx"]-s.Errors-s.Unsent, s.Errors, s.Unsent, fmtMs(l.P50), fmtMs(l.P90), fmtMs(l.P99), fmtMs(l.P999), fmtMs(l.Max))
	}
	tw.Flush()
	if len(or.Refusals) > 0 {
		fmt.Fprintf(w, "the sidecar's refusals during the run (gatehouse_decisions_total):")
		for _, k := range sortedKeys(or.Refusals) {
			fmt.Fprintf(w, " %s %.0f;", k, or.Refusals[k])
		}
		fmt.Fprintln(w)
	}
	r := or.Resume
	if r.Enforced >= 0 {
		fmt.Fprintf(w, "after NATS returned, a pushed change was enforced %.1f ms after the push started (the push command %.1f ms)\n", r.Enforced, r.PushMs)
	} else {
		fmt.Fprintf(w, "after NATS returned, a pushed change was NOT enforced within %.0f s (last answer %d)%s\n", r.Timeout, r.Status, errSuffix(r.Error))
	}
}
