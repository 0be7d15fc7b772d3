package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"
	"time"
)

// The sidecar's configuration and the two workloads that exist today. One
// configuration serves every scenario; each scenario brings its own customers.

// sidecarSpec is what differs between the sidecars the harness runs.
type sidecarSpec struct {
	listen, admin, upstream, dataDir string
	snapshots                        string   // entitlements.file; "" for none
	natsURLs                         []string // the NATS servers to connect to; none: no nats section
	usageOff                         bool     // usage.enabled: false
}

// sidecarConfig is the YAML the sidecar runs with. The server and upstream sections
// keep config.Default's values, which the bare proxy copies.
// natsURLs are the sidecar's NATS servers (its own natssrv, or a fleet's). usageOff
// writes usage.enabled: false, a key that only builds with usage accounting know.
func sidecarConfig(sp sidecarSpec) string {
	r := strings.NewReplacer("LISTEN", sp.listen, "ADMIN", sp.admin, "UPSTREAM", sp.upstream, "DATA", sp.dataDir, "SNAPS", sp.snapshots)
	cfg := r.Replace(`# Written by the bench harness (bench/workloads.go).
listen: "LISTEN"
admin_listen: "ADMIN"
upstream:
  url: "http://UPSTREAM"
data_dir: "DATA"
identity:
  header: X-Customer-Id
entitlements:
  file: "SNAPS"
unmatched: deny
routes:
  - name: hello                      # metered, hard limit far away, plus a static header
    method: GET
    path: /v1/hello
    features:
      - {feature: api_calls, cost: 1}
    headers: {X-Support-Tier: support_tier}
  - name: analytics                  # boolean gate
    method: GET
    path: /v1/analytics/**
    features:
      - {feature: advanced_analytics}
  - name: search                     # two metered features, one costed by a request header
    method: GET
    path: /v1/search/*
    features:
      - {feature: api_calls, cost: 1}
      - {feature: searches, cost_request_header: X-Search-Cost, cost: 1}
  - name: reports                    # exhaust: a small hard limit per customer
    method: POST
    path: /v1/reports
    features:
      - {feature: reports, cost: 1}
log:
  level: warn
  format: json
`)
	if len(sp.natsURLs) > 0 {
		cfg += "nats:\n  urls: [\"" + strings.Join(sp.natsURLs, "\", \"") + "\"]\n"
	}
	if sp.usageOff {
		cfg += "usage:\n  enabled: false\n"
	}
	return cfg
}

type featureDoc struct {
	Type        string   `json:"type"`
	IsEnabled   *bool    `json:"is_enabled,omitempty"`
	UsageLimit  *int64   `json:"usage_limit,omitempty"`
	IsSoftLimit bool     `json:"is_soft_limit,omitempty"`
	Reset       string   `json:"usage_reset_period,omitempty"`
	Static      []string `json:"static_values,omitempty"`
}

type snapshotDoc struct {
	CustomerID string                `json:"customer_id"`
	Billing    map[string]string     `json:"billing"`
	Features   map[string]featureDoc `json:"features"`
}

func ptr[T any](v T) *T { return &v }

// writeSnapshots writes snapshots as NDJSON.
func writeSnapshots(path string, snaps []snapshotDoc) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	enc := json.NewEncoder(f)
	for i := range snaps {
		if err := enc.Encode(&snaps[i]); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

var (
	zones = []string{"UTC", "America/New_York", "Europe/Berlin", "Asia/Kolkata"}
	tiers = []string{"community", "business hours", "24/7"}
)

// billing anchors customer i's windows on a day of last month in one of a few zones.
func billing(i int) map[string]string {
	start := time.Now().UTC().AddDate(0, -1, 0)
	start = time.Date(start.Year(), start.Month(), 1+i%28, 0, 0, 0, 0, time.UTC)
	return map[string]string{"period_start": start.Format(time.RFC3339), "interval": "MONTHLY", "timezone": zones[i%len(zones)]}
}

func steadyCustomer(i int) string  { return fmt.Sprintf("cust-%05d", i) }
func exhaustCustomer(i int) string { return fmt.Sprintf("limited-%04d", i) }

// steadySnapshots: every customer is entitled to everything the steady routes use, with
// limits nobody comes near.
func steadySnapshots(n int) []snapshotDoc {
	out := make([]snapshotDoc, n)
	for i := range out {
		out[i] = steadySnapshot(i)
	}
	return out
}

func steadySnapshot(i int) snapshotDoc {
	return snapshotDoc{CustomerID: steadyCustomer(i), Billing: billing(i), Features: map[string]featureDoc{
		"api_calls":          {Type: "metered", UsageLimit: ptr[int64](1e12), Reset: "MONTHLY"},
		"searches":           {Type: "metered", UsageLimit: ptr[int64](1e12), IsSoftLimit: true, Reset: "DAILY"},
		"advanced_analytics": {Type: "boolean", IsEnabled: ptr(true)},
		"support_tier":       {Type: "static", Static: []string{tiers[i%len(tiers)]}},
	}}
}

// request builds one raw HTTP/1.1 request.
func request(method, path, customer string, extra ...string) []byte {
	var b strings.Builder
	b.WriteString(method + " " + path + " HTTP/1.1\r\nHost: bench\r\nUser-Agent: gatehouse-bench\r\nX-Customer-Id: " + customer + "\r\n")
	for _, h := range extra {
		b.WriteString(h + "\r\n")
	}
	if method == "POST" {
		b.WriteString("Content-Length: 0\r\n")
	}
	b.WriteString("\r\n")
	return []byte(b.String())
}

// steadyRoutes is the request mix: half hello, a quarter each analytics and search;
// uses is what an admitted request costs, for the usage check.
var steadyRoutes = []struct {
	name   string
	weight int
	build  func(customer string, i int) []byte
	uses   func(customer string, i int) []unit
}{
	{"hello", 2, func(c string, _ int) []byte { return request("GET", "/v1/hello", c) },
		func(c string, _ int) []unit { return []unit{{c, "api_calls", 1}} }},
	{"analytics", 1, func(c string, i int) []byte {
		return request("GET", fmt.Sprintf("/v1/analytics/report/%d?range=7d", i%7), c)
	}, func(string, int) []unit { return nil }},
	{"search", 1, func(c string, i int) []byte {
		return request("GET", fmt.Sprintf("/v1/search/q%d", i%100), c, fmt.Sprintf("X-Search-Cost: %d", searchCost(i)))
	}, func(c string, i int) []unit { return []unit{{c, "api_calls", 1}, {c, "searches", searchCost(i)}} }},
}

func searchCost(i int) int64 { return int64(1 + i%3) }

// steadyWorkload: one template per (customer, route); the order draws customers
// uniformly and routes by weight, from a fixed seed.
func steadyWorkload(n int) *workload {
	wl := &workload{}
	for i := 0; i < n; i++ {
		for _, r := range steadyRoutes {
			wl.reqs = append(wl.reqs, r.build(steadyCustomer(i), i))
			wl.uses = append(wl.uses, r.uses(steadyCustomer(i), i))
		}
	}
	var weights []int
	for ri, r := range steadyRoutes {
		for range r.weight {
			weights = append(weights, ri)
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	wl.order = make([]uint32, max(1<<17, 4*len(wl.reqs)))
	for k := range wl.order {
		c := rng.IntN(n)
		wl.order[k] = uint32(c*len(steadyRoutes) + weights[rng.IntN(len(weights))])
	}
	return wl
}

// leaseWarmup sends, once, for each of steady's first n customers (wl's templates from
// index 0), the fewest requests that together use every metered feature of the steady
// routes (one search: api_calls and searches), so that what the first use of a
// (customer, feature) costs a sidecar stays out of the measured runs: for a hard limit
// (api_calls) a fleet lease from the bucket, a KV round trip on the request path, and
// thousands of them; for every metered feature the window's counter and the
// publisher's first delta of the key. (searches is a soft limit: it takes no lease.)
func leaseWarmup(wl *workload, n int) *workload {
	warm := &workload{reqs: wl.reqs, uses: wl.uses, shared: true}
	routes := make([]int, len(steadyRoutes)) // the routes that use most first: fewer requests
	for ri := range routes {
		routes[ri] = ri
	}
	slices.SortStableFunc(routes, func(a, b int) int { return len(wl.uses[b]) - len(wl.uses[a]) })
	for c := range n {
		seen := map[string]bool{}
		for _, ri := range routes {
			t := c*len(steadyRoutes) + ri
			fresh := false
			for _, u := range wl.uses[t] {
				if !seen[u.feature] {
					seen[u.feature], fresh = true, true
				}
			}
			if fresh {
				warm.order = append(warm.order, uint32(t))
			}
		}
	}
	return warm
}

// warmLeases sends leaseWarmup(wl, n) to p, closed loop, and returns the run.
func (e *env) warmLeases(ctx context.Context, label string, p *proc, wl *workload, n int) (*runRecord, error) {
	r, _, err := e.measure(ctx, label, "warm", 0, p, leaseWarmup(wl, n), runSpec{conns: e.o.Conns, duration: time.Minute})
	return r, err
}

// exhaustPlan is the exhaust workload: customer i has a hard limit limits[i] on
// "reports" (window NEVER, so a run cannot straddle a reset) and is sent limits[i] +
// extra[i] requests.
type exhaustPlan struct {
	limits, extra []int64
	wl            *workload
}

func newExhaustPlan(n, conns int) *exhaustPlan {
	p := &exhaustPlan{limits: make([]int64, n), extra: make([]int64, n), wl: &workload{shared: true, track: true}}
	for i := range p.limits {
		p.limits[i] = int64(i*37) % 251 // 0..250, customer 0 has a limit of 0
		p.extra[i] = 5 + p.limits[i]/5
		p.wl.reqs = append(p.wl.reqs, request("POST", "/v1/reports", exhaustCustomer(i)))
		p.wl.uses = append(p.wl.uses, []unit{{exhaustCustomer(i), "reports", 1}})
	}
	// Each customer's requests go out in bursts of up to conns, so that many
	// connections ask for the last units of one limit at the same moment.
	type burst struct{ c, n int }
	var bursts []burst
	for i := range p.limits {
		for left := int(p.limits[i] + p.extra[i]); left > 0; left -= conns {
			bursts = append(bursts, burst{i, min(left, conns)})
		}
	}
	rng := rand.New(rand.NewPCG(3, 4))
	rng.Shuffle(len(bursts), func(a, b int) { bursts[a], bursts[b] = bursts[b], bursts[a] })
	for _, b := range bursts {
		for range b.n {
			p.wl.order = append(p.wl.order, uint32(b.c))
		}
	}
	return p
}

func (p *exhaustPlan) snapshots() []snapshotDoc {
	out := make([]snapshotDoc, len(p.limits))
	for i := range out {
		out[i] = snapshotDoc{CustomerID: exhaustCustomer(i), Billing: billing(i), Features: map[string]featureDoc{
			"reports": {Type: "metered", UsageLimit: ptr(p.limits[i]), Reset: "NEVER"},
		}}
	}
	return out
}
