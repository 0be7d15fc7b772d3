package proxy

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gatehouse-dev/gatehouse/config"
)

// TestHostileInput: what fasthttp cannot or must not read is answered by the proxy
// itself with a problem body, and never reaches the upstream.
func TestHostileInput(t *testing.T) {
	h := startDefault(t, func(c *config.Config) {
		c.Server.MaxHeaderBytes = 4096
		c.Server.MaxBodyBytes = 1024
	})
	const head = "POST /v1/chat/x HTTP/1.1\r\nHost: api.example\r\nX-Customer-Id: cust_acme\r\n"
	var many strings.Builder
	for i := 0; i < 300; i++ {
		fmt.Fprintf(&many, "X-Many-%d: %s\r\n", i, strings.Repeat("v", 20))
	}
	chunked := strings.Repeat("400\r\n"+strings.Repeat("b", 0x400)+"\r\n", 2) + "0\r\n\r\n"
	cases := []struct {
		name    string
		request string
		status  int
		reason  string
	}{
		{"one oversized header", head + "X-Big: " + strings.Repeat("a", 8000) + "\r\nContent-Length: 0\r\n\r\n", 431, "headers_too_large"},
		{"too many headers", head + many.String() + "Content-Length: 0\r\n\r\n", 431, "headers_too_large"},
		{"oversized request line", "GET /" + strings.Repeat("p", 8000) + " HTTP/1.1\r\nHost: a\r\n\r\n", 431, "headers_too_large"},
		{"oversized body", head + "Content-Length: 4096\r\n\r\n" + strings.Repeat("b", 4096), 413, "body_too_large"},
		{"oversized chunked body", head + "Transfer-Encoding: chunked\r\n\r\n" + chunked, 413, "body_too_large"},
		{"garbage request line", "GARBAGE\r\n\r\n", 400, "malformed_request"},
		{"request line without version", "GET /v1/chat/x\r\nHost: a\r\n\r\n", 400, "malformed_request"},
		{"bad content length", head + "Content-Length: abc\r\n\r\n", 400, "malformed_request"},
		{"negative content length", head + "Content-Length: -1\r\n\r\n", 400, "malformed_request"},
		{"bad chunk size", head + "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400, "malformed_request"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := h.raw(tc.request)
			p := r.refused(t, tc.status, tc.reason)
			if p.CustomerID != "" || p.Feature != "" {
				t.Errorf("problem %+v", p)
			}
		})
	}
	if n := h.hits(); n != 0 {
		t.Errorf("%d hostile requests reached the upstream", n)
	}
	h.checkUsage("cust_acme", "api_calls", 0)
	// Just under the limits still works.
	r := h.raw(head + "X-Fill: " + strings.Repeat("a", 3000) + "\r\nContent-Length: 1024\r\n\r\n" + strings.Repeat("b", 1024))
	if e := r.forwarded(t, 200); e.BodySize != 1024 {
		t.Errorf("upstream body size %d", e.BodySize)
	}
}

// TestExpectContinue: a client that waits for 100 Continue is served once.
func TestExpectContinue(t *testing.T) {
	h := startDefault(t)
	r := h.doBody("POST", "/v1/chat/x", strings.Repeat("b", 100), "X-Customer-Id", "cust_acme", "Expect", "100-continue")
	if e := r.forwarded(t, 200); e.BodySize != 100 {
		t.Errorf("upstream body size %d", e.BodySize)
	}
	h.checkUsage("cust_acme", "api_calls", 1)
}

// TestIdentityValues: odd identity values are refused cleanly, and the problem body is
// valid JSON whatever the value holds.
func TestIdentityValues(t *testing.T) {
	h := startDefault(t)
	for _, id := range []string{"cust acme", "cust_acme\x01", `"}{"x":1`, "cüst", "\xff\xfe", strings.Repeat("c", 2000), "cust_acme "} {
		r := h.raw("POST /v1/chat/x HTTP/1.1\r\nHost: a\r\nX-Customer-Id: " + id + "\r\nContent-Length: 0\r\n\r\n")
		if strings.TrimSpace(id) == "cust_acme" {
			r.forwarded(t, 200)
			continue
		}
		if r.status == 400 && r.problem != nil && r.problem.Reason == "malformed_request" {
			continue // fasthttp refused the header itself
		}
		p := r.refused(t, 403, "customer_unknown")
		if !strings.HasPrefix(id, "\xff") && !strings.Contains(id, "ü") && p.CustomerID != id {
			t.Errorf("customer_id %q, want %q", p.CustomerID, id)
		}
	}
	if n := h.hits(); n != 1 {
		t.Errorf("%d requests reached the upstream, want 1", n)
	}
}

// TestConcurrentHardLimitEndToEnd: 64 clients make 3,000 requests through the real proxy
// for one customer with a hard limit of 1,000. Exactly 1,000 are admitted, counted at the
// clients, at the upstream, in the limiter and by the recorder.
func TestConcurrentHardLimitEndToEnd(t *testing.T) {
	const (
		clients  = 64
		attempts = 3000
		limit    = 1000
	)
	cfg := testConfig(testRoutes()...)
	h := startHarness(t, cfg, testSnap(t, "cust_busy", `"api_calls": {"type": "metered", "usage_limit": 1000},
		"advanced_analytics": {"type": "boolean", "is_enabled": true}, "tokens": {"type": "metered"}`))
	var ok, limited, other, next atomic.Int64
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= attempts {
				r := h.do("POST", "/v1/chat/completions", "X-Customer-Id", "cust_busy")
				switch {
				case r.status == 200:
					ok.Add(1)
				case r.status == 429 && r.problem != nil && r.problem.Reason == "usage_limit_exceeded":
					limited.Add(1)
				default:
					other.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if ok.Load() != limit || limited.Load() != attempts-limit || other.Load() != 0 {
		t.Errorf("clients saw %d admitted, %d limited, %d other; want %d, %d, 0", ok.Load(), limited.Load(), other.Load(), limit, attempts-limit)
	}
	if n := h.hits(); n != limit {
		t.Errorf("%d requests reached the upstream, want %d", n, limit)
	}
	h.checkUsage("cust_busy", "api_calls", limit)
	if q, o := h.rec.total("cust_busy", "api_calls"); q != limit || o != 0 {
		t.Errorf("recorded %d with overage %d, want %d and 0", q, o, limit)
	}
}

// TestConcurrentRefunds: requests that fail upstream, interleaved with ones that succeed,
// never let more than the limit through and leave the counter exact.
func TestConcurrentRefunds(t *testing.T) {
	const clients, attempts = 32, 600
	h := startHarness(t, testConfig(testRoutes()...), testSnap(t, "cust_busy", `"api_calls": {"type": "metered", "usage_limit": 200}`))
	var ok, failed, next atomic.Int64
	var wg sync.WaitGroup
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > attempts {
					return
				}
				status := "200"
				if i%3 == 0 {
					status = "503"
				}
				r := h.do("GET", "/v1/calls/x", "X-Customer-Id", "cust_busy", "X-Echo-Status", status)
				switch r.status {
				case 200:
					ok.Add(1)
				case 503:
					failed.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	if ok.Load() > 200 {
		t.Errorf("%d admitted over a limit of 200", ok.Load())
	}
	h.checkUsage("cust_busy", "api_calls", ok.Load())
	if q, _ := h.rec.total("cust_busy", "api_calls"); q != ok.Load() {
		t.Errorf("recorded %d, want %d", q, ok.Load())
	}
	// What the failures gave back can still be used, up to the limit exactly.
	for n := ok.Load(); n < 200; n++ {
		h.do("GET", "/v1/calls/x", "X-Customer-Id", "cust_busy").forwarded(t, 200)
	}
	h.do("GET", "/v1/calls/x", "X-Customer-Id", "cust_busy").refused(t, 429, "usage_limit_exceeded")
	h.checkUsage("cust_busy", "api_calls", 200)
}
