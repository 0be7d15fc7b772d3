package deploy_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/echo"
	"github.com/gatehouse-dev/gatehouse/internal/sidecar"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
)

// TestNginxAuthRequest puts a real nginx, configured with deploy/nginx/gatehouse.conf,
// in front of an echo upstream, with gatehouse's check endpoint deciding every request.
// It installs nothing: it runs when nginx is on PATH (.ci/run installs it) and skips
// otherwise.
func TestNginxAuthRequest(t *testing.T) {
	bin, err := exec.LookPath("nginx")
	if err != nil {
		t.Skip("nginx is not on PATH")
	}
	upstream := testutil.Echo(t)
	sc := startNginxSidecar(t, upstream)
	nginx := startNginx(t, bin, sc.Addr().String(), upstream)

	type want struct {
		status  int
		reason  string            // X-Gatehouse-Reason of a refusal
		seen    map[string]string // headers the upstream must see ("" = absent)
		headers map[string]string // response headers ("*" = present, any value)
	}
	cases := []struct {
		name, method, path string
		headers            []string
		want               want
	}{
		{"allowed, with the static value upstream", "GET", "/v1/hello", []string{"X-Customer-Id", "acme"}, want{
			status: 200, seen: map[string]string{"X-Customer-Id": "acme", "X-Support-Tier": "24/7"},
			headers: map[string]string{"Ratelimit-Policy": `"api_calls";q=1000;w=*`, "Ratelimit": "*"}}},
		{"a client's copy of a static header never passes", "GET", "/v1/hello", []string{"X-Customer-Id", "globex", "X-Support-Tier", "platinum"}, want{
			status: 200, seen: map[string]string{"X-Customer-Id": "globex", "X-Support-Tier": ""}}},
		{"no identity", "GET", "/v1/hello", nil, want{status: 401, reason: "customer_missing"}},
		{"unknown customer", "GET", "/v1/hello", []string{"X-Customer-Id", "nobody"}, want{status: 403, reason: "customer_unknown"}},
		{"not entitled", "GET", "/v1/analytics/summary?range=7d", []string{"X-Customer-Id", "acme"}, want{status: 403, reason: "feature_not_entitled"}},
		{"the original method decides", "PUT", "/v1/reports", []string{"X-Customer-Id", "acme"}, want{status: 403, reason: "route_not_allowed"}},
		{"a path that normalizes onto a route", "GET", "/v1/analytics/../hello", []string{"X-Customer-Id", "acme"}, want{status: 200}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			status, h, body := nginx.do(t, c.method, c.path, c.headers...)
			if status != c.want.status {
				t.Fatalf("status %d, want %d; body %s", status, c.want.status, body)
			}
			if got := h.Get("X-Gatehouse-Reason"); got != c.want.reason {
				t.Errorf("X-Gatehouse-Reason %q, want %q", got, c.want.reason)
			}
			if c.want.reason != "" && !strings.Contains(string(body), `"reason":"`+c.want.reason+`"`) {
				t.Errorf("body %s does not give the reason", body)
			}
			for name, v := range c.want.headers {
				got := h.Get(name)
				if prefix, ok := strings.CutSuffix(v, "*"); !ok && got != v || ok && (got == "" || !strings.HasPrefix(got, prefix)) {
					t.Errorf("%s: %q, want %q", name, got, v)
				}
			}
			if c.want.seen != nil {
				var r echo.Reply
				if err := json.Unmarshal(body, &r); err != nil {
					t.Fatalf("upstream reply %s: %v", body, err)
				}
				for name, v := range c.want.seen {
					if got := r.Headers[name]; got != v {
						t.Errorf("upstream saw %s: %q, want %q", name, got, v)
					}
				}
			}
		})
	}

	// Usage: a hard limit of 3 reports a day. The check commits each allowed request's
	// cost, so the fourth is refused with the real status restored by nginx.
	for i := 1; i <= 3; i++ {
		if status, _, body := nginx.do(t, "POST", "/v1/reports", "X-Customer-Id", "acme"); status != 200 {
			t.Fatalf("report %d: %d %s", i, status, body)
		}
	}
	status, h, body := nginx.do(t, "POST", "/v1/reports", "X-Customer-Id", "acme")
	if status != 429 || h.Get("X-Gatehouse-Reason") != "usage_limit_exceeded" || h.Get("Retry-After") == "" ||
		!strings.HasPrefix(h.Get("Ratelimit-Policy"), `"reports";q=3`) {
		t.Errorf("fourth report: %d %v %s", status, h, body)
	}
	var reports, calls int64
	sc.Limiter.Counters("acme", func(c *limiter.Counter) {
		switch c.Key.Feature {
		case "reports":
			reports += c.Committed()
		case "api_calls":
			calls += c.Committed()
		}
	})
	if reports != 3 || calls != 2 {
		t.Errorf("committed reports %d, api_calls %d; want 3 and 2", reports, calls)
	}
}

const nginxSidecarConfig = `
listen: 127.0.0.1:0
admin_listen: ""
upstream: {url: "http://UPSTREAM"}
data_dir: DATADIR
unmatched: deny
routes:
  - {name: hello, method: GET, path: /v1/hello, features: [{feature: api_calls}], headers: {X-Support-Tier: support_tier}}
  - {name: reports, method: POST, path: /v1/reports, features: [{feature: reports}]}
  - {name: analytics, path: /v1/analytics/**, features: [{feature: advanced_analytics}]}
`

const nginxSnapshots = `[
 {"customer_id": "acme", "features": {
   "api_calls": {"type": "metered", "usage_limit": 1000},
   "reports": {"type": "metered", "usage_limit": 3, "usage_reset_period": "DAILY"},
   "advanced_analytics": {"type": "boolean", "is_enabled": false},
   "support_tier": {"type": "static", "static_values": ["24/7"]}}},
 {"customer_id": "globex", "features": {"api_calls": {"type": "metered"}}}
]`

func startNginxSidecar(t *testing.T, upstream string) *sidecar.Sidecar {
	t.Helper()
	yml := strings.NewReplacer("UPSTREAM", upstream, "DATADIR", t.TempDir()).Replace(nginxSidecarConfig)
	cfg, err := config.Parse(strings.NewReader(yml))
	if err != nil {
		t.Fatal(err)
	}
	snaps, err := limiter.ParseSnapshots(strings.NewReader(nginxSnapshots))
	if err != nil {
		t.Fatal(err)
	}
	sc, err := sidecar.New(sidecar.Options{Config: cfg, Log: testutil.Logger(t), Snapshots: snaps, Standalone: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := sc.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = sc.Close(ctx)
	})
	return sc
}

type nginxServer struct {
	addr   string
	client *http.Client
}

// startNginx runs nginx in the foreground with deploy/nginx/gatehouse.conf, everything
// it writes under a temporary directory, and stops it when the test ends.
func startNginx(t *testing.T, bin, gatehouse, upstream string) *nginxServer {
	t.Helper()
	dir := t.TempDir()
	server, err := os.ReadFile(filepath.Join("nginx", "gatehouse.conf"))
	if err != nil {
		t.Fatal(err)
	}
	addr := testutil.FreeAddr(t)
	server = []byte(strings.NewReplacer("LISTEN_ADDR", addr, "GATEHOUSE_ADDR", gatehouse, "UPSTREAM_ADDR", upstream).Replace(string(server)))
	if err := os.WriteFile(filepath.Join(dir, "gatehouse.conf"), server, 0o644); err != nil {
		t.Fatal(err)
	}
	main := strings.ReplaceAll(`daemon off;
master_process off;
worker_processes 1;
pid DIR/nginx.pid;
error_log DIR/error.log info;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path DIR/client_body;
    proxy_temp_path DIR/proxy;
    fastcgi_temp_path DIR/fastcgi;
    uwsgi_temp_path DIR/uwsgi;
    scgi_temp_path DIR/scgi;
    include DIR/gatehouse.conf;
}
`, "DIR", dir)
	conf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(main), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-p", dir, "-e", filepath.Join(dir, "error.log"), "-c", conf)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start nginx: %v", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			if log, err := os.ReadFile(filepath.Join(dir, "error.log")); err == nil {
				t.Logf("nginx error log:\n%s", log)
			}
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		select {
		case err := <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "error.log"))
			t.Fatalf("nginx exited: %v\n%s", err, log)
		default:
		}
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("nginx did not listen within 10s")
		}
	}
	return &nginxServer{addr: addr, client: &http.Client{Timeout: 10 * time.Second}}
}

func (n *nginxServer) do(t *testing.T, method, path string, headers ...string) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+n.addr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := n.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, body
}
