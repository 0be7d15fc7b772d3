package proxy

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/echo"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttputil"
	"go.uber.org/zap"
)

// benchCustomers is how many customers the benchmarks spread requests over.
const benchCustomers = 10000

// inMemoryUpstream serves echo.FastHandler on an in-memory listener and returns a client
// that dials it.
func inMemoryUpstream(tb testing.TB) *fasthttp.HostClient {
	tb.Helper()
	ln := fasthttputil.NewInmemoryListener()
	srv := &fasthttp.Server{Handler: echo.FastHandler, NoDefaultDate: true, NoDefaultServerHeader: true}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(ln)
	}()
	tb.Cleanup(func() {
		_ = ln.Close()
		<-done
	})
	return &fasthttp.HostClient{Addr: "x", MaxConns: 1024, Dial: func(string) (net.Conn, error) { return ln.Dial() }}
}

// benchProxy is a proxy over benchCustomers customers, whose upstream is client. It is
// not listening: the benchmarks call Handle.
func benchProxy(tb testing.TB, client *fasthttp.HostClient) (*Proxy, [][]byte) {
	tb.Helper()
	snaps := make([]*limiter.Snapshot, benchCustomers)
	ids := make([][]byte, benchCustomers)
	for i := range snaps {
		id := fmt.Sprintf("cust_%05d", i)
		snaps[i] = testSnap(tb, id, `
			"api_calls":          {"type": "metered", "usage_limit": 4611686018427387904},
			"tokens":             {"type": "metered"},
			"advanced_analytics": {"type": "boolean", "is_enabled": true},
			"support_tier":       {"type": "static", "static_values": ["24/7"]}`)
		ids[i] = []byte(id)
	}
	cfg := testConfig(config.Route{Name: "chat", Method: "POST", Path: "/v1/chat/*", Features: []config.RouteFeature{
		{Feature: "api_calls", Cost: costOf(1)},
		{Feature: "tokens", CostResponseHeader: "X-Tokens-Used"},
		{Feature: "advanced_analytics"},
	}, Headers: map[string]string{"X-Support-Tier": "support_tier"}})
	cfg.Upstream.URL = "http://x"
	p, err := New(Options{Config: cfg, Source: limiter.NewMemorySource(snaps...), Limiter: limiter.New(),
		Recorder: &discardRecorder{}, Log: zap.NewNop(), Upstream: client})
	if err != nil {
		tb.Fatal(err)
	}
	return p, ids
}

// discardRecorder is a Recorder that keeps nothing: the benchmarks measure the proxy.
type discardRecorder struct{}

func (discardRecorder) Record([]limiter.Usage) error { return nil }

// benchRequest is the request the benchmarks send: a chat completion of one customer.
func benchRequest(req *fasthttp.Request, id []byte) {
	req.Reset()
	req.Header.SetMethod("POST")
	req.SetRequestURI("/v1/chat/completions")
	req.Header.SetHost("api.example")
	req.Header.SetContentType("application/json")
	req.Header.SetBytesV("X-Customer-Id", id)
	req.Header.Set("User-Agent", "bench/1")
	req.SetBodyString(`{"model":"small","prompt":"hello"}`)
}

var benchPeer = &net.TCPAddr{IP: net.IPv4(10, 0, 0, 7), Port: 40000}

// BenchmarkHandler measures the whole proxy handler (identity, route, decision, header
// rewriting, forward, commit) against an in-memory upstream, next to a bare forwarder
// that does what the bench's bare proxy does (bareForward) with the same request and
// upstream. The difference is what gatehouse adds per request.
func BenchmarkHandler(b *testing.B) {
	client := inMemoryUpstream(b)
	p, ids := benchProxy(b, client)
	reqs := make([]fasthttp.Request, 64)
	for i := range reqs {
		benchRequest(&reqs[i], ids[i*97%benchCustomers])
	}
	// Every customer's counters exist: the benchmark measures hits.
	var ctx fasthttp.RequestCtx
	for _, id := range ids {
		var req fasthttp.Request
		benchRequest(&req, id)
		ctx.Init(&req, benchPeer, nil)
		p.Handle(&ctx)
		if ctx.Response.StatusCode() != 200 {
			b.Fatalf("warm-up: %d %s", ctx.Response.StatusCode(), ctx.Response.Body())
		}
	}

	bare := func(ctx *fasthttp.RequestCtx) { bareForward(ctx, client) }
	b.Run("bare", func(b *testing.B) {
		b.ReportAllocs()
		var ctx fasthttp.RequestCtx
		ctx.Init(&reqs[0], benchPeer, nil)
		i := 0
		for b.Loop() {
			reqs[i&63].CopyTo(&ctx.Request)
			ctx.Response.Reset()
			bare(&ctx)
			if ctx.Response.StatusCode() != 200 {
				b.Fatal(ctx.Response.StatusCode())
			}
			i++
		}
	})
	b.Run("gatehouse", func(b *testing.B) {
		b.ReportAllocs()
		var ctx fasthttp.RequestCtx
		ctx.Init(&reqs[0], benchPeer, nil)
		i := 0
		for b.Loop() {
			reqs[i&63].CopyTo(&ctx.Request)
			ctx.Response.Reset()
			p.Handle(&ctx)
			if ctx.Response.StatusCode() != 200 {
				b.Fatal(ctx.Response.StatusCode(), string(ctx.Response.Body()))
			}
			i++
		}
	})
	parallel := func(handle func(ctx *fasthttp.RequestCtx)) func(b *testing.B) {
		return func(b *testing.B) {
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				var ctx fasthttp.RequestCtx
				ctx.Init(&reqs[0], benchPeer, nil)
				i := 0
				for pb.Next() {
					reqs[i&63].CopyTo(&ctx.Request)
					ctx.Response.Reset()
					handle(&ctx)
					if ctx.Response.StatusCode() != 200 {
						b.Error(ctx.Response.StatusCode())
						return
					}
					i++
				}
			})
		}
	}
	b.Run("bare-parallel", parallel(bare))
	b.Run("gatehouse-parallel", parallel(p.Handle))
}

// bareForward is what the bench's bare proxy (bench/internal/benchsrv) does with a
// request: hop-by-hop headers out, X-Forwarded-For in, forward with a timeout.
func bareForward(ctx *fasthttp.RequestCtx, client *fasthttp.HostClient) {
	req, resp := &ctx.Request, &ctx.Response
	for _, name := range hopByHop {
		req.Header.DelBytes(name)
	}
	var ip [16]byte
	req.Header.SetBytesV("X-Forwarded-For", appendIP(ip[:0], ctx.RemoteIP()))
	if err := client.DoTimeout(req, resp, 10*time.Second); err != nil {
		resp.Reset()
		ctx.SetStatusCode(fasthttp.StatusBadGateway)
		return
	}
	for _, name := range hopByHop {
		resp.Header.DelBytes(name)
	}
}

// BenchmarkDecide is the decision alone, as the proxy makes it: identity, route,
// reservation and commit. hot spreads requests over 64 of the 10,000 customers, whose
// data stays in the CPU's caches; all cycles through every customer, as the bench's
// steady scenario does, so that most requests read their customer's data from memory.
func BenchmarkDecide(b *testing.B) {
	b.Run("hot", func(b *testing.B) { benchDecide(b, 64) })
	b.Run("all", func(b *testing.B) { benchDecide(b, benchCustomers) })
}

func benchDecide(b *testing.B, customers int) {
	p, ids := benchProxy(b, inMemoryUpstream(b))
	tbl := p.table.Load()
	var req fasthttp.Request
	benchRequest(&req, ids[0])
	hdr := &req.Header
	order := make([][]byte, customers)
	for i := range order {
		order[i] = ids[i*97%benchCustomers]
	}
	st := p.states.Get().(*reqState)
	now := time.Now()
	for _, id := range order { // create the counters
		hdr.SetBytesV("X-Customer-Id", id)
		p.decide(tbl, []byte("POST"), []byte("/v1/chat/completions"), hdr, now, st)
		p.opts.Limiter.Commit(&st.res, st.usage[:0])
		st.res.Reset()
	}
	b.ReportAllocs()
	method, path := []byte("POST"), []byte("/v1/chat/completions")
	i := 0
	for b.Loop() {
		hdr.SetBytesV("X-Customer-Id", order[i%customers])
		o := p.decide(tbl, method, path, hdr, now, st)
		if o.decision.Reason != limiter.OK {
			b.Fatal(o.decision)
		}
		st.usage = p.opts.Limiter.Commit(&st.res, st.usage[:0])
		st.res.Reset()
		i++
	}
}

// TestDecideAllocs: deciding a request of a known customer allocates nothing (DESIGN.md
// section 8), admitted or refused.
func TestDecideAllocs(t *testing.T) {
	h := startDefault(t)
	tbl := h.p.table.Load()
	st := h.p.states.Get().(*reqState)
	header := func(kv ...string) *fasthttp.RequestHeader {
		var hd fasthttp.RequestHeader
		for i := 0; i+1 < len(kv); i += 2 {
			hd.Set(kv[i], kv[i+1])
		}
		return &hd
	}
	cases := []struct {
		name   string
		method string
		path   string
		hdr    *fasthttp.RequestHeader
		reason limiter.Reason
	}{
		{"admitted", "POST", "/v1/chat/x", header("X-Customer-Id", "cust_acme"), limiter.OK},
		{"request cost", "POST", "/v1/bulk", header("X-Customer-Id", "cust_acme", "X-Cost", "3"), limiter.OK},
		{"over the limit", "GET", "/v1/calls/x", header("X-Customer-Id", "cust_zero"), limiter.UsageLimitExceeded},
		{"not entitled", "POST", "/v1/chat/x", header("X-Customer-Id", "cust_small"), limiter.FeatureNotEntitled},
		{"unknown", "POST", "/v1/chat/x", header("X-Customer-Id", "cust_nobody"), limiter.CustomerUnknown},
	}
	now := time.Now()
	for _, tc := range cases {
		method, path := []byte(tc.method), []byte(tc.path)
		run := func() {
			o := h.p.decide(tbl, method, path, tc.hdr, now, st)
			if o.decision.Reason != tc.reason {
				t.Fatalf("%s: %v", tc.name, o.decision.Reason)
			}
			st.usage = h.lim.Commit(&st.res, st.usage[:0])
			st.res.Reset()
		}
		run() // the first request of a window creates its counter
		if n := testing.AllocsPerRun(200, run); n != 0 {
			t.Errorf("%s: %v allocations per decision, want 0", tc.name, n)
		}
	}
}
