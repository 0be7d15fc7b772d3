package proxy

import (
	"net"
	"sync"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the proxy's Prometheus collectors. Labels are bounded by the
// configuration (routes, features, reasons), never by customers.
type Metrics struct {
	Decisions        *prometheus.CounterVec // route, result, reason, feature
	DecisionSeconds  prometheus.Histogram
	UpstreamSeconds  prometheus.Histogram
	UpstreamStatus   *prometheus.CounterVec // class: 2xx..5xx, error, timeout
	ProtocolErrors   *prometheus.CounterVec // reason
	UsageWriteErrors prometheus.Counter

	mu     sync.Mutex // protects cache writes; reads go through the sync.Map
	cache  sync.Map   // decisionKey -> prometheus.Counter
	status [6]prometheus.Counter
	errs   [2]prometheus.Counter
}

type decisionKey struct {
	route   *route
	result  string
	reason  limiter.Reason
	feature string
}

// NewMetrics returns unregistered collectors; Register adds them to a registry.
func NewMetrics() *Metrics {
	m := &Metrics{
		Decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gatehouse_decisions_total", Help: "Decisions by route, result (allow, deny, shadow_deny, unchecked), reason and refusing feature.",
		}, []string{"route", "result", "reason", "feature"}),
		DecisionSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "gatehouse_decision_seconds", Help: "Time to decide one request, identity to reservation.",
			Buckets: []float64{250e-9, 500e-9, 1e-6, 2e-6, 5e-6, 10e-6, 50e-6, 250e-6, 1e-3},
		}),
		UpstreamSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "gatehouse_upstream_seconds", Help: "Time the upstream took to answer.",
			Buckets: prometheus.ExponentialBuckets(100e-6, 2.5, 14),
		}),
		UpstreamStatus: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gatehouse_upstream_responses_total", Help: "Upstream responses by status class, and transport errors.",
		}, []string{"class"}),
		ProtocolErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "gatehouse_protocol_errors_total", Help: "Requests refused before routing: oversized headers or body, timeouts, malformed requests.",
		}, []string{"reason"}),
		UsageWriteErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "gatehouse_usage_write_errors_total", Help: "Committed usage that could not be made durable.",
		}),
	}
	for i, class := range []string{"1xx", "1xx", "2xx", "3xx", "4xx", "5xx"} {
		m.status[i] = m.UpstreamStatus.WithLabelValues(class)
	}
	m.errs[0] = m.UpstreamStatus.WithLabelValues("error")
	m.errs[1] = m.UpstreamStatus.WithLabelValues("timeout")
	return m
}

// Register adds the collectors to r.
func (m *Metrics) Register(r prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.Decisions, m.DecisionSeconds, m.UpstreamSeconds, m.UpstreamStatus, m.ProtocolErrors, m.UsageWriteErrors} {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

func (m *Metrics) decided(r *route, d *limiter.Decision, shadow bool, took time.Duration) {
	m.DecisionSeconds.Observe(took.Seconds())
	k := decisionKey{route: r, reason: d.Reason, feature: d.Feature}
	switch {
	case d.Reason == limiter.OK:
		k.result = "allow"
	case shadow:
		k.result = "shadow_deny"
	default:
		k.result = "deny"
	}
	if c, ok := m.cache.Load(k); ok {
		c.(prometheus.Counter).Inc()
		return
	}
	name := "unmatched"
	if r != nil {
		name = r.name
	}
	c := m.Decisions.WithLabelValues(name, k.result, d.Reason.String(), d.Feature)
	m.cache.Store(k, c)
	c.Inc()
}

func (m *Metrics) upstream(status int, err error, took time.Duration) {
	m.UpstreamSeconds.Observe(took.Seconds())
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

