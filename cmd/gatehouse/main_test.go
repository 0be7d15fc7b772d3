package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
)

// exitCode is the status main would exit with for err.
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	return 1
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCheckConfig(t *testing.T) {
	good := writeFile(t, "good.yaml", "upstream:\n  url: http://127.0.0.1:9000\n")
	bad := writeFile(t, "bad.yaml", `upstream:
  url: http://127.0.0.1:9000
routes:
  - name: chat
    path: /v1/chat/*
    features:
      - {feature: api_calls, cost: -1}
  - name: other
    path: /v1/*/x
    featurs: []
`)
	badSnaps := writeFile(t, "snaps.json", `[{"customer_id":"a","features":{}},{"customer_id":"b","features":{"x":{"type":"metered","usage_limit":-5}}}]`)
	badFile := writeFile(t, "badfile.yaml", "upstream:\n  url: http://127.0.0.1:9000\nentitlements:\n  file: "+badSnaps+"\n")
	tests := []struct {
		name     string
		args     []string
		code     int
		wantOut  string
		wantErrs []string
	}{
		{"good", []string{"check-config", "-config", good}, 0, "ok (0 routes)", nil},
		{"bad config names every problem with its line", []string{"check-config", "-config", bad}, 2, "", []string{
			"routes[0].features[0].cost: must be >= 0 (got -1) at line 7",
			"routes[1].featurs: unknown field",
			"at line 10",
			"routes[1].path",
		}},
		{"bad snapshot file names the snapshot", []string{"check-config", "-config", badFile}, 2, "", []string{
			"snapshot 2", "features.x.usage_limit: must be >= 0",
		}},
		{"missing flag", []string{"check-config"}, 2, "", []string{"-config FILE is required"}},
		{"unknown command", []string{"frobnicate"}, 2, "", []string{`unknown command "frobnicate"`}},
		{"serve with a malformed snapshot file exits 2", []string{"serve", "-config", badFile}, 2, "", []string{"snapshot 2"}},
		{"version", []string{"version"}, 0, "gatehouse dev\ncapabilities: nats usage-outbox fleet-quota\n", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			err := run(context.Background(), tt.args, &out, &errOut)
			if got := exitCode(err); got != tt.code {
				t.Fatalf("exit %d, want %d (err %v)", got, tt.code, err)
			}
			if !strings.Contains(out.String(), tt.wantOut) {
				t.Errorf("stdout %q does not contain %q", out.String(), tt.wantOut)
			}
			msg := ""
			if err != nil {
				msg = err.Error()
			}
			for _, w := range tt.wantErrs {
				if !strings.Contains(msg, w) {
					t.Errorf("error does not contain %q:\n%s", w, msg)
				}
			}
		})
	}
}

// TestDemo runs the demo and tries what its curl lines show: an allowed request with
// the static value at the upstream, a boolean denial, a hard limit reaching 429, a soft
// limit running into overage, and the identity refusals.
func TestDemo(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var out testutil.Buffer
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"demo", "-listen", "127.0.0.1:0", "-admin", "127.0.0.1:0", "-nats", "127.0.0.1:0"}, &out, io.Discard)
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("demo: %v", err)
		}
	}()
	addrRE := regexp.MustCompile(`a sidecar on http://(127\.0\.0\.1:\d+)`)
	var addr string
	for deadline := time.Now().Add(30 * time.Second); addr == "" && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if m := addrRE.FindStringSubmatch(out.String()); m != nil {
			addr = m[1]
		}
	}
	if addr == "" {
		t.Fatalf("demo did not print its address:\n%s", out.String())
	}
	do := func(method, path, customer string, hdr ...string) (*http.Response, string) {
		t.Helper()
		req, _ := http.NewRequest(method, "http://"+addr+path, nil)
		if customer != "" {
			req.Header.Set("X-Customer-Id", customer)
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, string(body)
	}
	if resp, body := do("GET", "/v1/hello", "acme"); resp.StatusCode != 200 || !strings.Contains(body, `"X-Support-Tier":"24/7"`) {
		t.Errorf("allowed: %d %s", resp.StatusCode, body)
	}
	if resp, body := do("GET", "/v1/analytics/summary", "acme"); resp.StatusCode != 403 || !strings.Contains(body, "feature_not_entitled") {
		t.Errorf("boolean denial: %d %s", resp.StatusCode, body)
	}
	if resp, _ := do("GET", "/v1/analytics/summary", "globex"); resp.StatusCode != 200 {
		t.Errorf("boolean allowed: %d", resp.StatusCode)
	}
	var codes []int
	for range 4 {
		resp, _ := do("POST", "/v1/reports", "acme")
		codes = append(codes, resp.StatusCode)
		if resp.StatusCode == 429 && resp.Header.Get("Retry-After") == "" {
			t.Error("429 without Retry-After")
		}
	}
	if want := []int{200, 200, 200, 429}; !equalInts(codes, want) {
		t.Errorf("hard limit: %v, want %v", codes, want)
	}
	var remaining []string
	for range 4 {
		resp, _ := do("POST", "/v1/exports", "acme")
		if resp.StatusCode != 200 {
			t.Errorf("soft limit refused: %d", resp.StatusCode)
		}
		remaining = append(remaining, resp.Header.Get("RateLimit"))
	}
	if !strings.Contains(remaining[3], "r=0") {
		t.Errorf("soft limit past its limit should show r=0: %v", remaining)
	}
	if resp, body := do("POST", "/v1/chat", "acme", "X-Echo-Response-Header", "X-Tokens-Used: 42"); resp.StatusCode != 200 {
		t.Errorf("chat: %d %s", resp.StatusCode, body)
	}
	if resp, body := do("GET", "/v1/hello", ""); resp.StatusCode != 401 || !strings.Contains(body, "customer_missing") {
		t.Errorf("no identity: %d %s", resp.StatusCode, body)
	}
	if resp, body := do("GET", "/v1/hello", "nobody"); resp.StatusCode != 403 || !strings.Contains(body, "customer_unknown") {
		t.Errorf("unknown: %d %s", resp.StatusCode, body)
	}

	// The usage reaches JetStream: `gatehouse usage` against the demo's embedded NATS
	// shows exactly what was admitted, with the soft limit's overage.
	natsURL := regexp.MustCompile(`Embedded NATS with JetStream on (nats://[0-9.:]+)`).FindStringSubmatch(out.String())
	if natsURL == nil {
		t.Fatalf("demo did not print its NATS URL:\n%s", out.String())
	}
	cfgPath := writeFile(t, "usage.yaml", "upstream:\n  url: http://127.0.0.1:1\nnats:\n  urls: ["+natsURL[1]+"]\n")
	want := map[string][2]int64{"api_calls": {2, 0}, "reports": {3, 0}, "exports": {4, 2}, "tokens": {42, 0}}
	var got map[string][2]int64
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		var usageOut bytes.Buffer
		if err := run(context.Background(), []string{"usage", "-config", cfgPath, "-json"}, &usageOut, io.Discard); err != nil {
			t.Fatalf("usage: %v", err)
		}
		var totals []struct {
			CustomerID string `json:"customer_id"`
			Feature    string `json:"feature"`
			Quantity   int64  `json:"quantity"`
			Overage    int64  `json:"overage"`
		}
		if err := json.Unmarshal(usageOut.Bytes(), &totals); err != nil {
			t.Fatalf("usage -json: %v\n%s", err, usageOut.String())
		}
		got = map[string][2]int64{}
		for _, tt := range totals {
			if tt.CustomerID == "acme" {
				got[tt.Feature] = [2]int64{tt.Quantity, tt.Overage}
			}
		}
		if fmt.Sprint(got) == fmt.Sprint(want) {
			break
		}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("published usage of acme = %v, want %v", got, want)
	}
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
