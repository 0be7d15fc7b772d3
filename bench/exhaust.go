package main

import (
	"context"
	"fmt"
	"time"
)

// exhaust: customers run into their hard limits, many connections at once asking for
// the last units of one limit. Admitted must equal the sum of the limits exactly, every
// other request must get 429 with Retry-After, and the sidecar's own decision counter
// must agree with what the clients saw.
type exhaustScenario struct{}

func (exhaustScenario) Name() string                  { return "exhaust" }
func (exhaustScenario) Available(*env) (bool, string) { return true, "" }

// exhaustResult is exhaust's part of results.json.
type exhaustResult struct {
	Customers      int        `json:"customers"`
	Limits         int64      `json:"sum_of_limits"`
	Sent           int64      `json:"sent"`
	Admitted       int64      `json:"admitted"`
	Refused        int64      `json:"refused_429"`
	ExpectedRefuse int64      `json:"expected_429"`
	Other          int64      `json:"other_responses"`
	NoRetryAfter   int64      `json:"429_without_retry_after"`
	MetricsAllowed int64      `json:"sidecar_metrics_allowed"` // -1: could not read
	Mismatches     []mismatch `json:"mismatches,omitempty"`
	Run            *runRecord `json:"run"`
}

type mismatch struct {
	Customer string `json:"customer"`
	Limit    int64  `json:"limit"`
	Admitted int64  `json:"admitted"`
	Sent     int64  `json:"sent"`
	// Leased is, in a fleet, the unused units each sidecar still held in its lease
	// after the run (admin /v1/customers/{id}); nil when not asked.
	Leased []int64 `json:"leased_per_sidecar,omitempty"`
	// Pending is, in a fleet, what each sidecar had taken back from its lease to return
	// and the bucket had not confirmed (a return in flight or waiting for a retry).
	Pending []int64 `json:"pending_per_sidecar,omitempty"`
	// Bucket is, in a fleet, what the quota bucket held for the customer after the run:
	// granted, limit and each sidecar's grant; empty when not read.
	Bucket string `json:"bucket,omitempty"`
}

func (exhaustScenario) plan(*options) time.Duration { return 10 * time.Second }

func (exhaustScenario) Run(ctx context.Context, e *env) (*scenarioResult, error) {
	o := e.o
	plan := newExhaustPlan(o.ExhaustCusts, o.Conns)
	res := &scenarioResult{Name: "exhaust", About: fmt.Sprintf(
		"%d customers with hard limits of 0 to 250 requests (window NEVER), each sent its limit plus 5+limit/5 more, in bursts of up to %d concurrent requests per customer",
		o.ExhaustCusts, o.Conns)}
	xr := &exhaustResult{Customers: o.ExhaustCusts, MetricsAllowed: -1}
	res.Exhaust = xr
	for i := range plan.limits {
		xr.Limits += plan.limits[i]
		xr.ExpectedRefuse += plan.extra[i]
	}
	e.logf("exhaust: starting a fresh sidecar with %d limited customers (sum of limits %d)", o.ExhaustCusts, xr.Limits)
	p, err := e.startSidecar(ctx, "sidecar-exhaust", plan.snapshots())
	if err != nil {
		return nil, err
	}
	defer e.stopProc(p)

	e.track(p, plan.wl)
	spec := runSpec{conns: o.Conns, duration: 2 * time.Minute}
	rec, lr, err := e.measure(ctx, "exhaust", "exhaust", 0, p, plan.wl, spec)
	if err != nil {
		return nil, err
	}
	xr.Run = rec
	xr.Sent = lr.requests
	xr.NoRetryAfter = lr.noRetry
	for i := range plan.limits {
		ok, refused := lr.ok[i], lr.refused[i]
		xr.Admitted += ok
		xr.Refused += refused
		if ok != plan.limits[i] && len(xr.Mismatches) < 20 {
			xr.Mismatches = append(xr.Mismatches, mismatch{Customer: exhaustCustomer(i), Limit: plan.limits[i], Admitted: ok, Sent: plan.limits[i] + plan.extra[i]})
		}
	}
	xr.Other = xr.Sent - xr.Admitted - xr.Refused
	if n, err := decisionsAllowed(p.admin, "reports"); err == nil {
		xr.MetricsAllowed = n
	} else {
		e.logf("exhaust: could not read the sidecar's metrics: %v", err)
	}

	want := int64(len(plan.wl.order))
	res.check("every planned request sent", xr.Sent == want, "%d of %d", xr.Sent, want)
	res.check("admitted == sum of limits", xr.Admitted == xr.Limits && len(xr.Mismatches) == 0,
		"admitted %d, limits %d; %d customers off their limit", xr.Admitted, xr.Limits, len(xr.Mismatches))
	res.check("every other request 429", xr.Refused == xr.ExpectedRefuse && xr.Other == 0,
		"429: %d of %d expected; other responses or errors: %d", xr.Refused, xr.ExpectedRefuse, xr.Other)
	res.check("every 429 has Retry-After", xr.NoRetryAfter == 0, "%d without", xr.NoRetryAfter)
	res.check("sidecar's allow counter == admitted", xr.MetricsAllowed == xr.Admitted,
		"gatehouse_decisions_total{route=\"reports\",result=\"allow\"} = %d", xr.MetricsAllowed)
	res.UsageCheck = e.checkUsage(ctx, p, plan.wl, lr.errors)
	usageVerdict(res)
	res.settle()
	return res, nil
}

// decisionsAllowed sums gatehouse_decisions_total for route and result "allow" from the
// sidecar's admin /metrics.
func decisionsAllowed(admin, route string) (int64, error) {
	v, err := metricSum(admin, "gatehouse_decisions_total", `route="`+route+`"`, `result="allow"`)
	return int64(v), err
}
