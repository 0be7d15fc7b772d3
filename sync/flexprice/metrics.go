package flexprice

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the bridge's Prometheus metrics, on a registry of its own.
type metrics struct {
	reg              *prometheus.Registry
	customersSynced  prometheus.Counter
	syncErrors       *prometheus.CounterVec
	kvWrites         *prometheus.CounterVec
	webhooks         *prometheus.CounterVec
	eventsSent       prometheus.Counter
	eventsParked     *prometheus.CounterVec
	apiErrors        *prometheus.CounterVec
	apiLatency       *prometheus.HistogramVec
	fullSyncs        *prometheus.CounterVec
	lastFullSync     prometheus.Gauge
	customersKnown   prometheus.Gauge
	messagesAcked    prometheus.Counter
	scheduledRefresh prometheus.Counter
}

// webhookTypes are the webhook types counted by name; others count as "other", so that
// a sender cannot grow the label set.
var webhookTypes = map[string]bool{
	"customer.created": true, "customer.updated": true, "customer.deleted": true,
	"subscription.created": true, "subscription.updated": true, "subscription.cancelled": true,
	"subscription.paused": true, "subscription.resumed": true, "subscription.renewed": true,
	"entitlement.created": true, "entitlement.updated": true, "entitlement.deleted": true,
	"feature.created": true, "feature.updated": true, "feature.deleted": true,
}

func newMetrics() *metrics {
	const ns, sub = "gatehouse", "flexprice"
	m := &metrics{reg: prometheus.NewRegistry()}
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
	}
	counterVec := func(name, help string, labels ...string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help}, labels)
	}
	gauge := func(name, help string) prometheus.Gauge {
		return prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
	}
	m.customersSynced = counter("customers_synced_total", "Customers whose entitlements were fetched and mapped.")
	m.syncErrors = counterVec("sync_errors_total", "Entitlement sync failures, by stage.", "stage")
	m.kvWrites = counterVec("kv_writes_total", "Writes to KV bucket gatehouse_entitlements, by operation (put, delete).", "op")
	m.webhooks = counterVec("webhooks_received_total", "Flexprice webhooks received, by event type.", "type")
	m.eventsSent = counter("events_sent_total", "Usage events Flexprice accepted (202).")
	m.eventsParked = counterVec("events_parked_total", "Usage events parked on the dead-letter stream, by reason.", "reason")
	m.apiErrors = counterVec("api_errors_total", "Flexprice API errors, by class (4xx, 5xx, timeout, transport, decode).", "class")
	m.apiLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub,
		Name: "api_request_duration_seconds", Help: "Flexprice API latency, by endpoint and status class.",
		Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 12)}, []string{"endpoint", "class"})
	m.fullSyncs = counterVec("full_syncs_total", "Full syncs, by result (ok, error).", "result")
	m.lastFullSync = gauge("last_full_sync_timestamp_seconds", "When the last successful full sync ended.")
	m.customersKnown = gauge("customers", "Customers the bridge keeps in KV.")
	m.messagesAcked = counter("usage_messages_acked_total", "Usage messages acknowledged after all their events were settled.")
	m.scheduledRefresh = counter("scheduled_refreshes_total", "Re-fetches run at an override's or a period's start or end.")
	m.reg.MustRegister(m.customersSynced, m.syncErrors, m.kvWrites, m.webhooks, m.eventsSent,
		m.eventsParked, m.apiErrors, m.apiLatency, m.fullSyncs, m.lastFullSync, m.customersKnown,
		m.messagesAcked, m.scheduledRefresh,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Export every known series from the start, so that rates and alerts see a 0.
	for _, l := range []string{"fetch", "kv", "invalid_data", "invalid_customer_id", "invalid_snapshot"} {
		m.syncErrors.WithLabelValues(l)
	}
	for _, l := range []string{"put", "delete"} {
		m.kvWrites.WithLabelValues(l)
	}
	for t := range webhookTypes {
		m.webhooks.WithLabelValues(t)
	}
	m.webhooks.WithLabelValues("other")
	for _, l := range []string{"decode", "unmapped_feature", "invalid", "rejected"} {
		m.eventsParked.WithLabelValues(l)
	}
	for _, l := range []string{"4xx", "5xx", "timeout", "transport", "decode"} {
		m.apiErrors.WithLabelValues(l)
	}
	for _, l := range []string{"ok", "error"} {
		m.fullSyncs.WithLabelValues(l)
	}
	return m
}

func (m *metrics) observe(endpoint string, start time.Time, class string) {
	if class == "" {
		class = "error"
	}
	m.apiLatency.WithLabelValues(endpoint, class).Observe(time.Since(start).Seconds())
}

func (m *metrics) webhook(typ string) {
	if !webhookTypes[typ] {
		typ = "other"
	}
	m.webhooks.WithLabelValues(typ).Inc()
}
