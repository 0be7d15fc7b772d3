package proxy

import (
	"encoding/json"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/echo"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"
)

// The check-endpoint tests send requests shaped as each gateway sends them to a proxy
// on loopback in front of a real echo upstream, and check that nothing under the
// reserved prefix is ever forwarded.

const chkConfig = `
upstream: {url: "http://UPSTREAM"}
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
  - name: analytics
    path: /v1/analytics/**
    features: [{feature: advanced_analytics}]
  - name: chat
    method: POST
    path: /v1/chat
    features: [{feature: api_calls, cost: 1}, {feature: tokens, cost_response_header: X-Tokens-Used}]
  - name: shadowed
    path: /v1/shadow/**
    features: [{feature: reports, cost: 1}]
    shadow: true
  - name: catchall
    path: /static/**
`

var chkSnapshots = []string{
	`{"customer_id": "acme", "features": {
		"api_calls": {"type": "metered", "usage_limit": 1000, "usage_reset_period": "MONTHLY"},
		"reports": {"type": "metered", "usage_limit": 3, "usage_reset_period": "DAILY"},
		"tokens": {"type": "metered", "usage_limit": null},
		"advanced_analytics": {"type": "boolean", "is_enabled": false},
		"support_tier": {"type": "static", "static_values": ["24/7"]}}}`,
	`{"customer_id": "initech", "features": {"api_calls": {"type": "metered", "usage_limit": 10}}}`,
}

// chkFixture is a proxy on 127.0.0.1 in front of a real echo upstream.
type chkFixture struct {
	p      *Proxy
	lim    *limiter.Limiter
	src    *limiter.MemorySource
	client *fasthttp.HostClient
}

// newChkFixture starts a proxy with cfgYAML, UPSTREAM replaced by an echo upstream's
// address; edit, when set, changes the parsed configuration (without validating it).
func newChkFixture(t testing.TB, cfgYAML string, opts Options, edit ...func(*config.Config)) *chkFixture {
	t.Helper()
	cfg, err := config.Parse(strings.NewReader(strings.ReplaceAll(cfgYAML, "UPSTREAM", testutil.Echo(t))))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range edit {
		e(cfg)
	}
	var snaps []*limiter.Snapshot
	for _, s := range chkSnapshots {
		snap, err := limiter.ParseSnapshot([]byte(s))
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, snap)
	}
	f := &chkFixture{lim: limiter.New(), src: limiter.NewMemorySource(snaps...)}
	opts.Config, opts.Source, opts.Limiter = cfg, f.src, f.lim
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	if f.p, err = New(opts); err != nil {
		t.Fatal(err)
	}
	ln, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = f.p.Serve(ln) }()
	t.Cleanup(func() { _ = f.p.Shutdown(t.Context()) })
	f.client = &fasthttp.HostClient{Addr: ln.Addr().String()}
	return f
}

// do sends a request: method, request target, then header name/value pairs.
func (f *chkFixture) do(t testing.TB, method, target string, headers ...string) *fasthttp.Response {
	t.Helper()
	req := fasthttp.AcquireRequest()
	defer fasthttp.ReleaseRequest(req)
	req.Header.SetMethod(method)
	req.SetRequestURI(target)
	req.Header.SetHost("api.example.com")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	resp := &fasthttp.Response{}
	if err := f.client.DoTimeout(req, resp, 5*time.Second); err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	return resp
}

// committed is the committed usage of one customer's feature, all windows.
func (f *chkFixture) committed(customer, feature string) int64 {
	var n int64
	f.lim.Counters(customer, func(c *limiter.Counter) {
		if c.Key.Feature == feature {
			n += c.Committed()
		}
	})
	return n
}

type chkWant struct {
	status  int
	headers map[string]string // "" means absent
	reason  string            // problem body reason; "" when the body is empty
}

func chkCheck(t *testing.T, resp *fasthttp.Response, w chkWant) {
	t.Helper()
	if resp.StatusCode() != w.status {
		t.Errorf("status %d, want %d; body %s", resp.StatusCode(), w.status, resp.Body())
	}
	for name, want := range w.headers {
		got := string(resp.Header.Peek(name))
		if prefix, ok := strings.CutSuffix(want, "*"); ok && strings.HasPrefix(got, prefix) {
			continue
		}
		if got != want {
			t.Errorf("%s: %q, want %q", name, got, want)
		}
	}
	if w.reason == "" {
		if len(resp.Body()) != 0 {
			t.Errorf("body %q, want none", resp.Body())
		}
		return
	}
	var prob struct {
		Status int    `json:"status"`
		Reason string `json:"reason"`
	}
	if err := json.Unmarshal(resp.Body(), &prob); err != nil {
		t.Fatalf("problem body %q: %v", resp.Body(), err)
	}
	if prob.Reason != w.reason {
		t.Errorf("problem reason %q, want %q", prob.Reason, w.reason)
	}
	if ct := string(resp.Header.ContentType()); ct != "application/problem+json" {
		t.Errorf("content type %q", ct)
	}
}

// envoyHeaders are what Envoy's ext_authz HTTP client adds to the client's headers.
var envoyHeaders = []string{"X-Forwarded-Proto", "https", "X-Request-Id", "5c7d1e2a-1111-4d4b-9a8c-0d7c0b7e4f00",
	"X-Envoy-Expected-Rq-Timeout-Ms", "250", "Content-Length", "0"}

func TestCheckEnvoy(t *testing.T) {
	f := newChkFixture(t, chkConfig, Options{})
	env := func(h ...string) []string { return append(h, envoyHeaders...) }
	cases := []struct {
		name, method, target string
		headers              []string
		want                 chkWant
	}{
		{"allow with static header", "GET", "/.gatehouse/envoy/v1/hello?lang=en", env("X-Customer-Id", "acme"), chkWant{
			status: 200, headers: map[string]string{"X-Customer-Id": "acme", "X-Support-Tier": "24/7",
				headerEnvoyRemove: "", "RateLimit-Policy": `"api_calls";q=1000;w=` + chkWindowSeconds(f, "acme", "api_calls"), HeaderCheckStatus: ""}}},
		{"allow removes what it did not set", "GET", "/.gatehouse/envoy/v1/hello", env("X-Customer-Id", "initech", "X-Support-Tier", "platinum"), chkWant{
			status: 200, headers: map[string]string{"X-Customer-Id": "initech", "X-Support-Tier": "", headerEnvoyRemove: "X-Support-Tier"}}},
		{"no identity", "GET", "/.gatehouse/envoy/v1/hello", env(), chkWant{
			status: 401, reason: "customer_missing", headers: map[string]string{HeaderCheckStatus: "401", HeaderCheckReason: "customer_missing"}}},
		{"unknown customer", "GET", "/.gatehouse/envoy/v1/hello", env("X-Customer-Id", "nobody"), chkWant{
			status: 403, reason: "customer_unknown", headers: map[string]string{"X-Customer-Id": ""}}},
		{"not entitled", "GET", "/.gatehouse/envoy/v1/analytics/summary", env("X-Customer-Id", "acme"), chkWant{
			status: 403, reason: "feature_not_entitled", headers: map[string]string{HeaderCheckReason: "feature_not_entitled"}}},
		{"unmatched denied", "DELETE", "/.gatehouse/envoy/v1/hello", env("X-Customer-Id", "acme"), chkWant{
			status: 403, reason: "route_not_allowed"}},
		{"original method decides", "POST", "/.gatehouse/envoy/v1/reports", env("X-Customer-Id", "acme"), chkWant{
			status: 200, headers: map[string]string{"X-Customer-Id": "acme", "RateLimit": `"reports";r=2;t=*`}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			chkCheck(t, f.do(t, c.method, c.target, c.headers...), c.want)
		})
	}

	t.Run("usage is committed at check time", func(t *testing.T) {
		for f.committed("acme", "reports") < 3 {
			chkCheck(t, f.do(t, "POST", "/.gatehouse/envoy/v1/reports", env("X-Customer-Id", "acme")...), chkWant{status: 200})
		}
		resp := f.do(t, "POST", "/.gatehouse/envoy/v1/reports", env("X-Customer-Id", "acme")...)
		chkCheck(t, resp, chkWant{status: 429, reason: "usage_limit_exceeded", headers: map[string]string{
			HeaderCheckStatus: "429", "RateLimit-Policy": `"reports";q=3`}})
		if resp.Header.Peek("Retry-After") == nil {
			t.Error("429 without Retry-After")
		}
		if got := f.committed("acme", "reports"); got != 3 {
			t.Errorf("committed %d, want 3", got)
		}
	})
}

// chkWindowSeconds is the w= of a feature's current window.
func chkWindowSeconds(f *chkFixture, customer, feature string) string {
	start, end := chkWindow(f, customer, feature)
	return itoa((end - start) / int64(time.Second))
}

func chkWindow(f *chkFixture, customer, feature string) (int64, int64) {
	s := f.src.Customer([]byte(customer))
	start, end := limiter.WindowAt(&s.Billing, s.Features[feature].Reset, time.Now())
	return start.UnixNano(), end.UnixNano()
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

func TestCheckTraefik(t *testing.T) {
	f := newChkFixture(t, chkConfig, Options{})
	// Traefik's forwardAuth sends GET to its address with the client's headers and the
	// original request in X-Forwarded-*.
	traefik := func(method, uri string, h ...string) []string {
		return append(h, "X-Forwarded-Method", method, "X-Forwarded-Proto", "https",
			"X-Forwarded-Host", "api.example.com", "X-Forwarded-Uri", uri, "X-Forwarded-For", "203.0.113.7")
	}
	cases := []struct {
		name    string
		headers []string
		want    chkWant
	}{
		{"allow", traefik("GET", "/v1/hello?lang=en", "X-Customer-Id", "acme"), chkWant{
			status: 200, headers: map[string]string{"X-Customer-Id": "acme", "X-Support-Tier": "24/7", headerEnvoyRemove: ""}}},
		{"normalized like a proxied path", traefik("POST", "/v1/hello/../reports", "X-Customer-Id", "acme"), chkWant{
			status: 200, headers: map[string]string{"RateLimit-Policy": `"reports";q=3;w=86400`}}},
		{"percent-encoded dots", traefik("GET", "/v1/analytics/%2e%2e/hello", "X-Customer-Id", "acme"), chkWant{
			status: 200, headers: map[string]string{"X-Support-Tier": "24/7"}}},
		{"absolute URI", traefik("GET", "https://api.example.com/v1/hello", "X-Customer-Id", "initech"), chkWant{
			status: 200, headers: map[string]string{"X-Customer-Id": "initech"}}},
		{"deny is the proxy's refusal", traefik("GET", "/v1/analytics/x", "X-Customer-Id", "acme"), chkWant{
			status: 403, reason: "feature_not_entitled", headers: map[string]string{HeaderCheckStatus: "403"}}},
		{"no identity", traefik("GET", "/v1/hello"), chkWant{status: 401, reason: "customer_missing"}},
		{"no original URI", []string{"X-Forwarded-Method", "GET", "X-Customer-Id", "acme"}, chkWant{
			status: 400, reason: "check_request_invalid", headers: map[string]string{HeaderCheckReason: "check_request_invalid"}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			chkCheck(t, f.do(t, "GET", CheckTraefik, c.headers...), c.want)
		})
	}
}

func TestCheckNginx(t *testing.T) {
	f := newChkFixture(t, chkConfig, Options{})
	// nginx's auth_request subrequest: the original method, no body, and the original
	// request in the headers that the auth location sets.
	nginx := func(method, uri string, h ...string) []string {
		return append(h, "X-Original-Method", method, "X-Original-URI", uri)
	}
	cases := []struct {
		name    string
		headers []string
		want    chkWant
	}{
		{"allow", nginx("GET", "/v1/hello", "X-Customer-Id", "acme"), chkWant{status: 200, headers: map[string]string{"X-Customer-Id": "acme"}}},
		{"identity is 401", nginx("GET", "/v1/hello"), chkWant{status: 401, reason: "customer_missing",
			headers: map[string]string{HeaderCheckStatus: "401", HeaderCheckReason: "customer_missing"}}},
		{"not entitled is 403", nginx("GET", "/v1/analytics/x", "X-Customer-Id", "acme"), chkWant{status: 403, reason: "feature_not_entitled",
			headers: map[string]string{HeaderCheckStatus: "403"}}},
		{"unmatched is 403", nginx("PUT", "/v1/nothing", "X-Customer-Id", "acme"), chkWant{status: 403, reason: "route_not_allowed"}},
		{"no original URI is 403", []string{"X-Customer-Id", "acme"}, chkWant{status: 403, reason: "check_request_invalid",
			headers: map[string]string{HeaderCheckStatus: "400"}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			chkCheck(t, f.do(t, "GET", CheckNginx, c.headers...), c.want)
		})
	}
	t.Run("limit is 403 with the real status in headers", func(t *testing.T) {
		for f.committed("acme", "reports") < 3 {
			chkCheck(t, f.do(t, "GET", CheckNginx, nginx("POST", "/v1/reports", "X-Customer-Id", "acme")...), chkWant{status: 200})
		}
		resp := f.do(t, "GET", CheckNginx, nginx("POST", "/v1/reports", "X-Customer-Id", "acme")...)
		chkCheck(t, resp, chkWant{status: 403, reason: "usage_limit_exceeded", headers: map[string]string{
			HeaderCheckStatus: "429", HeaderCheckReason: "usage_limit_exceeded", "RateLimit-Policy": `"reports";q=3`}})
		if len(resp.Header.Peek("Retry-After")) == 0 {
			t.Error("no Retry-After")
		}
	})
}

// TestCheckPrefixReserved: nothing under /.gatehouse reaches the upstream, whatever the
// routes say, and the proxy still forwards everything else.
func TestCheckPrefixReserved(t *testing.T) {
	f := newChkFixture(t, chkConfig, Options{}, func(c *config.Config) {
		c.Routes = append(c.Routes, config.Route{Name: "sneaky", Path: "/.gatehouse/**"}, config.Route{Name: "all", Path: "/**"})
	})
	for _, target := range []string{"/.gatehouse", "/.gatehouse/", "/.gatehouse/admin", "/.gatehouse/envoyx/v1/hello",
		"/.gatehouse/traefik/extra", "/static/../.gatehouse/x"} {
		resp := f.do(t, "GET", target, "X-Customer-Id", "acme")
		if resp.StatusCode() != 404 || !strings.Contains(string(resp.Body()), "check_not_found") {
			t.Errorf("GET %s: %d %s, want 404 check_not_found", target, resp.StatusCode(), resp.Body())
		}
	}
	// Neighbours of the prefix are ordinary paths, forwarded to the upstream.
	for _, target := range []string{"/.gatehousex", "/static/.gatehouse/envoy"} {
		resp := f.do(t, "GET", target, "X-Customer-Id", "acme")
		var r echo.Reply
		if resp.StatusCode() != 200 || json.Unmarshal(resp.Body(), &r) != nil || r.Path != target {
			t.Errorf("GET %s: %d %s, want it forwarded", target, resp.StatusCode(), resp.Body())
		}
	}
}

func TestCheckShadow(t *testing.T) {
	f := newChkFixture(t, chkConfig, Options{})
	for i := 0; i < 5; i++ {
		resp := f.do(t, "GET", "/.gatehouse/envoy/v1/shadow/x", "X-Customer-Id", "acme")
		want := chkWant{status: 200, headers: map[string]string{"X-Customer-Id": "acme", HeaderCheckShadow: ""}}
		if i >= 3 {
			want.headers[HeaderCheckShadow] = "usage_limit_exceeded"
		}
		chkCheck(t, resp, want)
	}
	if got := f.committed("acme", "reports"); got != 5 {
		t.Errorf("committed %d, want 5: shadow counts what it admits", got)
	}
	// Shadow never refuses, not even an unknown customer; the headers say what would have.
	chkCheck(t, f.do(t, "GET", CheckTraefik, "X-Forwarded-Method", "GET", "X-Forwarded-Uri", "/v1/shadow/y", "X-Customer-Id", "nobody"),
		chkWant{status: 200, headers: map[string]string{HeaderCheckShadow: "customer_unknown", "X-Customer-Id": ""}})
}

// TestCheckResponseCost: a check sees no response, so a response-header cost commits
// the route's reserved cost (0 by default) while still gating on what is left.
func TestCheckResponseCost(t *testing.T) {
	f := newChkFixture(t, chkConfig, Options{})
	chkCheck(t, f.do(t, "POST", "/.gatehouse/envoy/v1/chat", "X-Customer-Id", "acme", "X-Tokens-Used", "42"), chkWant{status: 200})
	if got := f.committed("acme", "api_calls"); got != 1 {
		t.Errorf("api_calls committed %d, want 1", got)
	}
	if got := f.committed("acme", "tokens"); got != 0 {
		t.Errorf("tokens committed %d, want 0", got)
	}
}

// TestCheckAllocs: an admitted check allocates nothing.
func TestCheckAllocs(t *testing.T) {
	if chkRace {
		t.Skip("the race detector makes sync.Pool drop items: allocation counts mean nothing")
	}
	f := newChkFixture(t, chkConfig, Options{})
	var req fasthttp.Request
	req.Header.SetMethod("GET")
	req.SetRequestURI(CheckNginx)
	req.Header.Set("X-Customer-Id", "acme")
	req.Header.Set("X-Original-Method", "GET")
	req.Header.Set("X-Original-URI", "/v1/hello")
	var ctx fasthttp.RequestCtx
	ctx.Init(&req, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}, nil)
	run := func() {
		ctx.Response.Reset()
		f.p.Handle(&ctx)
		if ctx.Response.StatusCode() != 200 {
			t.Fatalf("status %d: %s", ctx.Response.StatusCode(), ctx.Response.Body())
		}
	}
	run()
	if n := testing.AllocsPerRun(100, run); n != 0 {
		t.Errorf("%v allocations per admitted check, want 0", n)
	}
}
