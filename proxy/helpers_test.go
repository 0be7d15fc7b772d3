package proxy

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"mime"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/echo"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/valyala/fasthttp"
)

// echoUpstream is the real echo upstream (internal/echo) on loopback, wrapped to count the
// requests that reach it and to show the raw request URI it was sent. A request with
// X-Test-Delay (a Go duration) is answered that much later.
type echoUpstream struct {
	addr string
	hits atomic.Int64
}

func startUpstream(t testing.TB) *echoUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &echoUpstream{addr: ln.Addr().String()}
	srv := &fasthttp.Server{Handler: u.handle, NoDefaultDate: true}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		_ = srv.Shutdown()
		<-done
	})
	return u
}

func (u *echoUpstream) handle(ctx *fasthttp.RequestCtx) {
	u.hits.Add(1)
	if d := ctx.Request.Header.Peek("X-Test-Delay"); len(d) > 0 {
		if dur, err := time.ParseDuration(string(d)); err == nil {
			time.Sleep(dur)
		}
	}
	uri := string(ctx.Request.Header.RequestURI())
	echo.Handler(ctx)
	ctx.Response.Header.Set("X-Upstream-Uri", uri)
}

// usageRecorder is the proxy's Recorder in the tests: it keeps what it is given.
type usageRecorder struct {
	mu  sync.Mutex
	got []limiter.Usage
}

func (r *usageRecorder) Record(u []limiter.Usage) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, u...)
	return nil
}

// usages returns what was recorded for one customer's feature, in order.
func (r *usageRecorder) usages(customer, feature string) []limiter.Usage {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []limiter.Usage
	for _, u := range r.got {
		if u.Key.Customer == customer && u.Key.Feature == feature {
			out = append(out, u)
		}
	}
	return out
}

// total is the quantity and overage recorded for one customer's feature.
func (r *usageRecorder) total(customer, feature string) (quantity, overage int64) {
	for _, u := range r.usages(customer, feature) {
		quantity += u.Quantity
		overage += u.Overage
	}
	return quantity, overage
}

// harness is a proxy on a real loopback listener in front of a real echo upstream.
type harness struct {
	t    testing.TB
	cfg  *config.Config
	src  *limiter.MemorySource
	lim  *limiter.Limiter
	rec  *usageRecorder
	up   *echoUpstream
	p    *Proxy
	addr string
	http *http.Client
}

// startHarness runs a proxy with cfg over snaps. When cfg names no upstream, it gets a fresh
// echo upstream.
func startHarness(t testing.TB, cfg *config.Config, snaps ...*limiter.Snapshot) *harness {
	t.Helper()
	h := &harness{t: t, cfg: cfg, src: limiter.NewMemorySource(snaps...), lim: limiter.New(), rec: &usageRecorder{}}
	if cfg.Upstream.URL == "" {
		h.up = startUpstream(t)
		cfg.Upstream.URL = "http://" + h.up.addr
	}
	p, err := New(Options{Config: cfg, Source: h.src, Limiter: h.lim, Recorder: h.rec, Log: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.p, h.addr = p, ln.Addr().String()
	served := make(chan error, 1)
	go func() { served <- p.Serve(ln) }()
	tr := &http.Transport{MaxIdleConnsPerHost: 128, DisableCompression: true}
	h.http = &http.Client{Transport: tr, Timeout: 10 * time.Second}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return h
}

// hits is how many requests reached the upstream.
func (h *harness) hits() int64 { return h.up.hits.Load() }

// usage is the held and committed usage of a customer's feature, over all windows.
func (h *harness) usage(customer, feature string) (held, committed int64) {
	h.lim.Counters(customer, func(c *limiter.Counter) {
		if c.Key.Feature == feature {
			held += c.Held()
			committed += c.Committed()
		}
	})
	return held, committed
}

// checkUsage fails the test unless a feature's held and committed usage are both want.
func (h *harness) checkUsage(customer, feature string, want int64) {
	h.t.Helper()
	if held, committed := h.usage(customer, feature); held != want || committed != want {
		h.t.Errorf("%s/%s: held %d, committed %d; want %d", customer, feature, held, committed, want)
	}
}

// clientResponse is a response as the client saw it.
type clientResponse struct {
	status  int
	header  http.Header
	body    []byte
	echo    *echo.Reply    // what reached the upstream, when the upstream answered
	problem *problemBody   // the refusal, for application/problem+json
	fields  map[string]any // the problem body as a JSON object, to see which members it has
}

// problemBody is an application/problem+json body.
type problemBody struct {
	Type       string `json:"type"`
	Title      string `json:"title"`
	Status     int    `json:"status"`
	Detail     string `json:"detail"`
	Reason     string `json:"reason"`
	CustomerID string `json:"customer_id"`
	Feature    string `json:"feature"`
	Limit      *int64 `json:"limit"`
	Used       *int64 `json:"used"`
	ResetAt    string `json:"reset_at"`
}

// do sends a request through the proxy with net/http. hdr holds name, value pairs.
func (h *harness) do(method, path string, hdr ...string) *clientResponse {
	h.t.Helper()
	return h.doBody(method, path, "", hdr...)
}

func (h *harness) doBody(method, path, body string, hdr ...string) *clientResponse {
	h.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, "http://"+h.addr+path, rd)
	if err != nil {
		h.t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if strings.EqualFold(hdr[i], "Host") {
			req.Host = hdr[i+1]
			continue
		}
		req.Header.Add(hdr[i], hdr[i+1])
	}
	resp, err := h.http.Do(req)
	if err != nil {
		h.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	return readResult(h.t, resp)
}

// raw sends one request exactly as written on a fresh connection, and reads the response.
func (h *harness) raw(request string) *clientResponse {
	h.t.Helper()
	return rawRequest(h.t, h.addr, request)
}

func rawRequest(t testing.TB, addr, request string) *clientResponse {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, request); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading the response to %q: %v", firstLine(request), err)
	}
	defer resp.Body.Close()
	return readResult(t, resp)
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\r'); i >= 0 {
		return s[:i]
	}
	return s
}

func readResult(t testing.TB, resp *http.Response) *clientResponse {
	t.Helper()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	r := &clientResponse{status: resp.StatusCode, header: resp.Header, body: body}
	ct, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	switch {
	case ct == "application/problem+json":
		r.problem = &problemBody{}
		if err := json.Unmarshal(body, r.problem); err != nil {
			t.Fatalf("problem body %q: %v", body, err)
		}
		if err := json.Unmarshal(body, &r.fields); err != nil {
			t.Fatal(err)
		}
	case ct == "application/json" && resp.Header.Get("X-Upstream-Uri") != "":
		r.echo = &echo.Reply{}
		if err := json.Unmarshal(body, r.echo); err != nil {
			t.Fatalf("echo body %q: %v", body, err)
		}
	}
	return r
}

// forwarded fails the test unless the upstream answered with status.
func (r *clientResponse) forwarded(t testing.TB, status int) *echo.Reply {
	t.Helper()
	if r.status != status || r.echo == nil {
		t.Fatalf("status %d, body %s; want %d from the upstream", r.status, r.body, status)
	}
	return r.echo
}

// refused fails the test unless the response is a refusal with status and reason.
func (r *clientResponse) refused(t testing.TB, status int, reason string) *problemBody {
	t.Helper()
	if r.status != status || r.problem == nil || r.problem.Reason != reason {
		t.Fatalf("status %d, body %s; want %d %s", r.status, r.body, status, reason)
	}
	p := r.problem
	if p.Type != "urn:gatehouse:problem:"+reason || p.Status != status || p.Title == "" {
		t.Errorf("problem type %q status %d title %q", p.Type, p.Status, p.Title)
	}
	return p
}

// upstreamHeader returns what the upstream saw of a request header, and whether it saw it.
func upstreamHeader(e *echo.Reply, name string) (string, bool) {
	for k, v := range e.Headers {
		if strings.EqualFold(k, name) {
			return v, true
		}
	}
	return "", false
}

// parseRateLimit parses a RateLimit or RateLimit-Policy field: `"name";k=v;k=v, ...`.
func parseRateLimit(t testing.TB, v string) map[string]map[string]int64 {
	t.Helper()
	out := map[string]map[string]int64{}
	if v == "" {
		return out
	}
	for _, item := range strings.Split(v, ", ") {
		parts := strings.Split(item, ";")
		name, err := strconv.Unquote(parts[0])
		if err != nil {
			t.Fatalf("RateLimit item %q: %v", item, err)
		}
		params := map[string]int64{}
		for _, p := range parts[1:] {
			k, val, ok := strings.Cut(p, "=")
			n, err := strconv.ParseInt(val, 10, 64)
			if !ok || err != nil {
				t.Fatalf("RateLimit parameter %q in %q", p, v)
			}
			params[k] = n
		}
		out[name] = params
	}
	return out
}

// assertNear fails the test unless got is within 2 of want (seconds computed a moment apart).
func assertNear(t testing.TB, what string, got, want int64) {
	t.Helper()
	if got < want-2 || got > want+2 {
		t.Errorf("%s = %d, want about %d", what, got, want)
	}
}

func costOf(n int64) *int64 { return &n }

// testConfig is the default configuration with routes.
func testConfig(routes ...config.Route) *config.Config {
	cfg := config.Default()
	cfg.Upstream.Timeout = 5 * time.Second
	cfg.Routes = routes
	return cfg
}

func feat(name string) config.RouteFeature { return config.RouteFeature{Feature: name} }

// testSnap parses one snapshot, billed monthly from 2026-11-05 in UTC.
func testSnap(t testing.TB, id, features string, extra ...string) *limiter.Snapshot {
	t.Helper()
	doc := `{"customer_id":"` + id + `",` +
		`"billing":{"period_start":"2026-11-05T00:00:00Z","interval":"MONTHLY","timezone":"UTC"},` +
		`"features":{` + features + `}` + strings.Join(extra, "") + `}`
	s, err := limiter.ParseSnapshot([]byte(doc))
	if err != nil {
		t.Fatalf("snapshot %s: %v", id, err)
	}
	return s
}

func keyHash(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:])
}

// currentWindow is the usage window of a customer's feature that holds now.
func currentWindow(t testing.TB, s *limiter.Snapshot, feature string) (start, end time.Time) {
	t.Helper()
	f := s.Feature(feature)
	if f == nil {
		t.Fatalf("%s has no feature %s", s.CustomerID, feature)
	}
	return limiter.WindowAt(&s.Billing, f.Reset, time.Now())
}

// testCustomers are the customers most tests use.
//
//   - cust_acme: the design example, with API key "key-acme".
//   - cust_small: low limits, advanced_analytics off, no support tier.
//   - cust_zero: a hard limit of 0.
func testCustomers(t testing.TB) []*limiter.Snapshot {
	return []*limiter.Snapshot{
		testSnap(t, "cust_acme", `
			"api_calls":          {"type": "metered", "usage_limit": 1000, "usage_reset_period": "MONTHLY"},
			"tokens":             {"type": "metered", "usage_limit": null, "usage_reset_period": "DAILY"},
			"exports":            {"type": "metered", "usage_limit": 50, "is_soft_limit": true},
			"advanced_analytics": {"type": "boolean", "is_enabled": true},
			"beta":               {"type": "boolean"},
			"support_tier":       {"type": "static", "static_values": ["24/7"]},
			"models":             {"type": "config", "config_value": {"allow": ["small", "large"]}}`,
			`,"api_keys_sha256":["`+keyHash("key-acme")+`"]`),
		testSnap(t, "cust_small", `
			"api_calls":          {"type": "metered", "usage_limit": 2},
			"tokens":             {"type": "metered", "usage_limit": 100},
			"exports":            {"type": "metered", "usage_limit": 2, "is_soft_limit": true},
			"advanced_analytics": {"type": "boolean", "is_enabled": false}`,
			`,"api_keys_sha256":["`+keyHash("key-small")+`"]`),
		testSnap(t, "cust_zero", `
			"api_calls":          {"type": "metered", "usage_limit": 0},
			"tokens":             {"type": "metered"},
			"advanced_analytics": {"type": "boolean", "is_enabled": true},
			"support_tier":       {"type": "static", "static_values": ["business", "eu"]}`),
	}
}

// testRoutes are the routes most tests use.
func testRoutes() []config.Route {
	return []config.Route{
		{Name: "chat", Method: "POST", Path: "/v1/chat/*", Features: []config.RouteFeature{
			{Feature: "api_calls", Cost: costOf(1)},
			{Feature: "tokens", CostResponseHeader: "X-Tokens-Used"},
			{Feature: "advanced_analytics"},
		}, Headers: map[string]string{"X-Support-Tier": "support_tier", "X-Models": "models"}, OnUnavailable: "deny"},
		{Name: "gen", Method: "POST", Path: "/v1/gen", Features: []config.RouteFeature{
			{Feature: "tokens", CostResponseHeader: "X-Tokens-Used"},
		}},
		{Name: "calls", Path: "/v1/calls/**", Features: []config.RouteFeature{feat("api_calls")}},
		{Name: "exports", Path: "/v1/exports/**", Features: []config.RouteFeature{feat("exports")}},
		{Name: "beta", Method: "GET", Path: "/v1/beta", Features: []config.RouteFeature{feat("beta")}},
		{Name: "ghost", Path: "/v1/ghost", Features: []config.RouteFeature{feat("ghost_feature")}},
		{Name: "bulk", Path: "/v1/bulk", Features: []config.RouteFeature{{Feature: "api_calls", CostRequestHeader: "X-Cost", MaxCost: 100}}},
		{Name: "bulkdef", Path: "/v1/bulkdef", Features: []config.RouteFeature{{Feature: "api_calls", Cost: costOf(2), CostRequestHeader: "X-Cost", MaxCost: 100}}},
		{Name: "heavy", Path: "/v1/heavy", Features: []config.RouteFeature{{Feature: "api_calls", Cost: costOf(5)}}},
		{Name: "open", Path: "/v1/open/**", Features: []config.RouteFeature{feat("api_calls")}, OnUnavailable: "allow"},
		{Name: "tier", Path: "/v1/tier", Headers: map[string]string{"X-Support-Tier": "support_tier"}},
		{Name: "free", Path: "/v1/free/**"},
	}
}

// startDefault runs the proxy with the usual customers and routes.
func startDefault(t testing.TB, edit ...func(*config.Config)) *harness {
	t.Helper()
	cfg := testConfig(testRoutes()...)
	for _, e := range edit {
		e(cfg)
	}
	return startHarness(t, cfg, testCustomers(t)...)
}

// closedAddr is a loopback address where nothing listens.
func closedAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
