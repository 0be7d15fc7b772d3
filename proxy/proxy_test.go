package proxy

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
)

// TestDecisionTable sends one request for each row of DESIGN.md section 5 that refuses,
// and checks the status, the problem body and the headers, and that nothing reached the
// upstream.
func TestDecisionTable(t *testing.T) {
	type want struct {
		status   int
		reason   string
		customer string
		feature  string
		limit    int64 // metered refusals only
		used     int64
	}
	cases := []struct {
		name   string
		method string
		path   string
		hdr    []string
		want   want
	}{
		{"no identity", "POST", "/v1/chat/x", nil, want{status: 401, reason: "customer_missing"}},
		{"blank identity", "POST", "/v1/chat/x", []string{"X-Customer-Id", "  "}, want{status: 401, reason: "customer_missing"}},
		{"identity on a route without features", "GET", "/v1/free/x", nil, want{status: 401, reason: "customer_missing"}},
		{"unknown customer", "POST", "/v1/chat/x", []string{"X-Customer-Id", "cust_nobody"},
			want{status: 403, reason: "customer_unknown", customer: "cust_nobody"}},
		{"boolean disabled", "POST", "/v1/chat/x", []string{"X-Customer-Id", "cust_small"},
			want{status: 403, reason: "feature_not_entitled", customer: "cust_small", feature: "advanced_analytics"}},
		{"boolean off by default", "GET", "/v1/beta", []string{"X-Customer-Id", "cust_acme"},
			want{status: 403, reason: "feature_not_entitled", customer: "cust_acme", feature: "beta"}},
		{"feature absent", "GET", "/v1/ghost", []string{"X-Customer-Id", "cust_acme"},
			want{status: 403, reason: "feature_not_entitled", customer: "cust_acme", feature: "ghost_feature"}},
		{"hard limit 0", "POST", "/v1/chat/x", []string{"X-Customer-Id", "cust_zero"},
			want{status: 429, reason: "usage_limit_exceeded", customer: "cust_zero", feature: "api_calls", limit: 0, used: 0}},
		{"hard limit by cost", "GET", "/v1/heavy", []string{"X-Customer-Id", "cust_small"},
			want{status: 429, reason: "usage_limit_exceeded", customer: "cust_small", feature: "api_calls", limit: 2, used: 0}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := startDefault(t)
			r := h.do(tc.method, tc.path, tc.hdr...)
			p := r.refused(t, tc.want.status, tc.want.reason)
			if p.Detail == "" {
				t.Error("no detail")
			}
			if p.CustomerID != tc.want.customer || p.Feature != tc.want.feature {
				t.Errorf("customer_id %q feature %q, want %q %q", p.CustomerID, p.Feature, tc.want.customer, tc.want.feature)
			}
			for _, k := range []string{"type", "title", "status", "detail", "reason"} {
				if _, ok := r.fields[k]; !ok {
					t.Errorf("problem body lacks %q: %s", k, r.body)
				}
			}
			metered := tc.want.reason == "usage_limit_exceeded"
			if metered {
				if p.Limit == nil || p.Used == nil || *p.Limit != tc.want.limit || *p.Used != tc.want.used {
					t.Errorf("limit %v used %v, want %d %d", p.Limit, p.Used, tc.want.limit, tc.want.used)
				}
				var s = h.src.Customer([]byte(tc.want.customer))
				_, end := currentWindow(t, s, tc.want.feature)
				if p.ResetAt != end.UTC().Format(time.RFC3339) {
					t.Errorf("reset_at %q, want %v", p.ResetAt, end.UTC().Format(time.RFC3339))
				}
				wait := int64(time.Until(end).Seconds())
				ra, err := strconv.ParseInt(r.header.Get("Retry-After"), 10, 64)
				if err != nil {
					t.Errorf("Retry-After %q", r.header.Get("Retry-After"))
				}
				assertNear(t, "Retry-After", ra, wait)
				pol := parseRateLimit(t, r.header.Get("RateLimit-Policy"))
				state := parseRateLimit(t, r.header.Get("RateLimit"))
				if q, ok := pol[tc.want.feature]["q"]; !ok || q != tc.want.limit {
					t.Errorf("RateLimit-Policy %q", r.header.Get("RateLimit-Policy"))
				}
				if st := state[tc.want.feature]; st == nil || st["r"] != 0 {
					t.Errorf("RateLimit %q", r.header.Get("RateLimit"))
				} else {
					assertNear(t, "RateLimit t", st["t"], wait)
				}
			} else {
				for _, k := range []string{"limit", "used", "reset_at"} {
					if _, ok := r.fields[k]; ok {
						t.Errorf("non-metered refusal has %q: %s", k, r.body)
					}
				}
				if r.header.Get("Retry-After") != "" || r.header.Get("RateLimit") != "" {
					t.Errorf("Retry-After %q RateLimit %q on a %d", r.header.Get("Retry-After"), r.header.Get("RateLimit"), r.status)
				}
			}
			if tc.want.status == 401 && r.header.Get("WWW-Authenticate") != "" {
				t.Errorf("WWW-Authenticate %q without API keys", r.header.Get("WWW-Authenticate"))
			}
			if n := h.hits(); n != 0 {
				t.Errorf("%d requests reached the upstream", n)
			}
			for _, f := range []string{"api_calls", "tokens"} {
				h.checkUsage(tc.want.customer, f, 0)
			}
		})
	}
}

// TestAdmitted checks what a forwarded request carries both ways.
func TestAdmitted(t *testing.T) {
	h := startDefault(t)
	s := h.src.Customer([]byte("cust_acme"))
	start, end := currentWindow(t, s, "api_calls")
	r := h.doBody("POST", "/v1/chat/completions?stream=false", `{"prompt":"hi"}`, "X-Customer-Id", "cust_acme", "Content-Type", "application/json")
	e := r.forwarded(t, 200)
	if e.Method != "POST" || e.Path != "/v1/chat/completions" || e.Query != "stream=false" || e.BodySize != len(`{"prompt":"hi"}`) {
		t.Errorf("upstream saw %+v", e)
	}
	for name, want := range map[string]string{
		"X-Customer-Id": "cust_acme", "X-Support-Tier": "24/7", "X-Models": `{"allow":["small","large"]}`,
		"X-Forwarded-For": "127.0.0.1", "Content-Type": "application/json",
	} {
		if got, _ := upstreamHeader(e, name); got != want {
			t.Errorf("upstream %s = %q, want %q", name, got, want)
		}
	}
	// RateLimit fields for the finite metered feature only (tokens is unlimited).
	pol := parseRateLimit(t, r.header.Get("RateLimit-Policy"))
	state := parseRateLimit(t, r.header.Get("RateLimit"))
	if len(pol) != 1 || pol["api_calls"]["q"] != 1000 || pol["api_calls"]["w"] != int64(end.Sub(start)/time.Second) {
		t.Errorf("RateLimit-Policy %q, want q=1000;w=%d", r.header.Get("RateLimit-Policy"), int64(end.Sub(start)/time.Second))
	}
	if len(state) != 1 || state["api_calls"]["r"] != 999 {
		t.Errorf("RateLimit %q, want r=999", r.header.Get("RateLimit"))
	}
	assertNear(t, "RateLimit t", state["api_calls"]["t"], int64(time.Until(end).Seconds()))
	if r.header.Get("Retry-After") != "" {
		t.Errorf("Retry-After on a 200")
	}
	h.checkUsage("cust_acme", "api_calls", 1)
	if q, _ := h.rec.total("cust_acme", "api_calls"); q != 1 {
		t.Errorf("recorded %d api_calls, want 1", q)
	}
	if n := h.hits(); n != 1 {
		t.Errorf("%d requests reached the upstream", n)
	}
}

func TestHardLimit(t *testing.T) {
	h := startDefault(t)
	for i := int64(1); i <= 2; i++ {
		r := h.do("GET", "/v1/calls/x", "X-Customer-Id", "cust_small")
		r.forwarded(t, 200)
		if st := parseRateLimit(t, r.header.Get("RateLimit"))["api_calls"]; st["r"] != 2-i {
			t.Errorf("request %d: RateLimit %q, want r=%d", i, r.header.Get("RateLimit"), 2-i)
		}
	}
	r := h.do("GET", "/v1/calls/x", "X-Customer-Id", "cust_small")
	p := r.refused(t, 429, "usage_limit_exceeded")
	if *p.Limit != 2 || *p.Used != 2 || p.Feature != "api_calls" || p.CustomerID != "cust_small" {
		t.Errorf("problem %+v", p)
	}
	if r.header.Get("Retry-After") == "" {
		t.Error("no Retry-After")
	}
	if n := h.hits(); n != 2 {
		t.Errorf("%d requests reached the upstream, want 2", n)
	}
	h.checkUsage("cust_small", "api_calls", 2)
	if us := h.rec.usages("cust_small", "api_calls"); len(us) != 2 || us[0].Overage != 0 || us[1].Overage != 0 {
		t.Errorf("recorded %+v", us)
	}
}

// TestSoftLimit: requests over a soft limit are forwarded and their overage is recorded.
func TestSoftLimit(t *testing.T) {
	h := startDefault(t)
	wantOverage := []int64{0, 0, 1, 1}
	for i := range wantOverage {
		r := h.do("POST", "/v1/exports/csv", "X-Customer-Id", "cust_small")
		r.forwarded(t, 200)
		if st := parseRateLimit(t, r.header.Get("RateLimit"))["exports"]; st == nil || st["r"] != max(1-int64(i), 0) {
			t.Errorf("request %d: RateLimit %q", i, r.header.Get("RateLimit"))
		}
	}
	us := h.rec.usages("cust_small", "exports")
	if len(us) != len(wantOverage) {
		t.Fatalf("recorded %d usages, want %d", len(us), len(wantOverage))
	}
	for i, u := range us {
		if u.Quantity != 1 || u.Overage != wantOverage[i] {
			t.Errorf("usage %d: quantity %d overage %d, want 1 and %d", i, u.Quantity, u.Overage, wantOverage[i])
		}
	}
	h.checkUsage("cust_small", "exports", 4)
	if n := h.hits(); n != 4 {
		t.Errorf("%d requests reached the upstream, want 4", n)
	}
}

func TestShadow(t *testing.T) {
	for _, global := range []bool{false, true} {
		t.Run(map[bool]string{false: "route", true: "global"}[global], func(t *testing.T) {
			h := startDefault(t, func(c *config.Config) {
				if global {
					c.Shadow = true
				} else {
					for i := range c.Routes {
						c.Routes[i].Shadow = true
					}
				}
			})
			// Over a hard limit: forwarded, and counted as overage.
			h.do("GET", "/v1/calls/x", "X-Customer-Id", "cust_zero").forwarded(t, 200)
			h.checkUsage("cust_zero", "api_calls", 1)
			if q, o := h.rec.total("cust_zero", "api_calls"); q != 1 || o != 1 {
				t.Errorf("recorded quantity %d overage %d, want 1 and 1", q, o)
			}
			// Not entitled: forwarded too.
			h.do("GET", "/v1/ghost", "X-Customer-Id", "cust_acme").forwarded(t, 200)
			// Shadow never refuses, not even a request without identity; nothing is counted.
			h.do("GET", "/v1/calls/x").forwarded(t, 200)
			h.checkUsage("cust_zero", "api_calls", 1)
			if n := h.hits(); n != 3 {
				t.Errorf("%d requests reached the upstream, want 3", n)
			}
		})
	}
}

func TestReplicaNotReady(t *testing.T) {
	h := startDefault(t)
	h.src.SetReady(false)

	r := h.do("POST", "/v1/chat/x", "X-Customer-Id", "cust_new")
	p := r.refused(t, 503, "replica_not_ready")
	if p.CustomerID != "cust_new" || p.Detail == "" {
		t.Errorf("problem %+v", p)
	}
	if ra, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || ra < 1 {
		t.Errorf("Retry-After %q", r.header.Get("Retry-After"))
	}
	if n := h.hits(); n != 0 {
		t.Errorf("the refused request reached the upstream")
	}

	// on_unavailable: allow forwards, unchecked and uncounted.
	e := h.do("GET", "/v1/open/x", "X-Customer-Id", "cust_new").forwarded(t, 200)
	if v, ok := upstreamHeader(e, "X-Forwarded-For"); !ok || v != "127.0.0.1" {
		t.Errorf("X-Forwarded-For %q", v)
	}
	if n := h.hits(); n != 1 {
		t.Errorf("%d requests reached the upstream, want 1", n)
	}
	if len(h.rec.usages("cust_new", "api_calls")) != 0 {
		t.Error("usage recorded for an unchecked request")
	}

	// A customer the replica already knows is decided as usual.
	h.do("POST", "/v1/chat/x", "X-Customer-Id", "cust_acme").forwarded(t, 200)
	h.do("GET", "/v1/calls/x", "X-Customer-Id", "cust_zero").refused(t, 429, "usage_limit_exceeded")

	// Once ready, an unknown customer is unknown.
	h.src.SetReady(true)
	h.do("POST", "/v1/chat/x", "X-Customer-Id", "cust_new").refused(t, 403, "customer_unknown")
	h.do("GET", "/v1/open/x", "X-Customer-Id", "cust_new").refused(t, 403, "customer_unknown")
}

func TestUnmatched(t *testing.T) {
	for _, policy := range []string{"allow", "deny"} {
		t.Run(policy, func(t *testing.T) {
			h := startDefault(t, func(c *config.Config) { c.Unmatched = policy })
			r := h.do("GET", "/v2/anything", "X-Customer-Id", "cust_acme")
			if policy == "allow" {
				// The trusted identity header still names the customer upstream.
				if v, ok := upstreamHeader(r.forwarded(t, 200), "X-Customer-Id"); !ok || v != "cust_acme" {
					t.Errorf("unmatched request reached the upstream with X-Customer-Id %q (present %v), want cust_acme", v, ok)
				}
				// No identity needed on an unmatched route.
				h.do("GET", "/v2/anything").forwarded(t, 200)
				if n := h.hits(); n != 2 {
					t.Errorf("%d requests reached the upstream, want 2", n)
				}
				return
			}
			p := r.refused(t, 403, "route_not_allowed")
			if p.Feature != "" {
				t.Errorf("problem %+v", p)
			}
			// A method filter that does not match is unmatched too.
			h.do("DELETE", "/v1/beta", "X-Customer-Id", "cust_acme").refused(t, 403, "route_not_allowed")
			if n := h.hits(); n != 0 {
				t.Errorf("%d refused requests reached the upstream", n)
			}
		})
	}
}

// TestUnmatchedWithAPIKeys: with API keys, a client cannot name a customer upstream on a
// route that is not checked.
func TestUnmatchedWithAPIKeys(t *testing.T) {
	h := startDefault(t, func(c *config.Config) {
		c.Identity.APIKey = &config.APIKey{Header: "Authorization", Scheme: "Bearer"}
	})
	e := h.do("GET", "/v2/anything", "X-Customer-Id", "cust_acme").forwarded(t, 200)
	if v, ok := upstreamHeader(e, "X-Customer-Id"); ok {
		t.Errorf("client-sent X-Customer-Id %q reached the upstream", v)
	}
}

func TestAPIKeyIdentity(t *testing.T) {
	h := startDefault(t, func(c *config.Config) {
		c.Identity.APIKey = &config.APIKey{Header: "Authorization", Scheme: "Bearer"}
	})
	cases := []struct {
		name     string
		hdr      []string
		status   int
		reason   string
		customer string // on success, what the upstream sees
	}{
		{"key", []string{"Authorization", "Bearer key-acme"}, 200, "", "cust_acme"},
		{"scheme in any case", []string{"Authorization", "bearer   key-acme "}, 200, "", "cust_acme"},
		{"spoofed customer header replaced", []string{"Authorization", "Bearer key-acme", "X-Customer-Id", "cust_zero"}, 200, "", "cust_acme"},
		{"customer header does not identify", []string{"X-Customer-Id", "cust_acme"}, 401, "customer_missing", ""},
		{"no key", nil, 401, "customer_missing", ""},
		{"bad scheme", []string{"Authorization", "Basic a2V5LWFjbWU6"}, 401, "api_key_invalid", ""},
		{"scheme without separator", []string{"Authorization", "Bearerkey-acme"}, 401, "api_key_invalid", ""},
		{"scheme only", []string{"Authorization", "Bearer"}, 401, "api_key_invalid", ""},
		{"unknown key", []string{"Authorization", "Bearer key-unknown"}, 401, "api_key_invalid", ""},
		{"key with a space", []string{"Authorization", "Bearer key acme"}, 401, "api_key_invalid", ""},
		{"other customer's key", []string{"Authorization", "Bearer key-small"}, 403, "feature_not_entitled", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := h.hits()
			r := h.do("POST", "/v1/chat/x", tc.hdr...)
			if tc.status == 200 {
				e := r.forwarded(t, 200)
				if got, _ := upstreamHeader(e, "X-Customer-Id"); got != tc.customer {
					t.Errorf("upstream X-Customer-Id %q, want %q", got, tc.customer)
				}
				return
			}
			p := r.refused(t, tc.status, tc.reason)
			if tc.status == 401 {
				if got := r.header.Get("WWW-Authenticate"); got != `Bearer realm="gatehouse"` {
					t.Errorf("WWW-Authenticate %q", got)
				}
				if p.CustomerID != "" {
					t.Errorf("customer_id %q on a 401", p.CustomerID)
				}
			} else if p.CustomerID != "cust_small" {
				t.Errorf("customer_id %q, want the key's customer", p.CustomerID)
			}
			if h.hits() != before {
				t.Error("a refused request reached the upstream")
			}
		})
	}
	// Replica not ready and the key unknown: 503 for a deny route.
	h.src.SetReady(false)
	h.do("POST", "/v1/chat/x", "Authorization", "Bearer key-new").refused(t, 503, "replica_not_ready")
	h.do("POST", "/v1/chat/x", "Authorization", "Bearer key-acme").forwarded(t, 200)
}

func TestAPIKeyWithoutScheme(t *testing.T) {
	h := startDefault(t, func(c *config.Config) {
		c.Identity.APIKey = &config.APIKey{Header: "X-Api-Key"}
	})
	h.do("POST", "/v1/chat/x", "X-Api-Key", "key-acme").forwarded(t, 200)
	h.do("POST", "/v1/chat/x", "X-Api-Key", "Bearer key-acme").refused(t, 401, "api_key_invalid")
	h.do("POST", "/v1/chat/x", "Authorization", "Bearer key-acme").refused(t, 401, "customer_missing")
}

// TestStaticHeaders: the route's static values reach the upstream; a customer without the
// static feature gets no header and is still admitted.
func TestStaticHeaders(t *testing.T) {
	h := startDefault(t)
	cases := []struct {
		customer string
		tier     string // "" when absent
	}{
		{"cust_acme", "24/7"},
		{"cust_zero", "business, eu"},
		{"cust_small", ""},
	}
	for _, tc := range cases {
		t.Run(tc.customer, func(t *testing.T) {
			e := h.do("GET", "/v1/tier", "X-Customer-Id", tc.customer, "X-Support-Tier", "platinum").forwarded(t, 200)
			got, ok := upstreamHeader(e, "X-Support-Tier")
			if tc.tier == "" && ok || got != tc.tier {
				t.Errorf("upstream X-Support-Tier %q (present %v), want %q", got, ok, tc.tier)
			}
		})
	}
}

// TestSpoofedHeaders: whatever the client sends of the headers gatehouse sets is replaced.
func TestSpoofedHeaders(t *testing.T) {
	h := startDefault(t)
	r := h.raw("POST /v1/chat/x HTTP/1.1\r\nHost: api.example\r\n" +
		"X-Customer-Id: cust_acme\r\n" +
		"x-customer-id: cust_zero\r\n" +
		"X-Support-Tier: platinum\r\nX-SUPPORT-TIER: diamond\r\n" +
		"X-Models: everything\r\n" +
		"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n" +
		"Content-Length: 0\r\n\r\n")
	e := r.forwarded(t, 200)
	for name, want := range map[string]string{
		"X-Customer-Id": "cust_acme", "X-Support-Tier": "24/7", "X-Models": `{"allow":["small","large"]}`,
		"X-Forwarded-For": "127.0.0.1",
	} {
		if got, _ := upstreamHeader(e, name); got != want {
			t.Errorf("upstream %s = %q, want %q", name, got, want)
		}
	}
}

// TestHopByHop: hop-by-hop headers and every header that Connection names are not
// forwarded, in either direction, and Connection cannot take the identity away.
func TestHopByHop(t *testing.T) {
	h := startDefault(t)
	r := h.raw("POST /v1/chat/x HTTP/1.1\r\nHost: api.example\r\n" +
		"X-Customer-Id: cust_acme\r\n" +
		"Connection: keep-alive, X-Secret, X-Customer-Id\r\n" +
		"Connection: X-Support-Tier , x-other\r\n" +
		"X-Secret: s\r\nX-Other: o\r\nX-Kept: k\r\n" +
		"X-Support-Tier: platinum\r\n" +
		"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Trailing\r\nUpgrade: h2c\r\n" +
		"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\n" +
		"X-Echo-Response-Header: Keep-Alive: timeout=9\r\n" +
		"X-Echo-Response-Header: Upgrade: h2c\r\n" +
		"X-Echo-Response-Header: Proxy-Authenticate: Basic\r\n" +
		"Transfer-Encoding: chunked\r\n\r\n" +
		"5\r\nhello\r\n0\r\n\r\n")
	e := r.forwarded(t, 200)
	for _, name := range []string{"Connection", "Keep-Alive", "Te", "Trailer", "Upgrade", "Proxy-Connection",
		"Proxy-Authorization", "Transfer-Encoding", "X-Secret", "X-Other"} {
		if v, ok := upstreamHeader(e, name); ok {
			t.Errorf("upstream got %s: %q", name, v)
		}
	}
	for name, want := range map[string]string{"X-Kept": "k", "X-Customer-Id": "cust_acme", "X-Support-Tier": "24/7"} {
		if got, _ := upstreamHeader(e, name); got != want {
			t.Errorf("upstream %s = %q, want %q", name, got, want)
		}
	}
	if e.BodySize != 5 {
		t.Errorf("upstream body size %d, want 5", e.BodySize)
	}
	for _, name := range []string{"Keep-Alive", "Upgrade", "Proxy-Authenticate"} {
		if v := r.header.Get(name); v != "" {
			t.Errorf("client got %s: %q", name, v)
		}
	}
	h.checkUsage("cust_acme", "api_calls", 1)
}

// TestConnectionCannotSmuggleIdentity: a client that lists the identity header in
// Connection still gets identified, and the upstream sees the right customer.
func TestConnectionCannotSmuggleIdentity(t *testing.T) {
	h := startDefault(t)
	e := h.do("POST", "/v1/chat/x", "X-Customer-Id", "cust_acme", "Connection", "X-Customer-Id").forwarded(t, 200)
	if got, _ := upstreamHeader(e, "X-Customer-Id"); got != "cust_acme" {
		t.Errorf("upstream X-Customer-Id %q", got)
	}
	h.do("POST", "/v1/chat/x", "X-Customer-Id", "cust_small", "Connection", "X-Customer-Id").refused(t, 403, "feature_not_entitled")
	h.do("POST", "/v1/chat/x", "Connection", "X-Customer-Id").refused(t, 401, "customer_missing")
	// Naming the request's own framing headers in Connection does not break forwarding.
	r := h.raw("POST /v1/chat/x HTTP/1.1\r\nHost: api.example\r\nX-Customer-Id: cust_acme\r\n" +
		"Connection: Host, Content-Length, Content-Type\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc")
	if e := r.forwarded(t, 200); e.BodySize != 3 {
		t.Errorf("upstream body size %d, want 3", e.BodySize)
	}
}

func TestForwardedFor(t *testing.T) {
	h := startDefault(t)
	e := h.do("GET", "/v1/free/x", "X-Customer-Id", "cust_acme", "X-Forwarded-For", "1.2.3.4, 5.6.7.8").forwarded(t, 200)
	if got, _ := upstreamHeader(e, "X-Forwarded-For"); got != "127.0.0.1" {
		t.Errorf("X-Forwarded-For %q, want the peer 127.0.0.1", got)
	}
}

func TestCostSources(t *testing.T) {
	cases := []struct {
		name   string
		path   string
		hdr    []string
		status int
		reason string
		cost   int64 // committed api_calls
	}{
		{"fixed cost", "/v1/heavy", nil, 200, "", 5},
		{"default cost 1", "/v1/calls/x", nil, 200, "", 1},
		{"request header", "/v1/bulk", []string{"X-Cost", "7"}, 200, "", 7},
		{"request header with spaces", "/v1/bulk", []string{"X-Cost", " 8 "}, 200, "", 8},
		{"request header 0", "/v1/bulk", []string{"X-Cost", "0"}, 200, "", 0},
		{"request header at max", "/v1/bulk", []string{"X-Cost", "100"}, 200, "", 100},
		{"request header missing, no default", "/v1/bulk", nil, 400, "cost_invalid", 0},
		{"request header over max", "/v1/bulk", []string{"X-Cost", "101"}, 400, "cost_invalid", 0},
		{"request header negative", "/v1/bulk", []string{"X-Cost", "-1"}, 400, "cost_invalid", 0},
		{"request header garbage", "/v1/bulk", []string{"X-Cost", "abc"}, 400, "cost_invalid", 0},
		{"request header fraction", "/v1/bulk", []string{"X-Cost", "1.5"}, 400, "cost_invalid", 0},
		{"request header plus", "/v1/bulk", []string{"X-Cost", "+3"}, 400, "cost_invalid", 0},
		{"request header huge", "/v1/bulk", []string{"X-Cost", "99999999999999999999999"}, 400, "cost_invalid", 0},
		{"request header missing, default", "/v1/bulkdef", nil, 200, "", 2},
		{"request header overrides default", "/v1/bulkdef", []string{"X-Cost", "3"}, 200, "", 3},
		{"request header bad with default", "/v1/bulkdef", []string{"X-Cost", "x"}, 400, "cost_invalid", 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := startDefault(t)
			r := h.do("POST", tc.path, append([]string{"X-Customer-Id", "cust_acme"}, tc.hdr...)...)
			if tc.status == 200 {
				r.forwarded(t, 200)
				if st := parseRateLimit(t, r.header.Get("RateLimit"))["api_calls"]; st["r"] != 1000-tc.cost {
					t.Errorf("RateLimit %q, want r=%d", r.header.Get("RateLimit"), 1000-tc.cost)
				}
			} else {
				p := r.refused(t, tc.status, tc.reason)
				if p.Feature != "api_calls" || p.CustomerID != "cust_acme" {
					t.Errorf("problem %+v", p)
				}
				if h.hits() != 0 {
					t.Error("a refused request reached the upstream")
				}
			}
			h.checkUsage("cust_acme", "api_calls", tc.cost)
			if q, _ := h.rec.total("cust_acme", "api_calls"); q != tc.cost {
				t.Errorf("recorded %d, want %d", q, tc.cost)
			}
		})
	}
}

// TestCostResponseHeader: the upstream names the cost in a response header; it is
// committed and the header does not reach the client.
func TestCostResponseHeader(t *testing.T) {
	h := startDefault(t)
	send := func(value string) *clientResponse {
		t.Helper()
		return h.do("POST", "/v1/gen", "X-Customer-Id", "cust_small", "X-Echo-Response-Header", "X-Tokens-Used: "+value)
	}
	r := send("30")
	r.forwarded(t, 200)
	if v := r.header.Get("X-Tokens-Used"); v != "" {
		t.Errorf("client got X-Tokens-Used: %q", v)
	}
	h.checkUsage("cust_small", "tokens", 30)
	if us := h.rec.usages("cust_small", "tokens"); len(us) != 1 || us[0].Quantity != 30 || us[0].Overage != 0 {
		t.Errorf("recorded %+v, want 30", us)
	}
	// A bad value commits what was reserved (0), and is removed all the same.
	for _, bad := range []string{"abc", "-5", "1e3", "1000001"} {
		r := send(bad)
		r.forwarded(t, 200)
		if v := r.header.Get("X-Tokens-Used"); v != "" {
			t.Errorf("client got X-Tokens-Used: %q", v)
		}
	}
	h.checkUsage("cust_small", "tokens", 30)
	// No header: nothing to commit.
	h.do("POST", "/v1/gen", "X-Customer-Id", "cust_small").forwarded(t, 200)
	h.checkUsage("cust_small", "tokens", 30)
	// The response may take the usage over a hard limit (the cost was unknown before);
	// then the next request is refused.
	send("80").forwarded(t, 200)
	h.checkUsage("cust_small", "tokens", 110)
	if us := h.rec.usages("cust_small", "tokens"); len(us) != 2 || us[1].Quantity != 80 || us[1].Overage != 10 {
		t.Errorf("recorded %+v, want 80 with overage 10", us)
	}
	p := send("1").refused(t, 429, "usage_limit_exceeded")
	if *p.Used != 110 || *p.Limit != 100 || p.Feature != "tokens" {
		t.Errorf("problem %+v", p)
	}
	// On the chat route, tokens is unlimited for cust_acme: counted, no RateLimit item.
	r = h.do("POST", "/v1/chat/x", "X-Customer-Id", "cust_acme", "X-Echo-Response-Header", "X-Tokens-Used: 1234")
	r.forwarded(t, 200)
	h.checkUsage("cust_acme", "tokens", 1234)
	h.checkUsage("cust_acme", "api_calls", 1)
	if _, ok := parseRateLimit(t, r.header.Get("RateLimit"))["tokens"]; ok {
		t.Errorf("RateLimit %q has the unlimited feature", r.header.Get("RateLimit"))
	}
}

// TestRateLimitAfterDeferredCost: the RateLimit remaining on a response whose cost came
// from the response must count that cost.
func TestRateLimitAfterDeferredCost(t *testing.T) {
	h := startDefault(t)
	r := h.do("POST", "/v1/gen", "X-Customer-Id", "cust_small", "X-Echo-Response-Header", "X-Tokens-Used: 30")
	r.forwarded(t, 200)
	h.checkUsage("cust_small", "tokens", 30)
	if st := parseRateLimit(t, r.header.Get("RateLimit"))["tokens"]; st["r"] != 70 {
		t.Errorf("RateLimit %q after using 30 of 100, want r=70", r.header.Get("RateLimit"))
	}
}

// TestRefund: a 5xx from the upstream or a transport error gives the cost back.
func TestRefund(t *testing.T) {
	t.Run("5xx", func(t *testing.T) {
		h := startDefault(t)
		for _, status := range []string{"500", "502", "503", "599"} {
			r := h.do("POST", "/v1/chat/x", "X-Customer-Id", "cust_acme", "X-Echo-Status", status,
				"X-Echo-Response-Header", "X-Tokens-Used: 10")
			if strconv.Itoa(r.status) != status || r.echo == nil {
				t.Errorf("status %d body %s, want the upstream's %s", r.status, r.body, status)
			}
		}
		h.checkUsage("cust_acme", "api_calls", 0)
		h.checkUsage("cust_acme", "tokens", 0)
		if len(h.rec.usages("cust_acme", "api_calls")) != 0 {
			t.Error("usage recorded for refunded requests")
		}
		// 4xx is served, so it counts.
		h.do("POST", "/v1/chat/x", "X-Customer-Id", "cust_acme", "X-Echo-Status", "404").forwarded(t, 404)
		h.checkUsage("cust_acme", "api_calls", 1)
	})
	t.Run("upstream down", func(t *testing.T) {
		cfg := testConfig(testRoutes()...)
		cfg.Upstream.URL = "http://" + closedAddr(t)
		h := startHarness(t, cfg, testCustomers(t)...)
		for _, method := range []string{"POST", "GET"} {
			r := h.do(method, "/v1/calls/x", "X-Customer-Id", "cust_small")
			if r.status != 502 || r.problem == nil || r.problem.Reason != "upstream_unavailable" || r.problem.Status != 502 {
				t.Errorf("%s: status %d body %s, want 502 upstream_unavailable", method, r.status, r.body)
			}
		}
		h.checkUsage("cust_small", "api_calls", 0)
		if len(h.rec.usages("cust_small", "api_calls")) != 0 {
			t.Error("usage recorded for failed requests")
		}
	})
	t.Run("upstream timeout", func(t *testing.T) {
		h := startDefault(t, func(c *config.Config) { c.Upstream.Timeout = 100 * time.Millisecond })
		for i, method := range []string{"POST", "GET"} {
			r := h.do(method, "/v1/calls/x", "X-Customer-Id", "cust_small", "X-Test-Delay", "400ms")
			if r.status != 504 || r.problem == nil || r.problem.Reason != "upstream_timeout" || r.problem.Status != 504 {
				t.Errorf("%s: status %d body %s, want 504 upstream_timeout", method, r.status, r.body)
			}
			// Sent once: a request that timed out is not retried, even when idempotent.
			if n := h.hits(); n != int64(i+1) {
				t.Errorf("%s: the upstream got %d requests in all, want %d", method, n, i+1)
			}
		}
		h.checkUsage("cust_small", "api_calls", 0)
		// The limit is whole again: two requests fit, and the connection is not confused
		// by the late answers.
		for i := 0; i < 2; i++ {
			e := h.do("POST", "/v1/calls/ok", "X-Customer-Id", "cust_small").forwarded(t, 200)
			if e.Path != "/v1/calls/ok" {
				t.Errorf("answer for %s", e.Path)
			}
		}
		h.checkUsage("cust_small", "api_calls", 2)
	})
}

// TestPathNormalisation: the route is matched on the normalised path, and the upstream is
// sent exactly the path that was matched.
func TestPathNormalisation(t *testing.T) {
	h := startDefault(t, func(c *config.Config) { c.Unmatched = "deny" })
	cases := []struct {
		name    string
		target  string
		matched string // the path the upstream must see; "" when refused
		reason  string
	}{
		{"dot-dot into a metered route", "/v1/free/../chat/x", "/v1/chat/x", ""},
		{"dot-dot out of a metered route", "/v1/chat/../free/x", "/v1/free/x", ""},
		{"dot segments", "/v1/./chat/./x", "/v1/chat/x", ""},
		{"double slashes", "//v1//chat//x", "/v1/chat/x", ""},
		{"encoded dot-dot", "/v1/free/%2e%2e/chat/x", "/v1/chat/x", ""},
		{"encoded slash makes a deeper path", "/v1/chat/a%2Fb", "", "route_not_allowed"},
		{"above the root", "/../../v1/chat/x", "/v1/chat/x", ""},
		{"absolute form", "http://other.example/v1/free/../chat/x", "/v1/chat/x", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before, _ := h.usage("cust_acme", "api_calls")
			r := h.raw("POST " + tc.target + " HTTP/1.1\r\nHost: api.example\r\nX-Customer-Id: cust_acme\r\nContent-Length: 0\r\n\r\n")
			if tc.matched == "" {
				r.refused(t, 403, tc.reason)
				return
			}
			e := r.forwarded(t, 200)
			if got := r.header.Get("X-Upstream-Uri"); got != tc.matched || e.Path != tc.matched {
				t.Errorf("upstream was sent %q (path %q), want %q", got, e.Path, tc.matched)
			}
			after, _ := h.usage("cust_acme", "api_calls")
			if metered := strings.HasPrefix(tc.matched, "/v1/chat/"); metered != (after == before+1) {
				t.Errorf("api_calls went from %d to %d for %s", before, after, tc.matched)
			}
		})
	}
	// The same trick cannot reach a route the customer is not entitled to.
	h.raw("POST /v1/free/../chat/x HTTP/1.1\r\nHost: a\r\nX-Customer-Id: cust_small\r\nContent-Length: 0\r\n\r\n").
		refused(t, 403, "feature_not_entitled")
}

// TestRoutePatternsEndToEnd: exact, /*, /**, method filters and first match wins, through
// the proxy, with unmatched requests denied.
func TestRoutePatternsEndToEnd(t *testing.T) {
	cfg := testConfig(
		config.Route{Name: "special", Path: "/v1/first/special", Features: []config.RouteFeature{feat("beta")}},
		config.Route{Name: "first", Path: "/v1/first/*"},
		config.Route{Name: "exact", Path: "/v1/exact"},
		config.Route{Name: "one", Path: "/v1/one/*"},
		config.Route{Name: "deep", Path: "/v1/deep/**"},
		config.Route{Name: "post", Method: "POST", Path: "/v1/m"},
		config.Route{Name: "root", Path: "/"},
	)
	cfg.Unmatched = "deny"
	h := startHarness(t, cfg, testCustomers(t)...)
	cases := []struct {
		method, path string
		status       int
		reason       string
	}{
		{"GET", "/v1/first/special", 403, "feature_not_entitled"},
		{"GET", "/v1/first/other", 200, ""},
		{"GET", "/v1/exact", 200, ""},
		{"GET", "/v1/exact/", 403, "route_not_allowed"},
		{"GET", "/v1/exactly", 403, "route_not_allowed"},
		{"GET", "/v1/one/a", 200, ""},
		{"GET", "/v1/one/", 403, "route_not_allowed"},
		{"GET", "/v1/one", 403, "route_not_allowed"},
		{"GET", "/v1/one/a/b", 403, "route_not_allowed"},
		{"GET", "/v1/oneself", 403, "route_not_allowed"},
		{"GET", "/v1/deep", 200, ""},
		{"GET", "/v1/deep/", 200, ""},
		{"GET", "/v1/deep/a/b/c", 200, ""},
		{"GET", "/v1/deeper", 403, "route_not_allowed"},
		{"POST", "/v1/m", 200, ""},
		{"GET", "/v1/m", 403, "route_not_allowed"},
		{"post", "/v1/m", 403, "route_not_allowed"},
		{"GET", "/", 200, ""},
	}
	for _, tc := range cases {
		r := h.do(tc.method, tc.path, "X-Customer-Id", "cust_acme")
		if tc.status == 200 {
			if r.status != 200 || r.echo == nil || r.echo.Path != tc.path {
				t.Errorf("%s %s: status %d body %s, want forwarded", tc.method, tc.path, r.status, r.body)
			}
			continue
		}
		if r.status != tc.status || r.problem == nil || r.problem.Reason != tc.reason {
			t.Errorf("%s %s: status %d body %s, want %d %s", tc.method, tc.path, r.status, r.body, tc.status, tc.reason)
		}
	}
}

func TestPatternMatch(t *testing.T) {
	cases := []struct {
		pattern string
		match   []string
		miss    []string
	}{
		{"/v1/exact", []string{"/v1/exact"}, []string{"/v1/exact/", "/v1/exac", "/v1/exactly", "/v1", "/"}},
		{"/", []string{"/"}, []string{"/a", ""}},
		{"/v1/chat/*", []string{"/v1/chat/x", "/v1/chat/completions", "/v1/chat/a.b"},
			[]string{"/v1/chat", "/v1/chat/", "/v1/chat/x/", "/v1/chat/x/y", "/v1/chatx", "/v1/chatx/y", "/v2/chat/x"}},
		{"/v1/files/**", []string{"/v1/files", "/v1/files/", "/v1/files/a", "/v1/files/a/b/c"},
			[]string{"/v1/filesx", "/v1/filesx/a", "/v1/file", "/v1"}},
		{"/**", []string{"/", "/a", "/a/b"}, nil},
		{"/*", []string{"/a"}, []string{"/", "/a/", "/a/b"}},
	}
	for _, tc := range cases {
		p, err := parsePattern(tc.pattern)
		if err != nil {
			t.Errorf("parsePattern(%q): %v", tc.pattern, err)
			continue
		}
		for _, path := range tc.match {
			if !p.match([]byte(path)) {
				t.Errorf("%q does not match %q", tc.pattern, path)
			}
		}
		for _, path := range tc.miss {
			if p.match([]byte(path)) {
				t.Errorf("%q matches %q", tc.pattern, path)
			}
		}
	}
	for _, bad := range []string{"", "v1/x", "/v1/*/x", "/v1/x*", "/v1/**/x", "/v1/x?y", "/v1/#", "/v1/***"} {
		if _, err := parsePattern(bad); err == nil {
			t.Errorf("parsePattern(%q) accepted", bad)
		}
	}
}

func TestRouteTableMatch(t *testing.T) {
	cfg := testConfig(
		config.Route{Name: "chat-post", Method: "POST", Path: "/v1/chat/*"},
		config.Route{Name: "chat-any", Path: "/v1/chat/**"},
		config.Route{Name: "exact", Path: "/v1/models"},
		config.Route{Name: "all", Path: "/**"},
	)
	tbl, err := compile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct{ method, path, route string }{
		{"POST", "/v1/chat/x", "chat-post"},
		{"GET", "/v1/chat/x", "chat-any"},
		{"POST", "/v1/chat/x/y", "chat-any"},
		{"GET", "/v1/models", "exact"},
		{"GET", "/v1/models/x", "all"},
		{"GET", "/", "all"},
	}
	for _, tc := range cases {
		r := tbl.match([]byte(tc.method), []byte(tc.path))
		if r == nil || r.name != tc.route {
			t.Errorf("%s %s matched %v, want %s", tc.method, tc.path, r, tc.route)
		}
	}
	cfg.Routes = cfg.Routes[:3]
	tbl, _ = compile(cfg)
	if r := tbl.match([]byte("GET"), []byte("/v2")); r != nil {
		t.Errorf("/v2 matched %s", r.name)
	}
	cfg.Routes = append(cfg.Routes, config.Route{Name: "bad", Path: "/v1/*/x"})
	if _, err := compile(cfg); err == nil {
		t.Error("compile accepted a * in the middle of a path")
	}
}

// TestNeverResets: a limit whose window never resets asks the client to come back much
// later, and the RateLimit fields carry no window or reset time.
func TestNeverResets(t *testing.T) {
	h := startHarness(t, testConfig(testRoutes()...), testSnap(t, "cust_trial",
		`"api_calls": {"type": "metered", "usage_limit": 1, "usage_reset_period": "NEVER"}`))
	r := h.do("GET", "/v1/calls/x", "X-Customer-Id", "cust_trial")
	r.forwarded(t, 200)
	if pol, st := r.header.Get("RateLimit-Policy"), r.header.Get("RateLimit"); pol != `"api_calls";q=1` || st != `"api_calls";r=0` {
		t.Errorf("RateLimit-Policy %q, RateLimit %q", pol, st)
	}
	r = h.do("GET", "/v1/calls/x", "X-Customer-Id", "cust_trial")
	p := r.refused(t, 429, "usage_limit_exceeded")
	if *p.Limit != 1 || *p.Used != 1 {
		t.Errorf("problem %+v", p)
	}
	if ra := r.header.Get("Retry-After"); ra != "3600" {
		t.Errorf("Retry-After %q, want 3600", ra)
	}
	if st := r.header.Get("RateLimit"); st != `"api_calls";r=0` {
		t.Errorf("RateLimit %q", st)
	}
}

// TestReload swaps the routes while serving.
func TestReload(t *testing.T) {
	h := startDefault(t)
	h.do("GET", "/v2/x", "X-Customer-Id", "cust_acme").forwarded(t, 200)
	cfg := testConfig(testRoutes()...)
	cfg.Unmatched = "deny"
	if err := h.p.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	h.do("GET", "/v2/x", "X-Customer-Id", "cust_acme").refused(t, 403, "route_not_allowed")
	cfg = testConfig(config.Route{Name: "bad", Path: "no-slash"})
	if err := h.p.Reload(cfg); err == nil {
		t.Error("Reload accepted a bad route")
	}
	h.do("GET", "/v2/x", "X-Customer-Id", "cust_acme").refused(t, 403, "route_not_allowed")
}
