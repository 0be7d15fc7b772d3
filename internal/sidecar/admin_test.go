package sidecar

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/echo"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"
)

// admConfig is a sidecar on loopback ports in front of UPSTREAM.
const admConfig = `
listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
upstream: {url: "http://UPSTREAM", timeout: 5s}
data_dir: DATADIR
unmatched: deny
routes:
  - name: hello
    method: GET
    path: /v1/hello
    features: [{feature: api_calls, cost: 1}]
    headers: {X-Support-Tier: support_tier}
  - name: reports
    method: POST
    path: /v1/reports
    features: [{feature: reports, cost: 1}]
  - name: exports
    path: /v1/exports
    features: [{feature: exports, cost: 2}]
  - name: shadowed
    path: /v1/shadow/**
    features: [{feature: reports, cost: 1}]
    shadow: true
`

const admSnapshots = `[
 {"customer_id": "acme", "updated_at": "2026-01-02T03:04:05Z",
  "billing": {"period_start": "2026-11-05T00:00:00Z", "interval": "MONTHLY", "timezone": "UTC"},
  "features": {
   "api_calls": {"type": "metered", "usage_limit": 1000, "usage_reset_period": "MONTHLY"},
   "reports": {"type": "metered", "usage_limit": 3, "usage_reset_period": "DAILY"},
   "exports": {"type": "metered", "usage_limit": 2, "is_soft_limit": true, "usage_reset_period": "NEVER"},
   "support_tier": {"type": "static", "static_values": ["24/7"]}}},
 {"customer_id": "globex", "features": {"api_calls": {"type": "metered"},
   "support_tier": {"type": "static", "static_values": ["business"]}}}
]`

// admSidecar is a running sidecar with its addresses.
type admSidecar struct {
	*Sidecar
	proxyURL, adminURL string
	client             *fasthttp.HostClient
	dir                string
}

// startAdmSidecar starts a sidecar from cfgYAML (UPSTREAM and DATADIR filled in) with
// the snapshots above; the configuration file is written to dir/gatehouse.yaml.
func startAdmSidecar(t testing.TB, cfgYAML string, log *zap.Logger) *admSidecar {
	t.Helper()
	dir := t.TempDir()
	cfg := writeAdmConfig(t, dir, cfgYAML)
	snaps, err := limiter.ParseSnapshots(strings.NewReader(admSnapshots))
	if err != nil {
		t.Fatal(err)
	}
	if log == nil {
		log = zap.NewNop()
	}
	s, err := New(Options{Config: cfg, Log: log, Snapshots: snaps, Standalone: true})
	if err != nil {
		t.Fatal(err)
	}
	s.Proxy.Metrics().TimeEvery = 1
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return &admSidecar{Sidecar: s, dir: dir, proxyURL: "http://" + s.Addr().String(), adminURL: "http://" + s.AdminAddr().String(),
		client: &fasthttp.HostClient{Addr: s.Addr().String(), MaxConns: 64}}
}

// writeAdmConfig writes cfgYAML (UPSTREAM and DATADIR filled in, DATADIR under dir) to
// dir/gatehouse.yaml and loads it.
func writeAdmConfig(t testing.TB, dir, cfgYAML string) *config.Config {
	t.Helper()
	cfgYAML = strings.NewReplacer("UPSTREAM", testutil.Echo(t), "DATADIR", filepath.Join(dir, "data")).Replace(cfgYAML)
	path := filepath.Join(dir, "gatehouse.yaml")
	if err := os.WriteFile(path, []byte(cfgYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func (a *admSidecar) configPath() string { return filepath.Join(a.dir, "gatehouse.yaml") }

// do sends a request through the proxy and returns the status and the echo reply (when
// the upstream answered).
func (a *admSidecar) do(t testing.TB, method, target string, headers ...string) (int, *echo.Reply) {
	t.Helper()
	req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
	defer fasthttp.ReleaseRequest(req)
	defer fasthttp.ReleaseResponse(resp)
	req.Header.SetMethod(method)
	req.SetRequestURI(a.proxyURL + target)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	if err := a.client.DoTimeout(req, resp, 5*time.Second); err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	var r echo.Reply
	if string(resp.Header.ContentType()) != "application/json" || json.Unmarshal(resp.Body(), &r) != nil {
		return resp.StatusCode(), nil
	}
	return resp.StatusCode(), &r
}

// admin sends a request to the admin listener and returns status, content type and body.
func (a *admSidecar) admin(t testing.TB, method, path string) (int, string, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, a.adminURL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header.Get("Content-Type"), body
}

func (a *admSidecar) adminJSON(t testing.TB, method, path string, wantStatus int, v any) {
	t.Helper()
	status, ct, body := a.admin(t, method, path)
	if status != wantStatus {
		t.Fatalf("%s %s: %d %s, want %d", method, path, status, body, wantStatus)
	}
	if !strings.Contains(ct, "json") {
		t.Fatalf("%s %s: content type %q", method, path, ct)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("%s %s: %v in %s", method, path, err, body)
	}
}

// scrape GETs /metrics from the admin listener and parses the exposition.
func (a *admSidecar) scrape(t testing.TB) map[string]*dto.MetricFamily {
	t.Helper()
	status, _, body := a.admin(t, "GET", MetricsPath)
	if status != 200 {
		t.Fatalf("GET /metrics: %d", status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse exposition: %v", err)
	}
	return mfs
}

// metric is the value of the series of family name that has exactly the given labels
// among its own (counter, gauge, or a histogram's count); -1 when there is none.
func metric(mfs map[string]*dto.MetricFamily, name string, labels ...string) float64 {
series:
	for _, m := range mfs[name].GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				found = found || lp.GetName() == labels[i] && lp.GetValue() == labels[i+1]
			}
			if !found {
				continue series
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	return -1
}

func TestHealthAndReady(t *testing.T) {
	a := startAdmSidecar(t, admConfig, nil)
	if status, _, body := a.admin(t, "GET", HealthPath); status != 200 || string(body) != "ok\n" {
		t.Errorf("healthz: %d %q", status, body)
	}
	if status, _, body := a.admin(t, "GET", ReadyPath); status != 200 || string(body) != "ready\n" {
		t.Errorf("readyz: %d %q", status, body)
	}
	src := a.Source.(*limiter.MemorySource)
	src.SetReady(false)
	status, _, body := a.admin(t, "GET", ReadyPath)
	if status != 503 || !strings.HasPrefix(string(body), "not ready: entitlements not synced yet") {
		t.Errorf("readyz while unsynced: %d %q", status, body)
	}
	rep := &fakeReplica{}
	rep.stats.Store(&ReplicaStats{Revision: 7, Lag: 3})
	if err := a.attach(Parts{Replica: rep.view()}); err != nil {
		t.Fatal(err)
	}
	if _, _, body := a.admin(t, "GET", ReadyPath); !strings.Contains(string(body), "(revision 7, 3 behind, last contact with NATS never)") {
		t.Errorf("readyz reason %q does not describe the replica", body)
	}
	src.SetReady(true)
	if status, _, _ := a.admin(t, "GET", ReadyPath); status != 200 {
		t.Errorf("readyz once synced: %d", status)
	}
	if status, _, _ := a.admin(t, "POST", HealthPath); status != http.StatusMethodNotAllowed {
		t.Errorf("POST /healthz: %d", status)
	}
}

func TestCustomerIntrospection(t *testing.T) {
	a := startAdmSidecar(t, admConfig, nil)
	for i := 0; i < 2; i++ {
		a.do(t, "GET", "/v1/hello", "X-Customer-Id", "acme")
		a.do(t, "POST", "/v1/reports", "X-Customer-Id", "acme")
	}
	for i := 0; i < 2; i++ {
		a.do(t, "GET", "/v1/exports", "X-Customer-Id", "acme") // soft: 4 of 2
	}
	var info CustomerInfo
	a.adminJSON(t, "GET", "/v1/customers/acme", 200, &info)
	if info.CustomerID != "acme" || info.Snapshot == nil || info.Snapshot.Revision != 0 || info.Snapshot.UpdatedAt == nil ||
		info.Snapshot.AgeSeconds == nil || *info.Snapshot.AgeSeconds <= 0 {
		t.Errorf("snapshot %+v", info.Snapshot)
	}
	if e := info.Entitlements; e == nil || e.Features["reports"].UsageLimit == nil || *e.Features["reports"].UsageLimit != 3 ||
		e.Features["support_tier"].StaticValues[0] != "24/7" {
		t.Errorf("entitlements %+v", info.Entitlements)
	}
	now := time.Now().UTC()
	day := time.Date(now.Year(), now.Month(), now.Day(), 0, 0, 0, 0, time.UTC)
	want := map[string]struct {
		committed, limit, remaining int64
		start                       time.Time
		end                         *time.Time
		soft                        bool
	}{
		"api_calls": {2, 1000, 998, monthStart(now), ptr(monthStart(now).AddDate(0, 1, 0)), false},
		"reports":   {2, 3, 1, day, ptr(day.AddDate(0, 0, 1)), false},
		"exports":   {4, 2, 0, time.Date(2026, 11, 5, 0, 0, 0, 0, time.UTC), nil, true},
	}
	if len(info.Usage) != len(want) {
		t.Fatalf("usage %+v, want %d windows", info.Usage, len(want))
	}
	for _, u := range info.Usage {
		w := want[u.Feature]
		if u.Committed != w.committed || u.Held != w.committed || u.Limit == nil || *u.Limit != w.limit ||
			u.Remaining == nil || *u.Remaining != w.remaining || u.SoftLimit != w.soft || !u.Current || u.Lease != nil ||
			!u.WindowStart.Equal(w.start) || (w.end == nil) != (u.WindowEnd == nil) || w.end != nil && !u.WindowEnd.Equal(*w.end) {
			t.Errorf("%s: %+v, want %+v", u.Feature, u, w)
		}
	}
	// A lease view adds what the fleet granted, and what is on its way back.
	err := a.attach(Parts{Leases: &LeaseView{
		Held:    func(k limiter.CounterKey) (int64, bool) { return 40, k.Feature == "reports" },
		Pending: func(k limiter.CounterKey) (int64, bool) { return 9, k.Feature == "reports" },
	}})
	if err != nil {
		t.Fatal(err)
	}
	a.adminJSON(t, "GET", "/v1/customers/acme", 200, &info)
	for _, u := range info.Usage {
		if (u.Feature == "reports") != (u.Lease != nil) || u.Lease != nil && (u.Lease.Units != 40 || u.Lease.Pending != 9) {
			t.Errorf("%s: lease %+v", u.Feature, u.Lease)
		}
	}
	// Unlimited: no limit, no remaining.
	a.do(t, "GET", "/v1/hello", "X-Customer-Id", "globex")
	a.adminJSON(t, "GET", "/v1/customers/globex", 200, &info)
	if len(info.Usage) != 1 || info.Usage[0].Limit != nil || info.Usage[0].Remaining != nil || info.Snapshot.UpdatedAt != nil {
		t.Errorf("globex %+v", info)
	}
	// Revoked, with counters left: usage without entitlements.
	a.Source.(*limiter.MemorySource).Delete("globex")
	a.adminJSON(t, "GET", "/v1/customers/globex", 200, &info)
	if info.Snapshot != nil || info.Entitlements != nil || len(info.Usage) != 1 {
		t.Errorf("revoked globex %+v", info)
	}
	var prob struct{ Reason string }
	a.adminJSON(t, "GET", "/v1/customers/nobody", 404, &prob)
	if prob.Reason != "customer_unknown" {
		t.Errorf("unknown customer: %+v", prob)
	}
	a.adminJSON(t, "GET", "/v1/customers/a%20b", 400, &prob)
}

func monthStart(t time.Time) time.Time {
	// acme's billing anchor is the 5th at midnight UTC.
	m := time.Date(t.Year(), t.Month(), 5, 0, 0, 0, 0, time.UTC)
	if t.Before(m) {
		m = m.AddDate(0, -1, 0)
	}
	return m
}

func ptr[T any](v T) *T { return &v }

// fakeReplica stands in for sync/replica, which is not assembled here yet.
type fakeReplica struct {
	stats   atomic.Pointer[ReplicaStats]
	release chan struct{} // when set, Resync waits for it
	fail    error
	resyncs atomic.Int32
}

func (f *fakeReplica) view() *ReplicaView {
	return &ReplicaView{
		Stats: func() ReplicaStats { return *f.stats.Load() },
		Resync: func(ctx context.Context) error {
			f.resyncs.Add(1)
			if f.release != nil {
				select {
				case <-f.release:
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			return f.fail
		},
	}
}

func TestResync(t *testing.T) {
	a := startAdmSidecar(t, admConfig, nil)
	var prob struct{ Reason, Detail string }
	a.adminJSON(t, "POST", ResyncPath, http.StatusNotImplemented, &prob)
	if prob.Reason != "no_replica" || !strings.Contains(prob.Detail, "nothing to resync") {
		t.Errorf("without a replica: %+v", prob)
	}
	if status, _, _ := a.admin(t, "GET", ResyncPath); status != http.StatusMethodNotAllowed {
		t.Errorf("GET /v1/resync: %d", status)
	}

	rep := &fakeReplica{release: make(chan struct{})}
	rep.stats.Store(&ReplicaStats{Revision: 42, CaughtUp: true})
	if err := a.attach(Parts{Replica: rep.view()}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	var first struct {
		Resynced bool
		Replica  ReplicaStats
	}
	go func() {
		defer wg.Done()
		a.adminJSON(t, "POST", ResyncPath, 200, &first)
	}()
	for rep.resyncs.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	a.adminJSON(t, "POST", ResyncPath, http.StatusConflict, &prob)
	if prob.Reason != "resync_running" {
		t.Errorf("second resync: %+v", prob)
	}
	close(rep.release)
	wg.Wait()
	if !first.Resynced || first.Replica.Revision != 42 {
		t.Errorf("resync answer %+v", first)
	}
	rep.fail = errors.New("nats: no servers available")
	a.adminJSON(t, "POST", ResyncPath, http.StatusServiceUnavailable, &prob)
	if prob.Reason != "resync_failed" || !strings.Contains(prob.Detail, "no servers available") {
		t.Errorf("failed resync: %+v", prob)
	}
	if n := rep.resyncs.Load(); n != 2 {
		t.Errorf("%d resyncs ran, want 2", n)
	}
}

func TestStatus(t *testing.T) {
	a := startAdmSidecar(t, admConfig, nil)
	var st Status
	a.adminJSON(t, "GET", StatusPath, 200, &st)
	if !st.Ready || st.Replica != nil || st.Usage != nil || st.Leases != nil || st.Config.Routes != 4 || st.Config.File != "" {
		t.Errorf("status without components %+v", st)
	}
	rep := &fakeReplica{}
	rep.stats.Store(&ReplicaStats{Revision: 9, Applied: 12, CaughtUp: true})
	err := a.attach(Parts{Replica: rep.view(),
		Usage:  &UsageView{Stats: func() UsageStats { return UsageStats{OutboxBytes: 512, OutboxRecords: 2} }},
		Leases: &LeaseView{Stats: func() LeaseStats { return LeaseStats{Refills: 3, Leases: 1, HeldUnits: 50} }}})
	if err != nil {
		t.Fatal(err)
	}
	a.adminJSON(t, "GET", StatusPath, 200, &st)
	if st.Replica == nil || st.Replica.Applied != 12 || st.Usage == nil || st.Usage.OutboxBytes != 512 || st.Leases == nil || st.Leases.HeldUnits != 50 {
		t.Errorf("status with components %+v", st)
	}
	rep.stats.Store(&ReplicaStats{Revision: 9, Staleness: 2500 * time.Millisecond, LastContact: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)})
	var raw struct{ Replica map[string]any }
	a.adminJSON(t, "GET", StatusPath, 200, &raw)
	if r := raw.Replica; r["staleness_seconds"] != 2.5 || r["last_contact"] != "2026-01-02T03:04:05Z" || r["revision"] != 9.0 {
		t.Errorf("replica as JSON: %v", r)
	}
	rep.stats.Store(&ReplicaStats{})
	a.adminJSON(t, "GET", StatusPath, 200, &raw)
	if v, ok := raw.Replica["last_contact"]; !ok || v != nil {
		t.Errorf("a replica that never heard from NATS: last_contact %v", v)
	}
}

// TestMetricsEndpoint scrapes the admin listener and checks that every family the
// sidecar exports is there and moves as it should: the request path's, the
// components' (through their Stats, so never counted twice), and the process's.
func TestMetricsEndpoint(t *testing.T) {
	a := startAdmSidecar(t, admConfig, nil)
	mfs := a.scrape(t)
	for _, name := range []string{"gatehouse_replica_revision", "gatehouse_usage_outbox_bytes", "gatehouse_lease_refills_total"} {
		if mfs[name] != nil {
			t.Errorf("%s exported before its component exists", name)
		}
	}
	a.do(t, "GET", "/v1/hello", "X-Customer-Id", "acme")
	a.do(t, "GET", "/v1/hello")
	mfs = a.scrape(t)
	checks := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"gatehouse_decisions_total", []string{"route", "hello", "result", "allow", "reason", "ok"}, 1},
		{"gatehouse_decisions_total", []string{"route", "hello", "result", "deny", "reason", "customer_missing"}, 1},
		{"gatehouse_decision_seconds", nil, 2},
		{"gatehouse_upstream_responses_total", []string{"class", "2xx"}, 1},
		{"gatehouse_upstream_seconds", nil, 1},
		{"gatehouse_config_reloads_total", []string{"result", "success"}, 0},
		{"gatehouse_config_last_reload_successful", nil, 1},
		{"gatehouse_checks_total", []string{"endpoint", "envoy", "result", "allow"}, 0},
		{"gatehouse_protocol_errors_total", nil, -1}, // no series until the first
		{"gatehouse_usage_write_errors_total", nil, 0},
	}
	for _, c := range checks {
		if got := metric(mfs, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	for _, name := range []string{"go_goroutines", "process_resident_memory_bytes", "process_cpu_seconds_total"} {
		if mfs[name] == nil {
			t.Errorf("%s missing", name)
		}
	}

	rep := &fakeReplica{}
	rep.stats.Store(&ReplicaStats{Revision: 5, Lag: 2, Applied: 10, Rejected: 1, Staleness: 1500 * time.Millisecond,
		LastContact: time.Unix(1_800_000_000, 0), Customers: 40, Cached: 30, Loads: 31})
	var usage atomic.Pointer[UsageStats]
	usage.Store(&UsageStats{OutboxBytes: 4096, OutboxRecords: 3, LogFileBytes: 8 << 20, PublishErrors: 1})
	var leases atomic.Pointer[LeaseStats]
	leases.Store(&LeaseStats{Refills: 4, RefillErrors: 1, Leases: 2, HeldUnits: 150})
	var usageCalls, leaseCalls atomic.Int64 // a scrape reads each component's Stats once
	err := a.attach(Parts{Replica: rep.view(),
		Usage:  &UsageView{Stats: func() UsageStats { usageCalls.Add(1); return *usage.Load() }},
		Leases: &LeaseView{Stats: func() LeaseStats { leaseCalls.Add(1); return *leases.Load() }}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.attach(Parts{Replica: rep.view()}); err == nil {
		t.Error("attaching a second replica registered its metrics twice")
	}
	components := func(want map[string]float64) {
		t.Helper()
		u0, l0 := usageCalls.Load(), leaseCalls.Load()
		mfs := a.scrape(t)
		if u, l := usageCalls.Load()-u0, leaseCalls.Load()-l0; u != 1 || l != 1 {
			t.Errorf("a scrape read the usage stats %d times and the lease stats %d times, want once each", u, l)
		}
		for name, w := range want {
			if got := metric(mfs, name); got != w {
				t.Errorf("%s = %v, want %v", name, got, w)
			}
		}
	}
	components(map[string]float64{
		"gatehouse_replica_revision": 5, "gatehouse_replica_lag_revisions": 2, "gatehouse_replica_applied_total": 10,
		"gatehouse_replica_rejected_snapshots_total": 1, "gatehouse_replica_staleness_seconds": 1.5,
		"gatehouse_replica_last_contact_timestamp_seconds": 1.8e9, "gatehouse_replica_caught_up": 0,
		"gatehouse_replica_customers": 40, "gatehouse_replica_cached_customers": 30, "gatehouse_replica_cache_loads_total": 31,
		"gatehouse_usage_outbox_bytes": 4096, "gatehouse_usage_outbox_records": 3, "gatehouse_usage_log_file_bytes": 8 << 20, "gatehouse_usage_publish_errors_total": 1,
		"gatehouse_usage_outbox_at_bound": 0,
		"gatehouse_lease_refills_total":   4, "gatehouse_lease_refill_errors_total": 1, "gatehouse_leases_held": 2,
		"gatehouse_lease_held_quota": 150,
	})
	rep.stats.Store(&ReplicaStats{Revision: 8, Applied: 13, Rejected: 2, CaughtUp: true})
	usage.Store(&UsageStats{PublishErrors: 3, AtBound: true, Records: 900, BadgerWrites: 40, Published: 7, Unsettled: 1})
	leases.Store(&LeaseStats{Refills: 6, HeldUnits: 20})
	components(map[string]float64{
		"gatehouse_replica_revision": 8, "gatehouse_replica_lag_revisions": 0, "gatehouse_replica_applied_total": 13,
		"gatehouse_replica_rejected_snapshots_total": 2, "gatehouse_replica_caught_up": 1,
		"gatehouse_replica_last_contact_timestamp_seconds": 0,
		"gatehouse_usage_outbox_bytes":                     0, "gatehouse_usage_publish_errors_total": 3, "gatehouse_usage_outbox_at_bound": 1,
		"gatehouse_usage_records_total": 900, "gatehouse_usage_badger_writes_total": 40, "gatehouse_usage_published_messages_total": 7,
		"gatehouse_usage_unsettled_messages": 1,
		"gatehouse_lease_refills_total":      6, "gatehouse_lease_held_quota": 20, "gatehouse_leases_held": 0,
	})
}

// TestShadowEndToEnd: a shadow route, and then the whole sidecar in shadow mode,
// decide and count as they would, and never refuse.
func TestShadowEndToEnd(t *testing.T) {
	a := startAdmSidecar(t, admConfig, nil)
	for i := 0; i < 5; i++ {
		if status, r := a.do(t, "GET", "/v1/shadow/x", "X-Customer-Id", "acme"); status != 200 || r == nil || r.Headers["X-Customer-Id"] != "acme" {
			t.Fatalf("shadow request %d: %d %+v", i, status, r)
		}
	}
	mfs := a.scrape(t)
	if got := metric(mfs, "gatehouse_decisions_total", "route", "shadowed", "result", "shadow_deny", "reason", "usage_limit_exceeded", "feature", "reports"); got != 2 {
		t.Errorf("shadow_deny = %v, want 2", got)
	}
	if got := metric(mfs, "gatehouse_decisions_total", "route", "shadowed", "result", "allow"); got != 3 {
		t.Errorf("allow = %v, want 3", got)
	}
	var info CustomerInfo
	a.adminJSON(t, "GET", "/v1/customers/acme", 200, &info)
	for _, u := range info.Usage {
		if u.Feature == "reports" && (u.Committed != 5 || *u.Remaining != 0) {
			t.Errorf("reports usage %+v: shadow counts what it admits", u)
		}
	}
	// The route that is not in shadow refuses, until the whole sidecar is.
	if status, _ := a.do(t, "POST", "/v1/reports", "X-Customer-Id", "acme"); status != 429 {
		t.Errorf("reports over the limit: %d, want 429", status)
	}
	data, _ := os.ReadFile(a.configPath())
	if err := os.WriteFile(a.configPath(), append(data, "shadow: true\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := a.ReloadFile(a.configPath()); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		method, path, customer, reason string
	}{
		{"POST", "/v1/reports", "acme", "usage_limit_exceeded"},
		{"GET", "/v1/hello", "", "customer_missing"},
		{"GET", "/v1/hello", "nobody", "customer_unknown"},
		{"DELETE", "/nowhere", "acme", "route_not_allowed"},
	} {
		status, r := a.do(t, c.method, c.path, "X-Customer-Id", c.customer)
		if status != 200 || r == nil {
			t.Errorf("%s %s as %q in global shadow: %d", c.method, c.path, c.customer, status)
		}
		if got := metric(a.scrape(t), "gatehouse_decisions_total", "result", "shadow_deny", "reason", c.reason); got < 1 {
			t.Errorf("%s %s: no shadow_deny for %s", c.method, c.path, c.reason)
		}
	}
}

// The admin listener serves Go's profiles.
func TestPprof(t *testing.T) {
	a := startAdmSidecar(t, admConfig, nil)
	for _, path := range []string{PprofPath, PprofPath + "heap?debug=1", PprofPath + "goroutine?debug=1"} {
		status, _, body := a.admin(t, "GET", path)
		if status != 200 || len(body) == 0 {
			t.Errorf("GET %s: %d, %d bytes", path, status, len(body))
		}
	}
	if status, _, body := a.admin(t, "GET", PprofPath+"heap?debug=1"); status != 200 || !strings.Contains(string(body), "heap profile") {
		t.Errorf("heap profile: %d %.80q", status, body)
	}
}

// TestStartFailsCleanly: a sidecar that cannot start (its proxy port, or its embedded
// NATS port, taken) returns an error that names the address, without panicking, and
// closes what it opened: the same data directory starts afterwards.
func TestStartFailsCleanly(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	addr := taken.Addr().String()
	dir := t.TempDir()
	load := func(extra string) *config.Config { return writeAdmConfig(t, dir, admConfig+extra) }
	free := testutil.FreeAddr(t)
	for _, c := range []struct{ name, extra string }{
		{"proxy port", "nats: {embedded_listen: \"" + free + "\"}\n"},
		{"embedded NATS port", "nats: {embedded_listen: \"" + addr + "\"}\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := load(c.extra)
			if c.name == "proxy port" {
				cfg.Listen = addr
			}
			s, err := New(Options{Config: cfg, Log: zap.NewNop()})
			if err == nil {
				_ = s.Close(context.Background())
				t.Fatal("started on a taken port")
			}
			if s != nil {
				t.Errorf("New returned a sidecar with its error %v", err)
			}
			if !strings.Contains(err.Error(), addr[strings.LastIndexByte(addr, ':'):]) {
				t.Errorf("error does not name the port of %s: %v", addr, err)
			}
		})
	}
	// Everything the failed starts opened is closed: the data directory opens again.
	cfg := load("nats: {embedded_listen: \"" + testutil.FreeAddr(t) + "\"}\n")
	s, err := New(Options{Config: cfg, Log: zap.NewNop()})
	if err != nil {
		t.Fatalf("start after the failed ones: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
}
