package main

import (
	"context"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"
)

// scenario is one thing the harness can prove. Run may take minutes; it reports failed
// checks in its result and returns an error only when it could not measure at all.
type scenario interface {
	Name() string
	// Available reports whether this build of gatehouse can run the scenario, and if
	// not, why.
	Available(e *env) (ok bool, why string)
	Run(ctx context.Context, e *env) (*scenarioResult, error)
}

// planner is implemented by scenarios that know how long they take when nothing is
// redone, so that the harness can keep the whole run within -budget.
type planner interface {
	plan(o *options) time.Duration
}

// perRun is the overhead of one measured run (connecting, sampling, GC) besides its
// warm-up and recorded time.
const perRun = 150 * time.Millisecond

// scenarios are all that the harness knows, the default set (defaultScenarios) first.
func scenarios() []scenario {
	return []scenario{steadyScenario{}, exhaustScenario{}, churnScenario{}, fleetScenario{}, outageScenario{}, usageCostScenario{}}
}

func lookupScenario(name string) (scenario, error) {
	var names []string
	for _, s := range scenarios() {
		if s.Name() == name {
			return s, nil
		}
		names = append(names, s.Name())
	}
	return nil, fmt.Errorf("unknown scenario %q (have %s)", name, strings.Join(names, ", "))
}

// describer is implemented by scenarios whose one-line description is worth giving
// even when they cannot run.
type describer interface {
	about(o *options) string
}

// Capabilities that `gatehouse version` lists on its line "capabilities: ...".
const (
	capNATS  = "nats"         // serve runs the KV replica (embedded or external NATS)
	capUsage = "usage-outbox" // serve publishes usage, and `gatehouse usage` reports it
	capFleet = "fleet-quota"  // hard limits through KV leases
)

func missingCaps(e *env, needs []string) []string {
	var miss []string
	for _, c := range needs {
		if !e.caps[c] {
			miss = append(miss, c)
		}
	}
	return miss
}

// needCaps is Available for a scenario that needs the capabilities needs.
func needCaps(e *env, needs ...string) (bool, string) {
	if miss := missingCaps(e, needs); len(miss) > 0 {
		return false, fmt.Sprintf("this gatehouse lacks %s (%s)", strings.Join(miss, ", "), capsSource(e))
	}
	return true, ""
}

func capsSource(e *env) string {
	if e.capsFrom == "" {
		return "`gatehouse version` lists no capabilities, and its configuration knows neither usage.enabled nor quota.enabled"
	}
	var have []string
	for c := range e.caps {
		have = append(have, c)
	}
	sort.Strings(have)
	return fmt.Sprintf("capabilities %v, from %s", have, e.capsFrom)
}

// scenarioResult is one scenario's part of results.json.
type scenarioResult struct {
	Name       string           `json:"name"`
	About      string           `json:"about"`
	Status     string           `json:"status"` // pass | fail | not_available | error
	Reason     string           `json:"reason,omitempty"`
	Seconds    float64          `json:"seconds"`
	Checks     []check          `json:"checks"`
	UsageCheck usageCheck       `json:"usage_check"`
	Steady     *steadyResult    `json:"steady,omitempty"`
	Exhaust    *exhaustResult   `json:"exhaust,omitempty"`
	Churn      *churnResult     `json:"churn,omitempty"`
	Fleet      *fleetResult     `json:"fleet,omitempty"`
	Outage     *outageResult    `json:"outage,omitempty"`
	UsageCost  *usageCostResult `json:"usage_cost,omitempty"`
}

// check is one pass/fail statement with the figures behind it.
type check struct {
	Name   string `json:"name"`
	Pass   bool   `json:"pass"`
	Detail string `json:"detail"`
}

func (r *scenarioResult) check(name string, pass bool, format string, args ...any) {
	r.Checks = append(r.Checks, check{Name: name, Pass: pass, Detail: fmt.Sprintf(format, args...)})
}

// atMostMs reports whether v, a latency difference in milliseconds computed from the
// histograms' whole microseconds, is at most bound. It compares whole microseconds:
// in floating point 0.800 - 0.500 is 0.30000000000000004, and a difference of exactly
// the bound would read as a miss.
func atMostMs(v, bound float64) bool { return math.Round(v*1000) <= math.Round(bound*1000) }

// settle sets Status from the checks.
func (r *scenarioResult) settle() {
	r.Status = "pass"
	for _, c := range r.Checks {
		if !c.Pass {
			r.Status = "fail"
		}
	}
}

// stat summarises repeated measurements of one quantity.
type stat struct {
	Median float64   `json:"median"`
	Min    float64   `json:"min"`
	Max    float64   `json:"max"`
	N      int       `json:"n"`
	Values []float64 `json:"values"`
}

func newStat(vs []float64) stat {
	var v []float64 // finite values only: JSON has no Inf or NaN
	for _, x := range vs {
		if !math.IsInf(x, 0) && !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return stat{}
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{Median: m, Min: s[0], Max: s[len(s)-1], N: len(s), Values: v}
}
