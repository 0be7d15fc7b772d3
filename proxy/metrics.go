package proxy

import (
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the request path's Prometheus collectors. Labels are bounded by the
// configuration (routes, features, reasons) and by gatehouse itself (results, check
// endpoints), never by customers or request paths.
//
// Recording costs a few atomic adds per request: the counters of an admitted request are
// found through a map from the current routing table's routes, built on Reload, so the
// common case hashes nothing but a pointer. Timing a decision costs more than the
// decision on some clocks, so only one decision in TimeEvery is timed.
type Metrics struct {
	Decisions        *prometheus.CounterVec // route, result, reason, feature
	DecisionSeconds  prometheus.Histogram
	UpstreamSeconds  prometheus.Histogram
	UpstreamStatus   *prometheus.CounterVec // class: 1xx..5xx, error, timeout
	ProtocolErrors   *prometheus.CounterVec // reason
	UsageWriteErrors prometheus.Counter
	Checks           *prometheus.CounterVec // endpoint, result
	ConfigReloads    *prometheus.CounterVec // result: success, error
	ConfigReloadOK   prometheus.Gauge
	ConfigReloadTime prometheus.Gauge

	// TimeEvery is how many decisions share one timing: 0 or 1 times every decision.
	// Set it before the proxy serves; NewMetrics sets DefaultTimeEvery.
	TimeEvery uint32

	bound  atomic.Pointer[boundTable] // counters of the current table's routes
	cache  sync.Map                   // decisionKey -> prometheus.Counter, for the rest
	status [6]prometheus.Counter
	errs   [2]prometheus.Counter
	checks [numCheckEndpoints][numResults]prometheus.Counter
}

// DefaultTimeEvery is the share of decisions that are timed by default: 1 in 64.
const DefaultTimeEvery = 64

// Decision results, the values of the result label.
const (
	resultAllow = iota
	resultDeny
	resultShadowDeny
	resultUnchecked // replica not ready and the route allows it: forwarded unchecked
	numResults
)

var resultNames = [numResults]string{"allow", "deny", "shadow_deny", "unchecked"}

// routeStats are the pre-resolved counters of one route's admitted requests.
type routeStats struct {
	allow, unchecked prometheus.Counter
}

// boundTable maps the routes of one routing table (nil: unmatched requests) to their
// counters. It is built whole on Reload and never changed.
type boundTable struct {
	routes map[*route]*routeStats
}

type decisionKey struct {
	route   string
	result  uint8
	reason  limiter.Reason
	feature string
}

// NewMetrics returns unregistered collectors; Register adds them to a registry.
func NewMetrics() *Metrics {
	m := &Metrics{
		Decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gatehouse_decisions_total",
			Help: "Decisions by route (unmatched: no route), result (allow, deny, shadow_deny, unchecked), reason and refusing feature. Proxied requests and check endpoints alike.",
		}, []string{"route", "result", "reason", "feature"}),
		DecisionSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "gatehouse_decision_seconds",
			Help:    "Time to decide one request, identity to reservation. Sampled: one decision in 64 is timed by default.",
			Buckets: []float64{250e-9, 500e-9, 1e-6, 2e-6, 5e-6, 10e-6, 50e-6, 250e-6, 1e-3},
		}),
		UpstreamSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "gatehouse_upstream_seconds", Help: "Time the upstream took to answer a forwarded request.",
			Buckets: prometheus.ExponentialBuckets(100e-6, 2.5, 14),
		}),
		UpstreamStatus: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gatehouse_upstream_responses_total", Help: "Upstream responses by status class (1xx..5xx), and transport errors (error, timeout).",
		}, []string{"class"}),
		ProtocolErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gatehouse_protocol_errors_total", Help: "Requests refused before routing: oversized headers or body, timeouts, malformed requests.",
		}, []string{"reason"}),
		UsageWriteErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "gatehouse_usage_write_errors_total", Help: "Committed usage that could not be made durable.",
		}),
		Checks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gatehouse_checks_total", Help: "Requests to the check endpoints by endpoint (envoy, traefik, nginx, invalid) and result.",
		}, []string{"endpoint", "result"}),
		ConfigReloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gatehouse_config_reloads_total", Help: "Configuration reloads by result (success, error). A failed reload keeps the running configuration.",
		}, []string{"result"}),
		ConfigReloadOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "gatehouse_config_last_reload_successful", Help: "1 if the last configuration reload succeeded (or none was tried), 0 if it failed.",
		}),
		ConfigReloadTime: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "gatehouse_config_last_reload_success_timestamp_seconds", Help: "When the running configuration was loaded, in Unix seconds.",
		}),
		TimeEvery: DefaultTimeEvery,
	}
	for i, class := range []string{"1xx", "1xx", "2xx", "3xx", "4xx", "5xx"} {
		m.status[i] = m.UpstreamStatus.WithLabelValues(class)
	}
	m.errs[0] = m.UpstreamStatus.WithLabelValues("error")
	m.errs[1] = m.UpstreamStatus.WithLabelValues("timeout")
	for e := range m.checks {
		for r := range m.checks[e] {
			m.checks[e][r] = m.Checks.WithLabelValues(checkEndpointNames[e], resultNames[r])
		}
	}
	m.ConfigReloads.WithLabelValues("success")
	m.ConfigReloads.WithLabelValues("error")
	m.ConfigReloadOK.Set(1)
	m.ConfigReloadTime.SetToCurrentTime()
	return m
}

// Register adds the collectors to r.
func (m *Metrics) Register(r prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.Decisions, m.DecisionSeconds, m.UpstreamSeconds, m.UpstreamStatus,
		m.ProtocolErrors, m.UsageWriteErrors, m.Checks, m.ConfigReloads, m.ConfigReloadOK, m.ConfigReloadTime} {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

// Metrics returns the proxy's collectors.
func (p *Proxy) Metrics() *Metrics { return p.metrics }

// ConfigReloaded counts a configuration reload; err nil is a success.
func (m *Metrics) ConfigReloaded(err error) {
	if err != nil {
		m.ConfigReloads.WithLabelValues("error").Inc()
		m.ConfigReloadOK.Set(0)
		return
	}
	m.ConfigReloads.WithLabelValues("success").Inc()
	m.ConfigReloadOK.Set(1)
	m.ConfigReloadTime.SetToCurrentTime()
}

// bind resolves the counters of t's routes, so that an admitted request's counter is
// one map lookup by pointer. Requests that still hold an older table fall back to the
// labelled lookup.
func (m *Metrics) bind(t *table) {
	b := &boundTable{routes: make(map[*route]*routeStats, len(t.routes)+1)}
	stats := func(name string) *routeStats {
		return &routeStats{
			allow:     m.Decisions.WithLabelValues(name, "allow", limiter.OK.String(), ""),
			unchecked: m.Decisions.WithLabelValues(name, "unchecked", limiter.OK.String(), ""),
		}
	}
	b.routes[nil] = stats(unmatchedRoute)
	for i := range t.routes {
		b.routes[&t.routes[i]] = stats(t.routes[i].name)
	}
	m.bound.Store(b)
}

// unmatchedRoute is the route label of requests that match no route.
const unmatchedRoute = "unmatched"

// startTiming reports whether the decision about to be made with st is one of those
// timed, and if so when it started. The count lives in the pooled per-request state,
// so sampling costs no shared write.
func (m *Metrics) startTiming(st *reqState) (time.Time, bool) {
	if st.timing > 1 {
		st.timing--
		return time.Time{}, false
	}
	st.timing = m.TimeEvery
	return time.Now(), true
}

// resultOf is the result label of an outcome.
func resultOf(o *outcome) uint8 {
	switch {
	case o.decision.Reason != limiter.OK && o.shadow:
		return resultShadowDeny
	case o.decision.Reason != limiter.OK:
		return resultDeny
	case o.unready:
		return resultUnchecked
	}
	return resultAllow
}

// decided counts a decision, and times it when timed.
func (m *Metrics) decided(o *outcome, start time.Time, timed bool) {
	if timed {
		m.DecisionSeconds.Observe(time.Since(start).Seconds())
	}
	result := resultOf(o)
	if result == resultAllow || result == resultUnchecked {
		if b := m.bound.Load(); b != nil {
			if rs := b.routes[o.route]; rs != nil {
				if result == resultAllow {
					rs.allow.Inc()
				} else {
					rs.unchecked.Inc()
				}
				return
			}
		}
	}
	name := unmatchedRoute
	if o.route != nil {
		name = o.route.name
	}
	k := decisionKey{route: name, result: result, reason: o.decision.Reason, feature: o.decision.Feature}
	if c, ok := m.cache.Load(k); ok {
		c.(prometheus.Counter).Inc()
		return
	}
	c := m.Decisions.WithLabelValues(name, resultNames[result], o.decision.Reason.String(), o.decision.Feature)
	m.cache.Store(k, c)
	c.Inc()
}

// checked counts a request to a check endpoint.
func (m *Metrics) checked(e checkEndpoint, result uint8) { m.checks[e][result].Inc() }

func (m *Metrics) upstream(status int, err error, start time.Time) {
	if !start.IsZero() {
		m.UpstreamSeconds.Observe(time.Since(start).Seconds())
	}
	if err != nil {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			m.errs[1].Inc()
		} else {
			m.errs[0].Inc()
		}
		return
	}
	if i := status / 100; i >= 1 && i <= 5 {
		m.status[i].Inc()
	}
}

func (m *Metrics) protocolError(reason string) { m.ProtocolErrors.WithLabelValues(reason).Inc() }

func (m *Metrics) recordError() { m.UsageWriteErrors.Inc() }

func netIPString(ip []byte) string { return net.IP(ip).String() }
