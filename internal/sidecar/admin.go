package sidecar

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"sort"
	"sync/atomic"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// Paths of the admin listener (admin_listen, loopback by default). It serves operators
// and probes, never clients: nothing here is on the request path.
const (
	HealthPath   = "/healthz"           // GET: 200 while the process serves
	ReadyPath    = "/readyz"            // GET: 200 once entitlements are in, else 503 and why
	MetricsPath  = "/metrics"           // GET: Prometheus text exposition of the sidecar's registry
	CustomerPath = "/v1/customers/{id}" // GET: entitlements, usage per window, snapshot revision and age
	ConfigPath   = "/v1/config"         // GET: the running configuration as YAML, secrets redacted
	ResyncPath   = "/v1/resync"         // POST: full resync of the replica
	StatusPath   = "/v1/status"         // GET: readiness, configuration origin, component stats
	PprofPath    = "/debug/pprof/"      // GET: Go's profiles (net/http/pprof), for performance work
)

// resyncTimeout bounds a full resync requested over the admin API.
const resyncTimeout = 2 * time.Minute

// Parts are the optional components that the admin listener reports on and the
// metrics read. A nil field is a component this sidecar does not run. Every func must
// answer from memory without blocking: they run on each scrape and admin request.
type Parts struct {
	Replica *ReplicaView
	Usage   *UsageView
	Leases  *LeaseView
}

// ReplicaView is the entitlement replica (sync/replica) as the admin listener sees it.
type ReplicaView struct {
	Stats  func() ReplicaStats
	Resync func(ctx context.Context) error // full resync; returns when it is done
}

// ReplicaStats describe the replica's position.
type ReplicaStats struct {
	Revision    uint64        `json:"revision"`     // KV revision of the last change applied
	Lag         uint64        `json:"lag"`          // changes on the server not applied yet; 0 when unknown
	Applied     uint64        `json:"applied"`      // snapshots applied since start
	Rejected    uint64        `json:"rejected"`     // snapshots rejected whole since start
	CaughtUp    bool          `json:"caught_up"`    // has caught up with the bucket at least once
	LastContact time.Time     `json:"last_contact"` // last word from NATS; zero: never
	Staleness   time.Duration `json:"-"`            // how far behind the control plane the replica may be
	Customers   int           `json:"customers"`    // customers in the replica
	Cached      int           `json:"cached"`       // customers decoded in memory
	Loads       uint64        `json:"loads"`        // Badger reads made by cache misses since start
}

// MarshalJSON writes Staleness in seconds and a LastContact that never happened as null.
func (s ReplicaStats) MarshalJSON() ([]byte, error) {
	type plain ReplicaStats
	out := struct {
		plain
		LastContact      *time.Time `json:"last_contact"`
		StalenessSeconds float64    `json:"staleness_seconds"`
	}{plain: plain(s), StalenessSeconds: s.Staleness.Seconds()}
	if !s.LastContact.IsZero() {
		out.LastContact = &s.LastContact
	}
	return json.Marshal(out)
}

// UsageView is the usage outbox (sync/usage).
type UsageView struct {
	Stats func() UsageStats
}

// UsageStats describe the usage outbox.
type UsageStats struct {
	OutboxBytes   int64  `json:"outbox_bytes"`   // committed usage not yet acknowledged by JetStream
	OutboxRecords int64  `json:"outbox_records"` // usage log records (one per admitted request with usage) not yet in a message
	LogFileBytes  int64  `json:"log_file_bytes"` // size of the usage log's segment files
	PublishErrors uint64 `json:"publish_errors"` // failed publish attempts since start
	AtBound       bool   `json:"at_bound"`       // the outbox reached usage.max_outbox_bytes and is folding
	Records       uint64 `json:"records"`        // usage records made durable since start
	BadgerWrites  uint64 `json:"badger_writes"`  // Badger write transactions of the usage recorder since start
	Published     uint64 `json:"published"`      // usage messages acknowledged by JetStream since start
	Unsettled     int64  `json:"unsettled"`      // acknowledged messages not yet settled into the counters
}

// LeaseView is the fleet quota (sync/quota).
type LeaseView struct {
	Stats func() LeaseStats
	// Held is the quota this sidecar holds for a counter; ok is false without a lease.
	Held func(k limiter.CounterKey) (units int64, ok bool)
	// Pending is the quota taken back from a counter's lease whose return the bucket
	// has not confirmed; nil when unknown.
	Pending func(k limiter.CounterKey) (units int64, ok bool)
}

// LeaseStats describe the leases this sidecar holds.
type LeaseStats struct {
	Refills      uint64 `json:"refills"`       // leases granted since start
	RefillErrors uint64 `json:"refill_errors"` // refills that failed since start
	Leases       int64  `json:"leases"`        // leases held now
	HeldUnits    int64  `json:"held_units"`    // quota held now, all leases together
}

// attach registers the metrics of the components in p (only those present) and hands
// them to the admin listener. Call it once, before Start.
func (s *Sidecar) attach(p Parts) error {
	var cs []prometheus.Collector
	if r := p.Replica; r != nil && r.Stats != nil {
		c := &statsCollector[ReplicaStats]{stats: r.Stats}
		c.gauge("gatehouse_replica_revision", "KV revision of the last entitlement change applied.", func(s *ReplicaStats) float64 { return float64(s.Revision) })
		c.gauge("gatehouse_replica_lag_revisions", "Entitlement changes on the server not applied yet (0 when unknown).", func(s *ReplicaStats) float64 { return float64(s.Lag) })
		c.gauge("gatehouse_replica_staleness_seconds", "How far behind the control plane the replica may be.", func(s *ReplicaStats) float64 { return s.Staleness.Seconds() })
		c.gauge("gatehouse_replica_last_contact_timestamp_seconds", "Last word from NATS, Unix seconds (0: never).", func(s *ReplicaStats) float64 { return unixSeconds(s.LastContact) })
		c.gauge("gatehouse_replica_caught_up", "1 once the replica has caught up with the bucket.", func(s *ReplicaStats) float64 { return boolFloat(s.CaughtUp) })
		c.counter("gatehouse_replica_applied_total", "Entitlement snapshots applied.", func(s *ReplicaStats) float64 { return float64(s.Applied) })
		c.gauge("gatehouse_replica_customers", "Customers in the replica.", func(s *ReplicaStats) float64 { return float64(s.Customers) })
		c.gauge("gatehouse_replica_cached_customers", "Customers decoded in memory (entitlements.cache_size bounds them).", func(s *ReplicaStats) float64 { return float64(s.Cached) })
		c.counter("gatehouse_replica_cache_loads_total", "Badger reads on the request path: customers not in memory, known or not.", func(s *ReplicaStats) float64 { return float64(s.Loads) })
		c.counter("gatehouse_replica_rejected_snapshots_total", "Entitlement snapshots rejected whole (bad JSON or invalid); the last good one stays.", func(s *ReplicaStats) float64 { return float64(s.Rejected) })
		cs = append(cs, c)
	}
	if u := p.Usage; u != nil && u.Stats != nil {
		c := &statsCollector[UsageStats]{stats: u.Stats}
		c.gauge("gatehouse_usage_outbox_bytes", "Committed usage not yet acknowledged by JetStream, in bytes.", func(s *UsageStats) float64 { return float64(s.OutboxBytes) })
		c.gauge("gatehouse_usage_outbox_records", "Usage log records (one per admitted request with usage) not yet in a published message.", func(s *UsageStats) float64 { return float64(s.OutboxRecords) })
		c.gauge("gatehouse_usage_log_file_bytes", "Size of the usage log's segment files on disk.", func(s *UsageStats) float64 { return float64(s.LogFileBytes) })
		c.gauge("gatehouse_usage_outbox_at_bound", "1 while the outbox is at usage.max_outbox_bytes and folds the log into per-key totals.", func(s *UsageStats) float64 { return boolFloat(s.AtBound) })
		c.counter("gatehouse_usage_publish_errors_total", "Failed attempts to publish usage to JetStream.", func(s *UsageStats) float64 { return float64(s.PublishErrors) })
		c.counter("gatehouse_usage_records_total", "Usage records made durable (one per metered feature of an admitted request).", func(s *UsageStats) float64 { return float64(s.Records) })
		c.counter("gatehouse_usage_badger_writes_total", "Badger write transactions of the usage recorder (message cuts, acknowledgements, settling into the counters); none per request.", func(s *UsageStats) float64 { return float64(s.BadgerWrites) })
		c.counter("gatehouse_usage_published_messages_total", "Usage messages acknowledged by JetStream.", func(s *UsageStats) float64 { return float64(s.Published) })
		c.gauge("gatehouse_usage_unsettled_messages", "Acknowledged usage messages not yet settled into the durable counters.", func(s *UsageStats) float64 { return float64(s.Unsettled) })
		cs = append(cs, c)
	}
	if l := p.Leases; l != nil && l.Stats != nil {
		c := &statsCollector[LeaseStats]{stats: l.Stats}
		c.counter("gatehouse_lease_refills_total", "Quota leases granted to this sidecar.", func(s *LeaseStats) float64 { return float64(s.Refills) })
		c.counter("gatehouse_lease_refill_errors_total", "Quota lease refills that failed.", func(s *LeaseStats) float64 { return float64(s.RefillErrors) })
		c.gauge("gatehouse_leases_held", "Quota leases this sidecar holds.", func(s *LeaseStats) float64 { return float64(s.Leases) })
		c.gauge("gatehouse_lease_held_quota", "Quota units this sidecar holds, all leases together.", func(s *LeaseStats) float64 { return float64(s.HeldUnits) })
		cs = append(cs, c)
	}
	for _, c := range cs {
		if err := s.Registry.Register(c); err != nil {
			return fmt.Errorf("register component metrics: %w", err)
		}
	}
	if s.admin != nil {
		s.admin.parts.Store(&p)
	}
	return nil
}

// statsCollector exports a component's figures, read with one call of its Stats
// function per scrape: the figures of a scrape then come from one moment, and a Stats
// that walks something (the quota's walks every lease) walks once, not once per figure.
type statsCollector[S any] struct {
	stats   func() S
	metrics []statMetric[S]
}

type statMetric[S any] struct {
	desc  *prometheus.Desc
	kind  prometheus.ValueType
	value func(*S) float64
}

func (c *statsCollector[S]) gauge(name, help string, f func(*S) float64) {
	c.metrics = append(c.metrics, statMetric[S]{prometheus.NewDesc(name, help, nil, nil), prometheus.GaugeValue, f})
}

func (c *statsCollector[S]) counter(name, help string, f func(*S) float64) {
	c.metrics = append(c.metrics, statMetric[S]{prometheus.NewDesc(name, help, nil, nil), prometheus.CounterValue, f})
}

func (c *statsCollector[S]) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics {
		ch <- m.desc
	}
}

func (c *statsCollector[S]) Collect(ch chan<- prometheus.Metric) {
	s := c.stats()
	for _, m := range c.metrics {
		ch <- prometheus.MustNewConstMetric(m.desc, m.kind, m.value(&s))
	}
}

func unixSeconds(t time.Time) float64 {
	if t.IsZero() {
		return 0
	}
	return float64(t.UnixNano()) / 1e9
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// adminServer serves the admin listener. It also holds the running configuration's
// origin (see reload.go), which only the admin API shows.
type adminServer struct {
	s         *Sidecar
	srv       *http.Server
	log       *zap.Logger
	parts     atomic.Pointer[Parts]
	conf      atomic.Pointer[configState]
	resyncing atomic.Bool // a resync runs; another is refused with 409
}

func newAdmin(s *Sidecar) *adminServer {
	a := &adminServer{s: s, log: s.log.Named("admin")}
	a.parts.Store(&Parts{})
	a.conf.Store(&configState{cfg: s.cfg, loadedAt: time.Now()})
	// The process's own health, for sizing and leak hunting.
	s.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+HealthPath, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET "+ReadyPath, a.readyz)
	mux.Handle("GET "+MetricsPath, promhttp.HandlerFor(s.Registry, promhttp.HandlerOpts{ErrorLog: zap.NewStdLog(a.log)}))
	mux.HandleFunc("GET "+CustomerPath, a.customer)
	mux.HandleFunc("GET "+ConfigPath, a.config)
	mux.HandleFunc("POST "+ResyncPath, a.resync)
	mux.HandleFunc("GET "+StatusPath, a.status)
	// Profiles cost nothing until asked for; the admin listener is loopback by default.
	mux.HandleFunc("GET "+PprofPath, pprof.Index)
	mux.HandleFunc("GET "+PprofPath+"cmdline", pprof.Cmdline)
	mux.HandleFunc("GET "+PprofPath+"profile", pprof.Profile)
	mux.HandleFunc("GET "+PprofPath+"symbol", pprof.Symbol)
	mux.HandleFunc("GET "+PprofPath+"trace", pprof.Trace)
	a.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ErrorLog: zap.NewStdLog(a.log)}
	return a
}

// readiness says whether the sidecar should get traffic, and if not, why.
func (a *adminServer) readiness() (bool, string) {
	if a.s.Source.Ready() {
		return true, ""
	}
	reason := "entitlements not synced yet: the replica has not caught up with the control plane"
	if r := a.parts.Load().Replica; r != nil && r.Stats != nil {
		st := r.Stats()
		contact := "never"
		if !st.LastContact.IsZero() {
			contact = time.Since(st.LastContact).Round(time.Millisecond).String() + " ago"
		}
		reason += fmt.Sprintf(" (revision %d, %d behind, last contact with NATS %s)", st.Revision, st.Lag, contact)
	}
	return false, reason
}

func (a *adminServer) readyz(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if ok, reason := a.readiness(); !ok {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintf(w, "not ready: %s\n", reason)
		return
	}
	w.Write([]byte("ready\n"))
}

// CustomerInfo is the answer of GET /v1/customers/{id}.
type CustomerInfo struct {
	CustomerID string `json:"customer_id"`
	// Snapshot is null when the customer has no snapshot (unknown or revoked) but
	// still has usage counters.
	Snapshot     *SnapshotInfo        `json:"snapshot"`
	Entitlements *limiter.SnapshotDoc `json:"entitlements"`
	Usage        []WindowUsage        `json:"usage"`
}

// SnapshotInfo says which snapshot is in force.
type SnapshotInfo struct {
	Revision   uint64     `json:"revision"`    // KV revision; 0 when read from a file
	UpdatedAt  *time.Time `json:"updated_at"`  // as the control plane stamped it
	AgeSeconds *float64   `json:"age_seconds"` // since updated_at
}

// WindowUsage is one usage counter: one feature in one window.
type WindowUsage struct {
	Feature     string     `json:"feature"`
	WindowStart time.Time  `json:"window_start"`
	WindowEnd   *time.Time `json:"window_end"` // null: the window never ends
	Current     bool       `json:"current"`    // the window that holds now
	Committed   int64      `json:"committed"`  // usage served
	Held        int64      `json:"held"`       // committed plus reserved by requests in flight
	Limit       *int64     `json:"limit"`      // the snapshot's limit; null when unlimited or not entitled
	SoftLimit   bool       `json:"soft_limit"`
	Remaining   *int64     `json:"remaining"` // limit - held, at least 0; null when unlimited
	Lease       *LeaseHeld `json:"lease"`     // null until fleet leases hold quota for it
}

// LeaseHeld is the fleet quota this sidecar holds for a counter.
type LeaseHeld struct {
	Units int64 `json:"units"`
	// Pending are units on their way back to the fleet: taken from the lease, their
	// return not confirmed by the bucket yet (in flight, or failed and to be retried).
	// No sidecar can use them meanwhile.
	Pending int64 `json:"pending"`
}

func (a *adminServer) customer(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := limiter.CheckCustomerID(id); err != nil {
		writeProblem(w, http.StatusBadRequest, "customer_id_invalid", "customer id: "+err.Error())
		return
	}
	info := CustomerInfo{CustomerID: id, Usage: []WindowUsage{}}
	now := time.Now()
	snap := a.s.Source.Customer([]byte(id))
	if snap != nil {
		doc := snap.Doc()
		info.Entitlements = &doc
		si := &SnapshotInfo{Revision: snap.Revision}
		if !snap.UpdatedAt.IsZero() {
			at, age := snap.UpdatedAt, now.Sub(snap.UpdatedAt).Seconds()
			si.UpdatedAt, si.AgeSeconds = &at, &age
		}
		info.Snapshot = si
	}
	// Collect first: the callback runs under a shard lock, and the lease view is
	// another component's code.
	var counters []*limiter.Counter
	a.s.Limiter.Counters(id, func(c *limiter.Counter) { counters = append(counters, c) })
	leases := a.parts.Load().Leases
	for _, c := range counters {
		u := WindowUsage{Feature: c.Key.Feature, WindowStart: time.Unix(0, c.Key.WindowStart).UTC(),
			Committed: c.Committed(), Held: c.Held()}
		u.Current = now.UnixNano() >= c.Key.WindowStart && (c.End == limiter.NeverEnds || now.UnixNano() < c.End)
		if c.End != limiter.NeverEnds {
			end := time.Unix(0, c.End).UTC()
			u.WindowEnd = &end
		}
		if snap != nil {
			if f := snap.Features[c.Key.Feature]; f != nil && f.Type == limiter.Metered && !f.Unlimited {
				limit, left := f.Limit, max(f.Limit-u.Held, 0)
				u.Limit, u.Remaining, u.SoftLimit = &limit, &left, f.Soft
			}
		}
		if leases != nil && leases.Held != nil {
			if units, ok := leases.Held(c.Key); ok {
				u.Lease = &LeaseHeld{Units: units}
				if leases.Pending != nil {
					u.Lease.Pending, _ = leases.Pending(c.Key)
				}
			}
		}
		info.Usage = append(info.Usage, u)
	}
	if snap == nil && len(info.Usage) == 0 {
		writeProblem(w, http.StatusNotFound, "customer_unknown", "no entitlements and no usage are known for customer "+id)
		return
	}
	sort.Slice(info.Usage, func(i, j int) bool {
		ui, uj := &info.Usage[i], &info.Usage[j]
		if ui.Feature != uj.Feature {
			return ui.Feature < uj.Feature
		}
		return ui.WindowStart.Before(uj.WindowStart)
	})
	writeJSON(w, http.StatusOK, info)
}

func (a *adminServer) config(w http.ResponseWriter, _ *http.Request) {
	st := a.conf.Load()
	body, err := redactedYAML(st.cfg)
	if err != nil {
		writeProblem(w, http.StatusInternalServerError, "config_unavailable", err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/yaml; charset=utf-8")
	if st.file != "" {
		w.Header().Set("X-Gatehouse-Config-File", st.file)
		w.Header().Set("X-Gatehouse-Config-Sha256", fmt.Sprintf("%x", st.sum))
	}
	w.Write(body)
}

func (a *adminServer) resync(w http.ResponseWriter, r *http.Request) {
	rep := a.parts.Load().Replica
	if rep == nil || rep.Resync == nil {
		writeProblem(w, http.StatusNotImplemented, "no_replica",
			"this sidecar has no entitlement replica: its entitlements came from entitlements.file or were given at start, so there is nothing to resync")
		return
	}
	if !a.resyncing.CompareAndSwap(false, true) {
		writeProblem(w, http.StatusConflict, "resync_running", "a resync is already running; try again when it has finished")
		return
	}
	defer a.resyncing.Store(false)
	ctx, cancel := context.WithTimeout(r.Context(), resyncTimeout)
	defer cancel()
	start := time.Now()
	a.log.Info("full resync requested", zap.String("from", r.RemoteAddr))
	if err := rep.Resync(ctx); err != nil {
		a.log.Error("full resync failed", zap.Error(err))
		writeProblem(w, http.StatusServiceUnavailable, "resync_failed", "resync failed: "+err.Error())
		return
	}
	out := struct {
		Resynced    bool          `json:"resynced"`
		TookSeconds float64       `json:"took_seconds"`
		Replica     *ReplicaStats `json:"replica,omitempty"`
	}{Resynced: true, TookSeconds: time.Since(start).Seconds()}
	if rep.Stats != nil {
		st := rep.Stats()
		out.Replica = &st
	}
	writeJSON(w, http.StatusOK, out)
}

// Status is the answer of GET /v1/status. A component the sidecar does not run is null.
type Status struct {
	Ready   bool          `json:"ready"`
	Reason  string        `json:"reason,omitempty"`
	Config  ConfigStatus  `json:"config"`
	Replica *ReplicaStats `json:"replica"`
	Usage   *UsageStats   `json:"usage"`
	Leases  *LeaseStats   `json:"leases"`
}

// ConfigStatus says where the running configuration came from.
type ConfigStatus struct {
	File        string     `json:"file,omitempty"`   // empty until a file was loaded or watched
	SHA256      string     `json:"sha256,omitempty"` // of the file's content
	LoadedAt    time.Time  `json:"loaded_at"`
	Routes      int        `json:"routes"`
	LastError   string     `json:"last_error,omitempty"` // the last failed reload, kept until one succeeds
	LastErrorAt *time.Time `json:"last_error_at,omitempty"`
}

func (a *adminServer) status(w http.ResponseWriter, _ *http.Request) {
	var out Status
	out.Ready, out.Reason = a.readiness()
	c := a.conf.Load()
	out.Config = ConfigStatus{File: c.file, LoadedAt: c.loadedAt, Routes: len(c.cfg.Routes), LastError: c.lastErr}
	if c.file != "" {
		out.Config.SHA256 = fmt.Sprintf("%x", c.sum)
	}
	if !c.lastErrAt.IsZero() {
		at := c.lastErrAt
		out.Config.LastErrorAt = &at
	}
	p := a.parts.Load()
	if p.Replica != nil && p.Replica.Stats != nil {
		st := p.Replica.Stats()
		out.Replica = &st
	}
	if p.Usage != nil && p.Usage.Stats != nil {
		st := p.Usage.Stats()
		out.Usage = &st
	}
	if p.Leases != nil && p.Leases.Stats != nil {
		st := p.Leases.Stats()
		out.Leases = &st
	}
	writeJSON(w, http.StatusOK, out)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		writeProblem(w, http.StatusInternalServerError, "encode_failed", err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}

// writeProblem answers with an application/problem+json body (RFC 9457).
func writeProblem(w http.ResponseWriter, status int, reason, detail string) {
	body, _ := json.Marshal(map[string]any{
		"type": "urn:gatehouse:problem:" + reason, "title": http.StatusText(status),
		"status": status, "detail": detail, "reason": reason,
	})
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	w.Write(append(body, '\n'))
}

func (a *adminServer) serve(ln net.Listener) error {
	err := a.srv.Serve(ln)
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return err
}

func (a *adminServer) shutdown(ctx context.Context) error { return a.srv.Shutdown(ctx) }
