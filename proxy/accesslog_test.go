package proxy

import (
	"encoding/json"
	"io"
	"net"
	"strings"
	"testing"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// chkBuffer is a WriteSyncer that tests read log lines from.
type chkBuffer struct{ testutil.Buffer }

func (b *chkBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(b.Take()), "\n") {
		if l == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("log line %q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

// chkJSONLogger writes JSON lines, as cmd/gatehouse's logger does (an encoding core,
// not one that keeps fields).
func chkJSONLogger(w zapcore.WriteSyncer) *zap.Logger {
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	return zap.New(zapcore.NewCore(enc, w, zap.InfoLevel))
}

func TestAccessLog(t *testing.T) {
	var out chkBuffer
	f := newChkFixture(t, chkConfig, Options{AccessLog: chkJSONLogger(&out)})
	f.do(t, "GET", "/v1/hello", "X-Customer-Id", "acme")
	if lines := out.lines(t); len(lines) != 0 {
		t.Fatalf("access log is off by default, got %v", lines)
	}

	cfg, err := config.Parse(strings.NewReader(strings.ReplaceAll(chkConfig, "UPSTREAM", "127.0.0.1:1") + "log: {access_log: true}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.p.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	f.do(t, "GET", "/v1/hello?q=1", "X-Customer-Id", "acme")
	f.do(t, "GET", "/v1/analytics/x", "X-Customer-Id", "acme")
	f.do(t, "GET", "/v1/shadow/x", "X-Customer-Id", "nobody")
	f.do(t, "GET", CheckNginx, "X-Original-URI", "/v1/hello", "X-Customer-Id", "initech")
	want := []map[string]any{
		{"msg": "request", "logger": "access", "method": "GET", "path": "/v1/hello", "status": 200.0, "route": "hello", "result": "allow", "customer": "acme", "client": "127.0.0.1"},
		{"path": "/v1/analytics/x", "status": 403.0, "route": "analytics", "result": "deny", "reason": "feature_not_entitled", "feature": "advanced_analytics", "customer": "acme"},
		{"path": "/v1/shadow/x", "status": 200.0, "route": "shadowed", "result": "shadow_deny", "reason": "customer_unknown", "customer": "nobody"},
		{"path": "/v1/hello", "status": 200.0, "route": "hello", "result": "allow", "customer": "initech", "check": "nginx"},
	}
	lines := out.lines(t)
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d: %v", len(lines), len(want), lines)
	}
	for i, w := range want {
		for k, v := range w {
			if lines[i][k] != v {
				t.Errorf("line %d: %s = %v, want %v (%v)", i, k, lines[i][k], v, lines[i])
			}
		}
		if _, ok := lines[i]["duration"]; !ok {
			t.Errorf("line %d has no duration", i)
		}
	}
}

// TestAccessLogAllocs: writing a line allocates nothing beyond what zap does, and zap's
// JSON core reuses its buffers.
func TestAccessLogAllocs(t *testing.T) {
	if chkRace {
		t.Skip("the race detector makes sync.Pool drop items: allocation counts mean nothing")
	}
	f := newChkFixture(t, chkConfig, Options{})
	a := newAccessLog(chkJSONLogger(zapcore.AddSync(io.Discard)))
	var req fasthttp.Request
	req.Header.SetMethod("GET") // as a parsed request has it: Method() of an unset method allocates
	req.SetRequestURI("/v1/hello")
	req.Header.Set("X-Customer-Id", "acme")
	var ctx fasthttp.RequestCtx
	ctx.Init(&req, &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 1}, nil)
	t0 := f.p.table.Load()
	st := f.p.states.Get().(*reqState)
	o := f.p.decide(t0, ctx.Method(), ctx.Path(), &req.Header, ctx.Time(), st)
	a.write(&ctx, "", ctx.Path(), &o, st)
	if n := testing.AllocsPerRun(200, func() { a.write(&ctx, "", ctx.Path(), &o, st) }); n != 0 {
		t.Errorf("%v allocations per access log line, want 0", n)
	}
}
