package flexprice

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	fpt "github.com/gatehouse-dev/gatehouse/internal/flexpricetest"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func TestAPIKeyNeverLogged(t *testing.T) {
	const key = "sk_live_TOPSECRET_4242"
	e := newEnv(t, fpt.Options{APIKey: key})
	e.catalogue()
	e.acme()
	var logs testutil.Buffer
	logger := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewDevelopmentEncoderConfig()), &logs, zap.DebugLevel))
	// Every path that logs: retries after 500, 429 and timeouts, webhooks, parked events.
	e.fp.FailNext("/v1/customers/external/acme/entitlements", 1, 500)
	e.fp.RateLimitNext("/v1/customers", 1, "0.1")
	e.fp.SlowNext("/v1/events/bulk", 1, time.Second)
	e.fp.RejectNextAt(0)
	e.run(func(o *Options) { o.Logger = logger; o.RequestTimeout = 300 * time.Millisecond })
	e.usageBatch(1)
	e.drained()
	e.fire("customer.updated", map[string]string{"id": "cust_unknown"})
	logger.Info("options", zap.Any("options", e.opts.APIKey), zap.Stringer("key", e.opts.APIKey))
	e.stop()

	// A bridge whose key Flexprice refuses logs 401s, and still not the key it sent.
	wrong := "sk_live_WRONGKEY_9999"
	o := e.opts
	o.APIKey, o.Logger, o.DisableUsage, o.MaxAttempts = Secret(wrong), logger, true, 1
	b2, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b2.Run(ctx) }()
	e.eventually(5*time.Second, "401 logged", func() bool { return strings.Contains(logs.String(), "status 401") })
	cancel()
	<-done

	out := logs.String()
	if !strings.Contains(out, "retrying") || !strings.Contains(out, "parked") {
		t.Fatalf("the logs miss the paths under test:\n%s", out)
	}
	for _, k := range []string{key, wrong, "TOPSECRET", "WRONGKEY"} {
		if strings.Contains(out, k) {
			t.Fatalf("API key %q in the logs", k)
		}
	}
	s := Secret(key)
	for _, v := range []string{fmt.Sprint(s), fmt.Sprintf("%v %+v %#v %s %q %x", s, s, s, s, s, s),
		fmt.Sprintf("%+v", o), string(mustJSON(s)), string(mustJSON(struct{ K Secret }{s}))} {
		if strings.Contains(v, "TOPSECRET") {
			t.Fatalf("formatted secret shows the key: %s", v)
		}
	}
}

func TestAdminEndpoints(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.catalogue()
	e.acme()
	e.run(nil)
	if got := e.get("/healthz"); got != "ok\n" {
		t.Fatalf("healthz %q", got)
	}
	if got := e.get("/readyz"); got != "ready\n" {
		t.Fatalf("readyz %q", got)
	}
	m := e.get("/metrics")
	for _, name := range []string{"customers_synced_total", "sync_errors_total", "kv_writes_total",
		"webhooks_received_total", "events_sent_total", "events_parked_total", "api_errors_total",
		"api_request_duration_seconds", "go_goroutines"} {
		if !strings.Contains(m, name) && !strings.Contains(m, "gatehouse_flexprice_"+name) {
			t.Errorf("metric %s missing", name)
		}
	}
	if e.metric("gatehouse_flexprice_customers_synced_total") != 1 {
		t.Fatal(m)
	}
	// The webhook receiver refuses what is not a webhook.
	for _, tc := range []struct {
		method, body string
		want         int
	}{{"GET", "", 405}, {"POST", "nope", 400}, {"POST", `{"customer": {}}`, 400}, {"POST", `{"event_type": "invoice.paid"}`, 202}} {
		req, _ := http.NewRequest(tc.method, e.b.WebhookURL(), strings.NewReader(tc.body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Fatalf("%s %q: %d, want %d", tc.method, tc.body, resp.StatusCode, tc.want)
		}
	}
	if e.metric("gatehouse_flexprice_webhooks_received_total", `type="other"`) != 1 {
		t.Fatal("unknown webhook types are not counted as other")
	}
}

func TestNotReadyUntilFirstSync(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.fp.FailNext("/v1/customers", 1000, 500)
	o := e.opts
	o.MaxAttempts, o.DisableUsage = 1, true
	b, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	defer func() { cancel(); <-done }()
	e.b = b
	e.eventually(5*time.Second, "a failed full sync", func() bool {
		return b.AdminAddr() != nil && e.metric("gatehouse_flexprice_full_syncs_total", `result="error"`) >= 1
	})
	resp, err := http.Get("http://" + b.AdminAddr().String() + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 503 || b.Ready() {
		t.Fatalf("readyz %d before any full sync succeeded", resp.StatusCode)
	}
}

func TestNewAndOptionsFromConfig(t *testing.T) {
	if _, err := New(Options{Features: map[string]FeatureEvents{"x": {Mode: "avg"}}}); err == nil ||
		!strings.Contains(err.Error(), "APIKey is required") || !strings.Contains(err.Error(), "JetStream is required") ||
		!strings.Contains(err.Error(), "features.x.mode") || !strings.Contains(err.Error(), "features.x.event_name") {
		t.Fatalf("New: %v", err)
	}
	t.Setenv("GH_TEST_FLEXPRICE_KEY", " sk_from_env \n")
	c := config.Default().Flexprice
	c.APIKeyEnv = "GH_TEST_FLEXPRICE_KEY"
	c.Features = map[string]config.FlexpriceFeature{"tokens": {EventName: "llm", Mode: "sum", Property: "tokens"}}
	o, err := OptionsFromConfig(c)
	if err != nil || o.APIKey.reveal() != "sk_from_env" || o.Features["tokens"].Property != "tokens" || o.SyncInterval != 5*time.Minute {
		t.Fatalf("from env: %+v %v", o, err)
	}
	file := filepath.Join(t.TempDir(), "key")
	os.WriteFile(file, []byte("sk_from_file\n"), 0o600)
	c.APIKeyFile = file
	if o, err = OptionsFromConfig(c); err != nil || o.APIKey.reveal() != "sk_from_file" {
		t.Fatalf("from file: %v", err)
	}
	c.APIKeyFile, c.APIKeyEnv = "", "GH_TEST_FLEXPRICE_UNSET"
	if _, err = OptionsFromConfig(c); err == nil || !strings.Contains(err.Error(), "GH_TEST_FLEXPRICE_UNSET is empty") {
		t.Fatalf("unset env: %v", err)
	}
}

func TestChooseSubscription(t *testing.T) {
	at := func(days int) *time.Time { t := t0.AddDate(0, 0, days); return &t }
	subs := []subscription{
		{ID: "s_cancelled", SubscriptionStatus: "cancelled", StartDate: at(-300)},
		{ID: "s_trial", SubscriptionStatus: "trialing", StartDate: at(-200)},
		{ID: "s_b", SubscriptionStatus: "active", StartDate: at(-100)},
		{ID: "s_a", SubscriptionStatus: "ACTIVE", StartDate: at(-100)},
		{ID: "s_new", SubscriptionStatus: "active", StartDate: at(-10)},
		{ID: "s_future", SubscriptionStatus: "active", StartDate: at(10)},
	}
	cases := []struct {
		name string
		subs []subscription
		want string
	}{
		{"active before trialing, then earliest start, then id", subs, "s_a"},
		{"trialing when nothing is active", subs[:2], "s_trial"},
		{"none live", subs[:1], ""},
		{"not started yet", subs[5:], ""},
	}
	for _, tc := range cases {
		got := chooseSubscription(tc.subs, t0)
		if (got == nil && tc.want != "") || (got != nil && got.ID != tc.want) {
			t.Errorf("%s: got %+v, want %s", tc.name, got, tc.want)
		}
	}
	for _, tc := range []struct {
		period string
		count  int
		want   string
	}{{"MONTHLY", 1, "MONTHLY"}, {"monthly", 3, "QUARTERLY"}, {"MONTHLY", 12, "ANNUAL"}, {"DAILY", 7, "WEEKLY"},
		{"ANNUAL", 0, "ANNUAL"}, {"WEEKLY", 2, "WEEKLY"}, {"FORTNIGHTLY", 1, ""}} {
		if got := interval(tc.period, tc.count); got != tc.want {
			t.Errorf("interval(%s, %d) = %q, want %q", tc.period, tc.count, got, tc.want)
		}
	}
}

func TestBadFeatureLeftOut(t *testing.T) {
	no, yes := false, true
	resp := &entitlementsResponse{Features: []featureEntry{
		{Feature: &feature{ID: "f1", LookupKey: "bad key", Type: "BOOLEAN"}, Entitlement: &entitlementValue{IsEnabled: &yes}},
		{Feature: &feature{ID: "f2", LookupKey: "tier", Type: "static"}, Entitlement: &entitlementValue{StaticValues: []string{"a\nb"}}},
		{Feature: &feature{ID: "f3", LookupKey: "mixed", Type: "metered"}, Entitlement: &entitlementValue{}},
		{Feature: &feature{ID: "f3", LookupKey: "mixed", Type: "boolean"}, Entitlement: &entitlementValue{IsEnabled: &no}},
		{Feature: &feature{ID: "f4", LookupKey: "ok", Type: "Boolean"}, Entitlement: &entitlementValue{IsEnabled: &yes}},
	}}
	b := buildSnapshot("acme", resp, nil, t0)
	if len(b.problems) != 3 || len(b.doc.Features) != 1 || b.doc.Features["ok"].Type != "boolean" {
		data, _ := json.Marshal(b.doc)
		t.Fatalf("problems %v, doc %s", b.problems, data)
	}
	if _, err := b.doc.Snapshot(); err != nil {
		t.Fatal(err)
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)
	for in, want := range map[string]time.Duration{"": 0, "2": 2 * time.Second, "0.5": 500 * time.Millisecond,
		"junk": 0, "-1": 0, now.Add(3 * time.Second).Format(http.TimeFormat): 3 * time.Second} {
		if got := parseRetryAfter(in, now); got != want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", in, got, want)
		}
	}
}
