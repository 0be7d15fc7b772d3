package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
)

// The usage check: published usage equals admitted usage. The harness counts every 2xx
// the sidecar gave (warm-ups and sanity requests included) per request template, turns
// the counts into units per (customer, feature) with the workload's costs, and compares
// them with what `gatehouse usage -config FILE -json` reads from stream GATEHOUSE_USAGE,
// summed over windows. Publication is asynchronous (usage.flush_interval), so it polls
// until they agree or stop changing.

// usageQuiet is how long published usage may stay the same before the check gives up
// on it: two of the sidecar's flush intervals and a second.
func usageQuiet(configPath string) time.Duration {
	return 2*flushInterval(configPath) + time.Second
}

// flushInterval is the usage.flush_interval of the sidecar configured by the file at
// configPath: the default's when the configuration does not load here (a -gatehouse
// binary of another version).
func flushInterval(configPath string) time.Duration {
	if cfg, err := config.Load(configPath); err == nil {
		return cfg.Usage.FlushInterval
	}
	return config.Default().Usage.FlushInterval
}

// openDuration is the recorded time of the open-loop runs at -rate that compare sidecar
// p with a baseline: -open-duration, but at least p's usage flush interval when p
// publishes usage. The publisher's work comes once per interval (a cut, its message, a
// share of settling); a shorter run holds a cut or none, and its p99 depends on which,
// so that the per-pair differences would be drawn from two populations. A run of one
// interval or more holds the same share of that work as a long window does.
func (e *env) openDuration(p *proc) time.Duration {
	return e.wholeIntervals(p, e.o.OpenDuration)
}

// wholeIntervals is d, but at least p's usage flush interval when p publishes usage.
func (e *env) wholeIntervals(p *proc, d time.Duration) time.Duration {
	if e.caps[capUsage] && !p.usageOff {
		d = max(d, flushInterval(p.config))
	}
	return d
}

// planOpen is openDuration for plans, before any sidecar runs: with the default flush
// interval when usage is on.
func planOpen(o *options) time.Duration {
	if !o.Usage {
		return o.OpenDuration
	}
	return max(o.OpenDuration, config.Default().Usage.FlushInterval)
}

// unit is what one admitted request of a template costs one feature.
type unit struct {
	customer, feature string
	n                 int64
}

// usageCheck is a scenario's usage check in results.json.
type usageCheck struct {
	Status     string   `json:"status"` // pass | fail | not_available
	Reason     string   `json:"reason,omitempty"`
	Admitted   int64    `json:"admitted_units"`
	Published  int64    `json:"published_units"`
	Keys       int      `json:"keys"` // (customer, feature) pairs with admitted or published usage
	Mismatched int      `json:"mismatched_keys"`
	Examples   []string `json:"examples,omitempty"`
	Seconds    float64  `json:"seconds_to_agree,omitempty"`
	Transport  int64    `json:"transport_errors"` // answers lost: such a request may go either way
}

// track starts counting p's 2xx answers to wl's templates, in every phase.
func (e *env) track(p *proc, wl *workload) []atomic.Int64 {
	c := make([]atomic.Int64, len(wl.reqs))
	e.admitted[p] = c
	return c
}

// admittedUnits turns per-template counts into units per (customer, feature).
func admittedUnits(wl *workload, counts []atomic.Int64) map[[2]string]int64 {
	out := map[[2]string]int64{}
	for t := range counts {
		n := counts[t].Load()
		if n == 0 {
			continue
		}
		for _, u := range wl.uses[t] {
			out[[2]string{u.customer, u.feature}] += n * u.n
		}
	}
	return out
}

// checkUsage runs the usage check of sidecar p after its load.
func (e *env) checkUsage(ctx context.Context, p *proc, wl *workload, transportErrors int64) usageCheck {
	return e.checkUsageOf(ctx, []*proc{p}, wl, transportErrors)
}

// checkUsageOf runs the usage check over sidecars that publish into one stream (a
// fleet on one NATS): admitted is what all of them gave together, and the stream is
// read once, through the first one's configuration.
func (e *env) checkUsageOf(ctx context.Context, ps []*proc, wl *workload, transportErrors int64) usageCheck {
	uc := usageCheck{Status: "not_available", Transport: transportErrors}
	want := map[[2]string]int64{}
	var names []string
	for _, p := range ps {
		counts, ok := e.admitted[p]
		if !ok {
			uc.Reason = "the harness did not track the answers of " + p.name
			return uc
		}
		for k, v := range admittedUnits(wl, counts) {
			want[k] += v
			uc.Admitted += v
		}
		names = append(names, p.name)
	}
	p := ps[0]
	switch {
	case !e.caps[capUsage]:
		uc.Reason = "not available in this build: gatehouse serve publishes no usage (`gatehouse version` lists no capability usage-outbox, and check-config does not know usage.enabled)"
		return uc
	case p.usageOff:
		uc.Reason = "-usage=false: the sidecar ran with usage accounting off"
		return uc
	}
	quiet := usageQuiet(p.config)
	start := time.Now()
	var last int64 = -1
	stable := 0
	for {
		got, err := publishedUsage(ctx, e.bin.gatehouse, p.config)
		if err != nil {
			uc.Status, uc.Reason = "fail", err.Error()
			return uc
		}
		uc.Published, uc.Mismatched, uc.Examples = 0, 0, nil
		keys := map[[2]string]bool{}
		for k, v := range got {
			uc.Published += v
			keys[k] = true
		}
		for k := range want {
			keys[k] = true
		}
		var bad []string
		for k := range keys {
			if got[k] != want[k] {
				uc.Mismatched++
				bad = append(bad, fmt.Sprintf("%s/%s: admitted %d, published %d", k[0], k[1], want[k], got[k]))
			}
		}
		uc.Keys = len(keys)
		sort.Strings(bad)
		if len(bad) > 10 {
			bad = bad[:10]
		}
		uc.Examples = bad
		uc.Seconds = time.Since(start).Seconds()
		if uc.Mismatched == 0 {
			uc.Status = "pass"
			break
		}
		if uc.Published == last {
			stable++
		} else {
			stable = 0
		}
		last = uc.Published
		if time.Duration(stable)*time.Second > quiet || time.Since(start) > 45*time.Second || ctx.Err() != nil {
			uc.Status = "fail"
			uc.Reason = "published usage stopped changing before it matched"
			break
		}
		sleepCtx(ctx, time.Second)
	}
	e.logf("%s: usage check %s: admitted %d units, published %d, %d of %d keys differ (%.1f s)",
		strings.Join(names, "+"), uc.Status, uc.Admitted, uc.Published, uc.Mismatched, uc.Keys, uc.Seconds)
	return uc
}

// publishedUsage runs `gatehouse usage -config FILE -json` and sums it per (customer,
// feature) over windows.
func publishedUsage(ctx context.Context, bin, config string) (map[[2]string]int64, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "usage", "-config", config, "-json")
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("gatehouse usage: %v: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	var totals []struct {
		CustomerID string `json:"customer_id"`
		Feature    string `json:"feature"`
		Quantity   int64  `json:"quantity"`
	}
	if err := json.Unmarshal(out, &totals); err != nil {
		return nil, fmt.Errorf("gatehouse usage -json: %w", err)
	}
	got := map[[2]string]int64{}
	for _, t := range totals {
		got[[2]string{t.CustomerID, t.Feature}] += t.Quantity
	}
	return got, nil
}

// usageVerdict adds the usage check to a scenario's checks when it ran.
func usageVerdict(res *scenarioResult) {
	u := res.UsageCheck
	if u.Status == "not_available" {
		return
	}
	res.check("published usage == admitted usage", u.Status == "pass",
		"admitted %d units, published %d; %d of %d (customer, feature) keys differ; %d answers lost in transport",
		u.Admitted, u.Published, u.Mismatched, u.Keys, u.Transport)
}
