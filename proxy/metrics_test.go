package proxy

import (
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/valyala/fasthttp"
)

// chkScrape GETs a /metrics URL over HTTP and parses the text exposition.
func chkScrape(t testing.TB, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse exposition: %v", err)
	}
	return mfs
}

// chkValue sums, over the series of family name whose labels include want, the counter
// or gauge value, or for a histogram its sample count. ok is false without such series.
func chkValue(mfs map[string]*dto.MetricFamily, name string, want ...string) (v float64, ok bool) {
	mf := mfs[name]
	if mf == nil {
		return 0, false
	}
series:
	for _, m := range mf.GetMetric() {
		for i := 0; i+1 < len(want); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == want[i] && lp.GetValue() == want[i+1] {
					found = true
				}
			}
			if !found {
				continue series
			}
		}
		ok = true
		switch {
		case m.Counter != nil:
			v += m.Counter.GetValue()
		case m.Gauge != nil:
			v += m.Gauge.GetValue()
		case m.Histogram != nil:
			v += float64(m.Histogram.GetSampleCount())
		}
	}
	return v, ok
}

// chkRecorder fails on demand.
type chkRecorder struct{ fail atomic.Bool }

func (r *chkRecorder) Record([]limiter.Usage) error {
	if r.fail.Load() {
		return errors.New("disk full")
	}
	return nil
}

// TestMetricFamilies drives every family of the proxy's Metrics over real HTTP and
// checks that each series moves by exactly what was done.
func TestMetricFamilies(t *testing.T) {
	m := NewMetrics()
	m.TimeEvery = 1
	reg := prometheus.NewRegistry()
	if err := m.Register(reg); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	rec := &chkRecorder{}
	f := newChkFixture(t, chkConfig, Options{Metrics: m, Recorder: rec}, func(c *config.Config) {
		c.Routes = append(c.Routes, config.Route{Name: "open", Path: "/v1/open", OnUnavailable: "allow",
			Features: []config.RouteFeature{{Feature: "api_calls"}}})
	})
	before := chkScrape(t, srv.URL)

	type step struct {
		name   string
		do     func()
		family string
		labels []string
		delta  float64
	}
	get := func(target string, h ...string) func() { return func() { f.do(t, "GET", target, h...) } }
	steps := []step{
		{"allow", get("/v1/hello", "X-Customer-Id", "acme"), "gatehouse_decisions_total",
			[]string{"route", "hello", "result", "allow", "reason", "ok", "feature", ""}, 1},
		{"deny", get("/v1/analytics/x", "X-Customer-Id", "acme"), "gatehouse_decisions_total",
			[]string{"route", "analytics", "result", "deny", "reason", "feature_not_entitled", "feature", "advanced_analytics"}, 1},
		{"unmatched", get("/nowhere", "X-Customer-Id", "acme"), "gatehouse_decisions_total",
			[]string{"route", "unmatched", "result", "deny", "reason", "route_not_allowed"}, 1},
		{"shadow", func() {
			for i := 0; i < 4; i++ {
				f.do(t, "GET", "/v1/shadow/x", "X-Customer-Id", "acme")
			}
		}, "gatehouse_decisions_total", []string{"route", "shadowed", "result", "shadow_deny", "reason", "usage_limit_exceeded", "feature", "reports"}, 1},
		{"unchecked", func() {
			f.src.SetReady(false)
			defer f.src.SetReady(true)
			f.do(t, "GET", "/v1/open", "X-Customer-Id", "newcomer")
		}, "gatehouse_decisions_total", []string{"route", "open", "result", "unchecked"}, 1},
		{"decision timed", get("/v1/hello", "X-Customer-Id", "acme"), "gatehouse_decision_seconds", nil, 1},
		{"upstream 2xx", get("/v1/hello", "X-Customer-Id", "acme"), "gatehouse_upstream_responses_total", []string{"class", "2xx"}, 1},
		{"upstream 5xx", get("/v1/hello", "X-Customer-Id", "acme", "X-Echo-Status", "503"), "gatehouse_upstream_responses_total", []string{"class", "5xx"}, 1},
		{"upstream timed", get("/v1/hello", "X-Customer-Id", "acme"), "gatehouse_upstream_seconds", nil, 1},
		{"protocol error", func() { chkRaw(t, f, "NOT HTTP AT ALL\r\n\r\n") }, "gatehouse_protocol_errors_total", []string{"reason", "malformed_request"}, 1},
		{"usage write error", func() {
			rec.fail.Store(true)
			defer rec.fail.Store(false)
			f.do(t, "GET", "/v1/hello", "X-Customer-Id", "acme")
		}, "gatehouse_usage_write_errors_total", nil, 1},
		{"check allow", get(CheckEnvoy+"/v1/hello", "X-Customer-Id", "acme"), "gatehouse_checks_total", []string{"endpoint", "envoy", "result", "allow"}, 1},
		{"check deny", get(CheckNginx, "X-Original-URI", "/v1/hello"), "gatehouse_checks_total", []string{"endpoint", "nginx", "result", "deny"}, 1},
		{"check invalid", get(CheckPrefix + "/nope"), "gatehouse_checks_total", []string{"endpoint", "invalid", "result", "deny"}, 1},
		{"check counts its decision", get(CheckTraefik, "X-Forwarded-Uri", "/v1/hello", "X-Customer-Id", "acme"), "gatehouse_decisions_total",
			[]string{"route", "hello", "result", "allow"}, 1},
		{"reload error flag", func() { m.ConfigReloaded(errors.New("bad")) }, "gatehouse_config_last_reload_successful", nil, -1},
		{"reload error", func() { m.ConfigReloaded(errors.New("bad")) }, "gatehouse_config_reloads_total", []string{"result", "error"}, 1},
		{"reload ok flag", func() { m.ConfigReloaded(nil) }, "gatehouse_config_last_reload_successful", nil, 1},
		{"reload ok", func() { m.ConfigReloaded(nil) }, "gatehouse_config_reloads_total", []string{"result", "success"}, 1},
	}
	for _, s := range steps {
		s.do()
		after := chkScrape(t, srv.URL)
		b, _ := chkValue(before, s.family, s.labels...)
		a, ok := chkValue(after, s.family, s.labels...)
		if !ok || a-b != s.delta {
			t.Errorf("%s: %s%v moved by %v (present %v), want %v", s.name, s.family, s.labels, a-b, ok, s.delta)
		}
		before = after
	}
	if v, _ := chkValue(before, "gatehouse_config_last_reload_success_timestamp_seconds"); v < float64(time.Now().Add(-time.Minute).Unix()) {
		t.Errorf("last reload timestamp %v", v)
	}
	// Every family is exposed, with no customer in any label.
	for _, name := range []string{"gatehouse_decisions_total", "gatehouse_decision_seconds", "gatehouse_upstream_seconds",
		"gatehouse_upstream_responses_total", "gatehouse_protocol_errors_total", "gatehouse_usage_write_errors_total",
		"gatehouse_checks_total", "gatehouse_config_reloads_total", "gatehouse_config_last_reload_successful",
		"gatehouse_config_last_reload_success_timestamp_seconds"} {
		mf := before[name]
		if mf == nil {
			t.Errorf("family %s missing", name)
			continue
		}
		for _, s := range mf.GetMetric() {
			for _, lp := range s.GetLabel() {
				if v := lp.GetValue(); v == "acme" || v == "newcomer" {
					t.Errorf("%s has a customer in label %s", name, lp.GetName())
				}
			}
		}
	}
}

// TestMetricUpstreamError: a transport error is counted as such.
func TestMetricUpstreamError(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	m := NewMetrics()
	f := newChkFixture(t, chkConfig, Options{Metrics: m}, func(c *config.Config) { c.Upstream.URL = "http://" + closed })
	if resp := f.do(t, "GET", "/v1/hello", "X-Customer-Id", "acme"); resp.StatusCode() != 502 {
		t.Fatalf("status %d, want 502", resp.StatusCode())
	}
	reg := prometheus.NewRegistry()
	if err := m.Register(reg); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	if v, _ := chkValue(chkScrape(t, srv.URL), "gatehouse_upstream_responses_total", "class", "error"); v != 1 {
		t.Errorf("upstream errors %v, want 1", v)
	}
}

// chkRaw writes raw bytes to the proxy and reads the answer's status line.
func chkRaw(t testing.TB, f *chkFixture, raw string) string {
	t.Helper()
	c, err := net.Dial("tcp", f.client.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(raw)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	n, _ := c.Read(buf)
	line, _, _ := strings.Cut(string(buf[:n]), "\r\n")
	return line
}

// TestDecideMetricsAllocs: counting and timing a decision allocates nothing.
func TestDecideMetricsAllocs(t *testing.T) {
	if chkRace {
		t.Skip("the race detector makes sync.Pool drop items: allocation counts mean nothing")
	}
	b := newDecideBench(t)
	b.p.metrics.TimeEvery = 1
	n := testing.AllocsPerRun(1000, func() { b.run(true) })
	if n != 0 {
		t.Errorf("%v allocations per counted decision, want 0", n)
	}
}

// decideBench decides one admitted request over and over: two metered features, one
// customer in memory, the identity in a header.
type decideBench struct {
	p            *Proxy
	lim          *limiter.Limiter
	h            fasthttp.RequestHeader
	method, path []byte
	now          time.Time // as ctx.Time(): read once per request by fasthttp, not here
}

func newDecideBench(t testing.TB) *decideBench {
	f := newChkFixture(t, chkConfig, Options{})
	b := &decideBench{p: f.p, lim: f.lim, method: []byte("POST"), path: []byte("/v1/chat"), now: time.Now()}
	b.h.SetMethod("POST")
	b.h.SetRequestURI("/v1/chat")
	b.h.Set("X-Customer-Id", "acme")
	b.h.Set("User-Agent", "bench/1.0")
	b.h.Set("Accept", "application/json")
	return b
}

// run decides, with or without the metrics, and refunds so the limit is never reached.
func (b *decideBench) run(metrics bool) {
	st := b.p.states.Get().(*reqState)
	t := b.p.table.Load()
	// As Handle does it.
	var (
		start time.Time
		timed bool
	)
	if metrics {
		start, timed = b.p.metrics.startTiming(st)
	}
	o := b.p.decide(t, b.method, b.path, &b.h, b.now, st)
	if metrics {
		b.p.metrics.decided(&o, start, timed)
	}
	if o.decision.Reason != limiter.OK {
		panic(o.decision.Reason.String())
	}
	b.lim.Refund(&st.res)
	b.p.putState(st)
}

// BenchmarkDecideMetrics is the cost of a decision without the metrics (off), with them
// as they run in production (on: counted, one in 64 timed), and timing every decision
// (every), which is why timing is sampled. cpu-ns/op is the thread's CPU time, steadier
// than ns/op on a busy machine.
func BenchmarkDecideMetrics(b *testing.B) {
	db := newDecideBench(b)
	for _, c := range []struct {
		name    string
		metrics bool
		every   uint32
	}{{"off", false, DefaultTimeEvery}, {"on", true, DefaultTimeEvery}, {"every", true, 1}} {
		b.Run(c.name, func(b *testing.B) {
			db.p.metrics.TimeEvery = c.every
			b.ReportAllocs()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			cpu0, ok := chkThreadCPU()
			for b.Loop() {
				db.run(c.metrics)
			}
			if cpu1, ok1 := chkThreadCPU(); ok && ok1 {
				b.ReportMetric(float64(cpu1-cpu0)/float64(b.N), "cpu-ns/op")
			}
		})
	}
}
