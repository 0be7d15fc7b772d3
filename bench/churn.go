package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"runtime"
	"sync"
	"time"
)

// churn: steady's load while entitlement updates stream in through NATS at a fixed
// rate. It answers "what does a busy control plane cost the request path?": throughput
// (closed loop) and p99 (open loop at -rate) with and without the updates, in adjacent
// runs on one sidecar; how long a pushed change takes to be enforced under that load;
// and whether any request of a customer whose entitlements stayed sufficient was
// refused while its snapshot was being replaced.
type churnScenario struct{}

func (churnScenario) Name() string                    { return "churn" }
func (churnScenario) Available(e *env) (bool, string) { return needCaps(e, capNATS) }
func (churnScenario) about(o *options) string         { return churnAbout(o) }
func (churnScenario) plan(o *options) time.Duration   { return churnPlan(o) }

// churnFlip: customers whose advanced_analytics the updates toggle.
func churnFlip(c int) bool { return c%10 == 0 }

// churnPushInterval is how often a push goes out: every 250 ms, or less often when
// the rate is below 4 updates a second.
func churnPushInterval(rate float64) time.Duration {
	return max(250*time.Millisecond, time.Duration(float64(time.Second)/rate))
}

// churnBatch is how many snapshots each push carries.
func churnBatch(rate float64, every time.Duration) int { return max(1, int(rate*every.Seconds()+0.5)) }

func churnAbout(o *options) string {
	return fmt.Sprintf("steady's load on %d customers while %.0f entitlement snapshots/s are pushed through NATS (`gatehouse push` every %s): a tenth toggle advanced_analytics, three tenths move their api_calls and searches limits up and down, the rest change their support tier and toggle a feature no route uses",
		o.Customers, o.ChurnRate, churnPushInterval(o.ChurnRate))
}

func churnPlan(o *options) time.Duration {
	closed := time.Duration(2*o.ChurnRounds) * (o.Warmup + o.CompareDur + perRun)
	open := time.Duration(2*o.ChurnRounds) * (o.OpenWarmup + o.CompareDur + perRun)
	return closed + open + 10*time.Second // start, sanity, leases, usage check
}

// churnResult is churn's part of results.json.
type churnResult struct {
	Customers int        `json:"customers"`
	Flip      int        `json:"flip_customers"`      // their advanced_analytics is toggled; the load asks them nothing that needs it
	Updates   float64    `json:"offered_update_rate"` // snapshots per second
	Warm      *runRecord `json:"warm_up_run"`         // one search per customer (its first leases), before the rounds
	Every     float64    `json:"push_every_s"`
	Batch     int        `json:"snapshots_per_push"`
	// Closed loop, in rounds of (quiet, churn) back to back, alternating which goes first.
	Closed          []*runRecord             `json:"closed_loop_runs"`
	Rounds          []round                  `json:"closed_loop_rounds"`
	ThroughputRatio stat                     `json:"throughput_ratio_churn_vs_quiet"`
	ClosedSummary   map[string]targetSummary `json:"closed_loop_summary"`
	// Open loop at -rate, in (quiet, churn) pairs.
	Rate        float64                  `json:"rate"`
	Open        []*runRecord             `json:"open_loop_runs"`
	OpenPairs   []round                  `json:"open_loop_pairs"`
	P99Added    stat                     `json:"p99_added_ms"` // churn p99 - quiet p99, per pair
	OpenSummary map[string]targetSummary `json:"open_loop_summary"`
	Pushes      pushStats                `json:"pushes"`
	Probes      []probe                  `json:"probes"`
	Enforced    stat                     `json:"enforced_ms"`     // push start to enforcement
	PushMs      stat                     `json:"push_command_ms"` // the push command alone
	Missed      int                      `json:"probes_never_enforced"`
	Non2xx      int64                    `json:"non_2xx"`
}

// pushStats add up the churn's pushes.
type pushStats struct {
	Pushes   int      `json:"pushes"`
	Failed   int      `json:"failed"`
	Sent     int64    `json:"snapshots_sent"`
	Written  int64    `json:"snapshots_written"` // changed, so written to the bucket
	Seconds  float64  `json:"seconds"`           // time the pusher ran
	Achieved float64  `json:"achieved_rate"`     // written / seconds
	CPU      float64  `json:"cpu_seconds"`       // the push processes' user+system time
	Took     stat     `json:"push_command_ms"`
	Errors   []string `json:"errors,omitempty"` // the first few
	tooks    []float64
}

// churner pushes updates while a run measures, and probes propagation meanwhile. Its
// fields are used by one run's goroutines at a time.
type churner struct {
	e       *env
	p       *proc
	res     *churnResult
	n       int  // customers
	next    int  // the next update: customer next % n, version next / n + 1 (pusher)
	probeOn bool // the probe customer's advanced_analytics (prober)
	marked  int  // probes already attributed to a run

	mu  sync.Mutex // guards res.Pushes, res.Probes and cpu while a run is under way
	cpu time.Duration
}

// mark attributes the probes taken since the last mark to run r.
func (ch *churner) mark(r *runRecord) {
	for i := ch.marked; i < len(ch.res.Probes); i++ {
		ch.res.Probes[i].When = fmt.Sprintf("%s run, %s, round %d", r.Phase, r.Target, r.Round)
	}
	ch.marked = len(ch.res.Probes)
}

// churnSnapshot is update version v (1, 2, ...) of customer c's snapshot.
func churnSnapshot(c, v int) snapshotDoc {
	s := steadySnapshot(c) // the same billing anchor and features as the seed
	switch {
	case churnFlip(c):
		s.Features["advanced_analytics"] = featureDoc{Type: "boolean", IsEnabled: ptr(v%2 == 0)}
	case c%10 < 4:
		up := int64(1000 * (v % 2)) // raised, then lowered back
		s.Features["api_calls"] = featureDoc{Type: "metered", UsageLimit: ptr(int64(1e12) + up), Reset: "MONTHLY"}
		s.Features["searches"] = featureDoc{Type: "metered", UsageLimit: ptr(int64(1e12) + up), IsSoftLimit: true, Reset: "DAILY"}
	default:
		s.Features["support_tier"] = featureDoc{Type: "static", Static: []string{tiers[(c+v)%len(tiers)]}}
		s.Features["beta_exports"] = featureDoc{Type: "boolean", IsEnabled: ptr(v%2 == 1)}
	}
	return s
}

// beside runs the pusher and the prober for one run; the returned func stops them and
// says how much CPU their push processes used.
func (ch *churner) beside(ctx context.Context) func() besideUse {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	every := churnPushInterval(ch.e.o.ChurnRate)
	batch := churnBatch(ch.e.o.ChurnRate, every)
	file := filepath.Join(ch.e.tmp, ch.p.name, "churn.ndjson")
	ch.cpu = 0
	pushesBefore := ch.res.Pushes.Pushes
	started := time.Now()
	wg.Add(2)
	go func() { // updates: push k is due at k·every; never two at once
		defer wg.Done()
		t := newPreciseTimer()
		defer t.close()
		for k := 0; ctx.Err() == nil; k++ {
			if wait := time.Until(started.Add(time.Duration(k) * every)); wait > 0 {
				t.sleep(wait)
				if ctx.Err() != nil {
					return
				}
			}
			snaps := make([]snapshotDoc, batch)
			for i := range snaps {
				snaps[i] = churnSnapshot(ch.next%ch.n, ch.next/ch.n+1)
				ch.next++
			}
			r, err := ch.e.push(ch.p, file, snaps)
			ch.mu.Lock()
			ps := &ch.res.Pushes
			ps.Pushes++
			ps.Sent += int64(batch)
			ps.Written += int64(r.written)
			ps.CPU += r.cpu.Seconds()
			ps.tooks = append(ps.tooks, float64(r.took)/float64(time.Millisecond))
			ch.cpu += r.cpu
			if err != nil {
				ps.Failed++
				if len(ps.Errors) < 5 {
					ps.Errors = append(ps.Errors, err.Error())
				}
			}
			ch.mu.Unlock()
		}
	}()
	go func() { // propagation probes, one at a time
		defer wg.Done()
		sleepCtx(ctx, 300*time.Millisecond)
		for ctx.Err() == nil {
			ch.probeOn = !ch.probeOn
			pr, cpu := ch.e.probeChange(ctx, ch.p, ch.probeOn, 10*time.Second)
			ch.mu.Lock()
			ch.cpu += cpu
			if ctx.Err() == nil || pr.Enforced >= 0 { // a probe cut off by the run's end is not counted
				ch.res.Probes = append(ch.res.Probes, pr)
			}
			ch.mu.Unlock()
			sleepCtx(ctx, 700*time.Millisecond)
		}
	}()
	return func() besideUse {
		cancel()
		wg.Wait()
		// The pushes of this run cover k·every from the start, or longer when they fell
		// behind: the achieved rate is never above the offered one for being cut short.
		ps := &ch.res.Pushes
		ps.Seconds += max(time.Since(started), time.Duration(ps.Pushes-pushesBefore)*every).Seconds()
		return besideUse{cpu: ch.cpu}
	}
}

func (churnScenario) Run(ctx context.Context, e *env) (*scenarioResult, error) {
	o := e.o
	every := churnPushInterval(o.ChurnRate)
	res := &scenarioResult{Name: "churn", About: churnAbout(o)}
	cr := &churnResult{Customers: o.Customers, Updates: o.ChurnRate, Rate: o.Rate, Every: every.Seconds(), Batch: churnBatch(o.ChurnRate, every)}
	res.Churn = cr
	for c := range o.Customers {
		if churnFlip(c) {
			cr.Flip++
		}
	}

	e.logf("churn: starting a fresh sidecar with %d customers", o.Customers)
	snaps := append(steadySnapshots(o.Customers), probeSnapshot(true))
	sc, err := e.startSidecar(ctx, "sidecar-churn", snaps)
	if err != nil {
		return nil, err
	}
	defer e.stopProc(sc)
	wl := churnWorkload(o.Customers)
	admitted := e.track(sc, wl)
	if err := steadySanity(wl, admitted, sc); err != nil {
		return nil, err
	}
	if cr.Warm, err = e.warmLeases(ctx, "churn warm-up", sc, wl, o.Customers); err != nil {
		return nil, err
	}
	ch := &churner{e: e, p: sc, res: cr, n: o.Customers, probeOn: true}
	quiet := e.view("quiet", []*proc{sc}, nil)
	busy := e.view("churn", []*proc{sc}, func(ctx context.Context) func() besideUse { return ch.beside(ctx) })
	pairOrder := func(i int) []*proc {
		if i%2 == 0 {
			return []*proc{quiet, busy}
		}
		return []*proc{busy, quiet}
	}
	keep := func(dst *[]*runRecord) func(*runRecord) {
		return func(r *runRecord) {
			*dst = append(*dst, r)
			ch.mark(r)
		}
	}

	closed := runSpec{conns: o.Conns, warmup: o.Warmup, duration: o.CompareDur}
	rounds, err := e.rounds(ctx, "churn closed", "closed", o.ChurnRounds, pairOrder, wl, closed, keep(&cr.Closed))
	if err != nil {
		return nil, err
	}
	var ratios []float64
	for i, rs := range rounds {
		rs.Ratio = byName(rs.runs, "churn").Throughput / byName(rs.runs, "quiet").Throughput
		ratios = append(ratios, rs.Ratio)
		rounds[i] = rs
	}
	cr.Rounds, cr.ThroughputRatio = roundsOf(rounds, nil), newStat(ratios)
	cr.ClosedSummary = summarizeRuns(cr.Closed, "closed")

	open := runSpec{open: true, rate: o.Rate, conns: o.Conns, warmup: o.OpenWarmup, duration: o.CompareDur, drain: drainFor(o.CompareDur)}
	pairs, err := e.rounds(ctx, fmt.Sprintf("churn open %.0f/s", o.Rate), "open", o.ChurnRounds, pairOrder, wl, open, keep(&cr.Open))
	if err != nil {
		return nil, err
	}
	var d99 []float64
	for i, rs := range pairs {
		rs.Ratio = byName(rs.runs, "churn").Latency.P99 - byName(rs.runs, "quiet").Latency.P99
		d99 = append(d99, rs.Ratio)
		pairs[i] = rs
	}
	cr.OpenPairs, cr.P99Added = roundsOf(pairs, nil), newStat(d99)
	cr.OpenSummary = summarizeRuns(cr.Open, "open")

	ps := &cr.Pushes
	ps.Took = newStat(ps.tooks)
	if ps.Seconds > 0 {
		ps.Achieved = float64(ps.Written) / ps.Seconds
	}
	cr.Enforced, cr.PushMs, cr.Missed = probeStats(cr.Probes)
	var lost int64
	for _, rs := range [][]*runRecord{{cr.Warm}, cr.Closed, cr.Open} {
		for _, r := range rs {
			cr.Non2xx += r.non2xx()
			lost += r.Errors
		}
	}
	res.UsageCheck = e.checkUsage(ctx, sc, wl, lost)
	churnChecks(res, cr)
	return res, nil
}

func churnChecks(res *scenarioResult, cr *churnResult) {
	ps := cr.Pushes
	res.check("every push succeeded", ps.Pushes > 0 && ps.Failed == 0,
		"%d pushes of %d snapshots each, %d failed; %d snapshots written in %.1f s of churn: %.0f/s for %.0f/s offered",
		ps.Pushes, cr.Batch, ps.Failed, ps.Written, ps.Seconds, ps.Achieved, cr.Updates)
	res.check("every load response 2xx, churn or not", cr.Non2xx == 0,
		"%d non-2xx responses or transport errors; the load asks nothing of what the updates take away", cr.Non2xx)
	e, p := cr.Enforced, cr.PushMs
	res.check("every probed change enforced", len(cr.Probes) > 0 && cr.Missed == 0,
		"%d of %d changes seen on the sidecar; push start to enforcement: median %.1f ms, max %.1f ms (the push command itself: median %.1f ms)",
		len(cr.Probes)-cr.Missed, len(cr.Probes), e.Median, e.Max, p.Median)
	usageVerdict(res)
	res.settle()
}

// churnWorkload is steady's workload without the analytics requests of the customers
// whose advanced_analytics the updates toggle.
func churnWorkload(n int) *workload {
	wl := steadyWorkload(n)
	order := wl.order[:0]
	for _, t := range wl.order {
		c, r := int(t)/len(steadyRoutes), int(t)%len(steadyRoutes)
		if churnFlip(c) && steadyRoutes[r].name == "analytics" {
			continue
		}
		order = append(order, t)
	}
	wl.order = order
	return wl
}

func writeChurn(w io.Writer, cr *churnResult) {
	dur := 0.0
	if len(cr.Closed) > 0 {
		dur = cr.Closed[0].Seconds
	}
	fmt.Fprintf(w, "\nClosed loop: %d rounds of (quiet, churn) back to back, %.0f s each; req/s and CPU: median over rounds; latency: all rounds merged.\n", len(cr.Rounds), dur)
	order := []string{"quiet", "churn"}
	writeRuns(w, cr.ClosedSummary, order, false, "vs quiet", func(t string) string {
		if t == "churn" {
			return ratio(cr.ThroughputRatio)
		}
		return "1"
	})
	fmt.Fprintf(w, "\nOpen loop at %s req/s: %d (quiet, churn) pairs; latency from the intended send time, pairs merged; added = median of per-pair differences.\n",
		thousands(cr.Rate), len(cr.OpenPairs))
	writeRuns(w, cr.OpenSummary, order, true, "added p99 ms", func(t string) string {
		if t == "churn" {
			return delta(cr.P99Added)
		}
		return "-"
	})
	ps := cr.Pushes
	share := 0.0
	if ps.Seconds > 0 {
		share = ps.CPU / (ps.Seconds * float64(runtime.NumCPU()))
	}
	fmt.Fprintf(w, "updates: %d pushes of %d snapshots, one every %.0f ms during the churn runs: %d written in %.1f s = %.0f/s (offered %.0f/s), %d failed; push command median %.1f ms, max %.1f ms; the pushes took %.1f%% of the machine\n",
		ps.Pushes, cr.Batch, 1000*cr.Every, ps.Written, ps.Seconds, ps.Achieved, cr.Updates, ps.Failed, ps.Took.Median, ps.Took.Max, 100*share)
	for _, e := range ps.Errors {
		fmt.Fprintf(w, "  push error: %s\n", e)
	}
	fmt.Fprintf(w, "propagation: %d probes (the probe customer's advanced_analytics toggled, the sidecar polled every ~1 ms until it answered 200 or 403): push start to enforcement median %.1f ms [%.1f–%.1f], the push command alone median %.1f ms; %d never enforced\n",
		len(cr.Probes), cr.Enforced.Median, cr.Enforced.Min, cr.Enforced.Max, cr.PushMs.Median, cr.Missed)
	fmt.Fprintf(w, "responses not 2xx over all runs: %d (the load asks the %d toggled customers for nothing they lose)\n", cr.Non2xx, cr.Flip)
	if n := redone(cr.Closed, cr.Open); n > 0 {
		fmt.Fprintf(w, "%d runs were redone because other processes or steal took more than -max-noise of the machine\n", n)
	}
}
