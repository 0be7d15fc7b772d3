package sidecar

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// writeAtomic replaces path's content as a ConfigMap update does: a new file renamed
// over the old one.
func writeAtomic(t testing.TB, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func reloads(t testing.TB, a *admSidecar, result string) float64 {
	return metric(a.scrape(t), "gatehouse_config_reloads_total", "result", result)
}

func TestReloadFile(t *testing.T) {
	core, logs := observer.New(zapcore.InfoLevel)
	a := startAdmSidecar(t, admConfig, zap.New(core))
	path := a.configPath()
	orig := readFile(t, path)
	if status, _ := a.do(t, "GET", "/v1/new", "X-Customer-Id", "acme"); status != 403 {
		t.Fatalf("unrouted path: %d, want 403", status)
	}

	// A good file: the new route serves at once, the change is counted, and the admin
	// API shows the new configuration and where it came from.
	writeAtomic(t, path, orig+`
  - name: new
    path: /v1/new
    features: [{feature: api_calls}]
`)
	if err := a.ReloadFile(path); err != nil {
		t.Fatal(err)
	}
	if status, _ := a.do(t, "GET", "/v1/new", "X-Customer-Id", "acme"); status != 200 {
		t.Errorf("new route after reload: %d", status)
	}
	var st Status
	a.adminJSON(t, "GET", StatusPath, 200, &st)
	if st.Config.File != path || len(st.Config.SHA256) != 64 || st.Config.Routes != 5 || st.Config.LastError != "" {
		t.Errorf("status after reload %+v", st.Config)
	}
	if _, _, body := a.admin(t, "GET", ConfigPath); !strings.Contains(string(body), "name: new") {
		t.Errorf("/v1/config does not show the new route:\n%s", body)
	}
	if got := reloads(t, a, "success"); got != 1 {
		t.Errorf("successful reloads %v, want 1", got)
	}

	// A bad file: everything stays, each problem is logged with its line, and the
	// failure is counted and shown.
	logs.TakeAll()
	bad := strings.Replace(orig, "cost: 1}]\n    headers", "cost: -1}]\n    headers", 1) + "\nbogus_key: 1\n"
	writeAtomic(t, path, bad)
	err := a.ReloadFile(path)
	if err == nil || !strings.Contains(err.Error(), path+": routes[0].features[0].cost: must be >= 0 (got -1) at line 11") {
		t.Fatalf("bad file: %v", err)
	}
	problems := logs.FilterMessage("invalid configuration; the running one stays").All()
	if len(problems) != 2 {
		t.Errorf("%d problems logged, want 2: %v", len(problems), problems)
	}
	for _, e := range problems {
		if e.Level != zapcore.ErrorLevel || e.ContextMap()["file"] != path {
			t.Errorf("problem logged as %+v", e)
		}
	}
	if status, _ := a.do(t, "GET", "/v1/new", "X-Customer-Id", "acme"); status != 200 {
		t.Errorf("running config lost after a bad reload: %d", status)
	}
	mfs := a.scrape(t)
	if metric(mfs, "gatehouse_config_reloads_total", "result", "error") != 1 || metric(mfs, "gatehouse_config_last_reload_successful") != 0 {
		t.Errorf("failed reload not counted")
	}
	a.adminJSON(t, "GET", StatusPath, 200, &st)
	if !strings.Contains(st.Config.LastError, "bogus_key") || st.Config.LastErrorAt == nil || st.Config.Routes != 5 {
		t.Errorf("status after a bad reload %+v", st.Config)
	}
	// Not YAML, and a missing file: the same.
	writeAtomic(t, path, "routes: [\n")
	if err := a.ReloadFile(path); err == nil {
		t.Error("broken YAML reloaded")
	}
	if err := a.ReloadFile(filepath.Join(a.dir, "missing.yaml")); err == nil {
		t.Error("missing file reloaded")
	}
	if got := reloads(t, a, "error"); got != 3 {
		t.Errorf("failed reloads %v, want 3", got)
	}

	// Settings that take a restart keep their running value and say so.
	logs.TakeAll()
	writeAtomic(t, path, strings.Replace(orig, "listen: 127.0.0.1:0\n", "listen: 127.0.0.1:18080\n", 1)+"log: {access_log: true}\n")
	if err := a.ReloadFile(path); err != nil {
		t.Fatal(err)
	}
	if w := logs.FilterField(zap.String("setting", "listen")).All(); len(w) != 1 || w[0].Level != zapcore.WarnLevel {
		t.Errorf("restart-only change logged as %v", w)
	}
	_, _, body := a.admin(t, "GET", ConfigPath)
	if strings.Contains(string(body), "18080") || !strings.Contains(string(body), "access_log: true") {
		t.Errorf("/v1/config shows what does not run:\n%s", body)
	}
	// The access log switched on with the reload.
	logs.TakeAll()
	a.do(t, "GET", "/v1/hello", "X-Customer-Id", "acme")
	if n := logs.FilterMessage("request").Len(); n != 1 {
		t.Errorf("%d access log lines after switching it on, want 1", n)
	}
	if got := reloads(t, a, "success"); got != 2 {
		t.Errorf("successful reloads %v, want 2", got)
	}
}

func TestWatchConfig(t *testing.T) {
	a := startAdmSidecar(t, admConfig, nil)
	path := a.configPath()
	orig := readFile(t, path)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.WatchConfig(ctx, path, 10*time.Millisecond)
	}()
	defer func() { cancel(); <-done }()

	waitFor := func(what string, cond func() bool) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	// The file found at the start is what runs: recorded, not reloaded.
	var st Status
	waitFor("the watched file to be adopted", func() bool {
		a.adminJSON(t, "GET", StatusPath, 200, &st)
		return st.Config.File == path
	})
	if got := reloads(t, a, "success"); got != 0 {
		t.Errorf("%v reloads at the start, want 0", got)
	}

	writeAtomic(t, path, orig+"  - {name: watched, path: /v1/watched}\n")
	waitFor("the change to be applied", func() bool {
		status, _ := a.do(t, "GET", "/v1/watched", "X-Customer-Id", "acme")
		return status == 200
	})
	// A bad file is counted once, not once per poll.
	writeAtomic(t, path, orig+"  - {name: broken, path: nope}\n")
	waitFor("the bad file to be seen", func() bool { return reloads(t, a, "error") == 1 })
	time.Sleep(100 * time.Millisecond)
	if got := reloads(t, a, "error"); got != 1 {
		t.Errorf("bad file counted %v times", got)
	}
	if status, _ := a.do(t, "GET", "/v1/watched", "X-Customer-Id", "acme"); status != 200 {
		t.Errorf("running config lost: %d", status)
	}
	// Back to the original; then rewriting the same content is no reload.
	writeAtomic(t, path, orig)
	waitFor("the original to be back", func() bool {
		status, _ := a.do(t, "GET", "/v1/watched", "X-Customer-Id", "acme")
		return status == 403
	})
	writeAtomic(t, path, orig)
	time.Sleep(100 * time.Millisecond)
	if got := reloads(t, a, "success"); got != 2 {
		t.Errorf("successful reloads %v, want 2", got)
	}
	// A reload that a SIGHUP made is not repeated when the watch sees the file.
	next := orig + "  - {name: hup, path: /v1/hup}\n"
	if err := a.reloadData(path, []byte(next)); err != nil {
		t.Fatal(err)
	}
	writeAtomic(t, path, next)
	time.Sleep(100 * time.Millisecond)
	if got := reloads(t, a, "success"); got != 3 {
		t.Errorf("successful reloads %v after a reload the watch also saw, want 3", got)
	}
}

// TestReloadUnderLoad swaps routes and policies back and forth under concurrent
// requests, with bad files in between: no request may fail.
func TestReloadUnderLoad(t *testing.T) {
	a := startAdmSidecar(t, admConfig, nil)
	path := a.configPath()
	base := readFile(t, path)
	base = base[:strings.Index(base, "routes:")]
	// Both configurations admit every request the load sends, differently: another
	// route name, cost, shadow mode, static header, timeout and access log.
	configs := []string{
		base + `routes:
  - name: load-a
    path: /v1/**
    features: [{feature: api_calls, cost: 1}]
`,
		strings.Replace(base, "timeout: 5s", "timeout: 4s", 1) + `shadow: true
log: {access_log: true}
routes:
  - name: load-b
    method: GET
    path: /v1/load/*
    features: [{feature: api_calls, cost: 2}]
    headers: {X-Support-Tier: support_tier}
  - name: load-b-rest
    path: /v1/**
`,
	}
	bad := base + "routes:\n  - {name: x, path: /v1/**, features: [{feature: api_calls, cost: -5}]}\n"
	for _, c := range configs {
		if _, err := config.Parse(strings.NewReader(c)); err != nil {
			t.Fatalf("test config: %v\n%s", err, c)
		}
	}

	writeAtomic(t, path, configs[0])
	if err := a.ReloadFile(path); err != nil {
		t.Fatal(err)
	}
	const workers = 8
	var (
		stop            atomic.Bool
		sent, failed    atomic.Int64
		firstFailure    atomic.Pointer[string]
		wg              sync.WaitGroup
		sawTier, noTier atomic.Bool
	)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			c := &fasthttp.HostClient{Addr: a.Addr().String()}
			req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
			defer fasthttp.ReleaseRequest(req)
			defer fasthttp.ReleaseResponse(resp)
			for i := 0; !stop.Load(); i++ {
				req.Reset()
				req.SetRequestURI(fmt.Sprintf("http://gatehouse/v1/load/%d", i%7))
				req.Header.Set("X-Customer-Id", "globex") // unlimited, so only a reload could refuse
				err := c.DoTimeout(req, resp, 5*time.Second)
				sent.Add(1)
				if err != nil || resp.StatusCode() != 200 {
					failed.Add(1)
					msg := fmt.Sprintf("request %d of worker %d: err %v, status %d %s", i, w, err, resp.StatusCode(), resp.Body())
					firstFailure.CompareAndSwap(nil, &msg)
					continue
				}
				if strings.Contains(string(resp.Body()), `"X-Support-Tier":"business"`) {
					sawTier.Store(true)
				} else {
					noTier.Store(true)
				}
			}
		}(w)
	}

	const rounds = 30
	for i := 1; i <= rounds; i++ {
		writeAtomic(t, path, configs[i%2])
		if err := a.ReloadFile(path); err != nil {
			t.Fatal(err)
		}
		if i%5 == 1 {
			writeAtomic(t, path, bad)
			if err := a.ReloadFile(path); err == nil {
				t.Fatal("bad config reloaded")
			}
		}
		time.Sleep(15 * time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()

	if n := failed.Load(); n != 0 {
		t.Errorf("%d of %d requests failed during reloads; first: %s", n, sent.Load(), *firstFailure.Load())
	}
	if sent.Load() < 200 {
		t.Errorf("only %d requests sent: the load did not overlap the reloads", sent.Load())
	}
	if !sawTier.Load() || !noTier.Load() {
		t.Errorf("both configurations should have served (static header seen %v, absent %v)", sawTier.Load(), noTier.Load())
	}
	mfs := a.scrape(t)
	if got := metric(mfs, "gatehouse_config_reloads_total", "result", "success"); got != rounds+1 {
		t.Errorf("successful reloads %v, want %d", got, rounds+1)
	}
	if got := metric(mfs, "gatehouse_config_reloads_total", "result", "error"); got != rounds/5 {
		t.Errorf("failed reloads %v, want %d", got, rounds/5)
	}
	t.Logf("%d requests across %d reloads (%d of bad files), %d failed", sent.Load(), rounds+rounds/5, rounds/5, failed.Load())
}

func TestRedactedYAML(t *testing.T) {
	cfg := config.Default()
	cfg.Upstream.URL = "http://127.0.0.1:9000"
	cfg.NATS.URLs = []string{"nats://gate:s3cr3t-pass@nats-0.nats:4222", "tls://t0k3n-value@nats-1.nats:4222",
		"nats://nats-2.nats:4222", "wss://nats-3.nats:443/?token=q-t0k3n&region=eu"}
	cfg.NATS.Credentials = "/etc/gatehouse/nats/gatehouse.creds"
	cfg.Flexprice.APIKeyEnv = "FLEXPRICE_API_KEY"
	cfg.Flexprice.APIKeyFile = "/var/run/secrets/flexprice/key"
	t.Setenv("FLEXPRICE_API_KEY", "fp-live-9c2b-secret")
	out, err := redactedYAML(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := string(out)
	for _, secret := range []string{"s3cr3t-pass", "gate:", "t0k3n-value", "q-t0k3n", "fp-live-9c2b-secret"} {
		if strings.Contains(s, secret) {
			t.Errorf("%q leaks into\n%s", secret, s)
		}
	}
	for _, kept := range []string{"nats://REDACTED@nats-0.nats:4222", "tls://REDACTED@nats-1.nats:4222", "nats://nats-2.nats:4222",
		"region=eu", "/etc/gatehouse/nats/gatehouse.creds", "api_key_env: FLEXPRICE_API_KEY", "/var/run/secrets/flexprice/key", "timeout: 30s"} {
		if !strings.Contains(s, kept) {
			t.Errorf("%q missing from\n%s", kept, s)
		}
	}
	// What /v1/config shows is a configuration file that loads.
	cfg.NATS.URLs = []string{"nats://nats-0.nats:4222"}
	out, err = redactedYAML(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := config.Parse(strings.NewReader(string(out))); err != nil {
		t.Errorf("redacted configuration does not load: %v\n%s", err, out)
	}
	for key, secret := range map[string]bool{"password": true, "db_password": true, "client_secret": true, "token": true,
		"api_key": true, "flexprice_api_key": true, "api_key_env": false, "api_key_file": false, "credentials": false, "header": false} {
		if secretKey(key) != secret {
			t.Errorf("secretKey(%q) = %v", key, !secret)
		}
	}
}
