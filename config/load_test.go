package config

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite config/testdata/*.golden from the current output")

// TestGolden parses every testdata/*.yaml and compares the outcome with the .golden file
// beside it: "ok" for a valid file, else the exact error text, lines included.
func TestGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no testdata: %v", err)
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), ".yaml")
		t.Run(name, func(t *testing.T) {
			f, err := os.Open(file)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			got := "ok\n"
			if _, err := Parse(f); err != nil {
				got = err.Error() + "\n"
			}
			golden := strings.TrimSuffix(file, ".yaml") + ".golden"
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./config -run TestGolden -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("Parse(%s):\n--- got\n%s--- want\n%s", file, got, want)
			}
		})
	}
}

func i64(n int64) *int64 { return &n }

// TestParseFull checks that every field of testdata/full.yaml lands where it should.
func TestParseFull(t *testing.T) {
	got, err := Load("testdata/full.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := &Config{
		Listen:      ":8081",
		AdminListen: "127.0.0.1:9911",
		Upstream:    Upstream{URL: "http://127.0.0.1:9000", Timeout: 45 * time.Second, DialTimeout: 500 * time.Millisecond, MaxConns: 64},
		DataDir:     "/var/lib/gatehouse",
		NATS: NATS{
			URLs:           []string{"nats://10.0.0.1:4222", "tls://nats.example.com:4443", "wss://nats.example.com/ws"},
			EmbeddedListen: "127.0.0.1:4223", Credentials: "/etc/gatehouse/sidecar.creds", PingInterval: 5 * time.Second,
		},
		Identity:     Identity{Header: "X-Customer-Id", APIKey: &APIKey{Header: "Authorization", Scheme: "Bearer"}},
		Entitlements: Entitlements{File: "/etc/gatehouse/snapshots.ndjson", CacheSize: 50000},
		Unmatched:    "deny",
		Shadow:       true,
		Routes: []Route{
			{
				Name: "chat", Method: "POST", Path: "/v1/chat/*",
				Features: []RouteFeature{
					{Feature: "api_calls", Cost: i64(1), MaxCost: DefaultMaxCost},
					{Feature: "tokens", CostResponseHeader: "X-Tokens-Used", MaxCost: DefaultMaxCost},
					{Feature: "advanced_analytics", MaxCost: DefaultMaxCost},
				},
				Headers:       map[string]string{"X-Support-Tier": "support_tier"},
				OnUnavailable: "deny",
			},
			{
				Name: "upload", Path: "/v1/files/**",
				Features: []RouteFeature{
					{Feature: "storage_bytes", Cost: i64(0), CostRequestHeader: "Content-Length", MaxCost: 1 << 30},
				},
				OnUnavailable: "allow", Shadow: true,
			},
			{Name: "health", Method: "GET", Path: "/healthz", OnUnavailable: "deny"},
		},
		Server: Server{
			ReadTimeout: 10 * time.Second, WriteTimeout: 20 * time.Second, IdleTimeout: time.Minute,
			ShutdownTimeout: 5 * time.Second, MaxHeaderBytes: 32 << 10, MaxBodyBytes: 1 << 20, Concurrency: 1000,
			BackgroundNice: 5,
		},
		Usage: Usage{Enabled: true, FlushInterval: 250 * time.Millisecond, StreamReplicas: 3, MaxOutboxBytes: 1 << 30},
		Quota: Quota{
			Bucket: "fleet_quota", Replicas: 3, MinLease: 5, MaxLease: 5000, LeasePeriod: 5 * time.Second,
			LowWaterPercent: 40, Wait: 250 * time.Millisecond, IdleReturn: 30 * time.Second,
		},
		Log: Log{Level: "debug", Format: "console", AccessLog: true},
		Flexprice: Flexprice{
			APIURL: "https://eu.api.flexprice.io/v1", APIKeyEnv: "FP_KEY", APIKeyFile: "/run/secrets/flexprice",
			Customers: []string{"cust_acme", "cust_globex"}, SyncInterval: 10 * time.Minute,
			WebhookListen: "0.0.0.0:9902", AdminListen: "",
			Features: map[string]FlexpriceFeature{
				"api_calls": {EventName: "api_request", Mode: "count"},
				"tokens":    {EventName: "llm_usage", Mode: "sum", Property: "tokens"},
			},
		},
	}
	if got.lines["routes[1].features[0].max_cost"] != 41 {
		t.Errorf("line of routes[1].features[0].max_cost = %d, want 41", got.lines["routes[1].features[0].max_cost"])
	}
	got.lines = nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Load(full.yaml):\n got %+v\nwant %+v", got, want)
	}
	// Every field of the schema is set in full.yaml to something other than its default,
	// except the booleans whose default is false (both values are in the file).
	d := Default()
	for _, f := range []struct {
		name string
		a, b any
	}{
		{"listen", got.Listen, d.Listen}, {"admin_listen", got.AdminListen, d.AdminListen},
		{"upstream", got.Upstream, d.Upstream}, {"data_dir", got.DataDir, d.DataDir},
		{"nats.embedded_listen", got.NATS.EmbeddedListen, d.NATS.EmbeddedListen},
		{"nats.ping_interval", got.NATS.PingInterval, d.NATS.PingInterval},
		{"unmatched", got.Unmatched, d.Unmatched}, {"server", got.Server, d.Server},
		{"usage", got.Usage, d.Usage}, {"quota", got.Quota, d.Quota}, {"log", got.Log, d.Log},
		{"flexprice.api_url", got.Flexprice.APIURL, d.Flexprice.APIURL},
		{"flexprice.sync_interval", got.Flexprice.SyncInterval, d.Flexprice.SyncInterval},
	} {
		if reflect.DeepEqual(f.a, f.b) {
			t.Errorf("full.yaml leaves %s at its default", f.name)
		}
	}
}

func TestParseDesignExample(t *testing.T) {
	c, err := Load("testdata/design.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Upstream.Timeout != 30*time.Second || c.Usage.FlushInterval != time.Second ||
		c.Flexprice.SyncInterval != 5*time.Minute || c.Routes[0].Features[1].CostResponseHeader != "X-Tokens-Used" {
		t.Errorf("design.yaml decoded wrong: %+v", c)
	}
	if len(c.NATS.URLs) != 0 || c.Flexprice.Customers == nil {
		t.Errorf("empty lists: urls %v customers %#v", c.NATS.URLs, c.Flexprice.Customers)
	}
}

func TestParseAnchors(t *testing.T) {
	c, err := Load("testdata/anchors.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Routes) != 3 {
		t.Fatalf("routes: %+v", c.Routes)
	}
	for i, want := range []struct{ name, path, onUnavailable string }{
		{"chat", "/v1/chat", "allow"}, {"embed", "/v1/embed", "deny"}, {"search", "/v1/search", "deny"},
	} {
		r := c.Routes[i]
		if r.Name != want.name || r.Path != want.path || r.OnUnavailable != want.onUnavailable ||
			len(r.Features) != 1 || r.Features[0].Feature != "api_calls" || *r.Features[0].Cost != 1 ||
			r.Features[0].MaxCost != DefaultMaxCost {
			t.Errorf("routes[%d] = %+v, want %+v", i, r, want)
		}
	}
}

func TestParseDefaults(t *testing.T) {
	c, err := Parse(strings.NewReader("upstream: {url: 'http://u'}\n" +
		"identity: {api_key: {}}\n" +
		"routes: [{name: a, path: /a, features: [{feature: f}]}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Upstream.URL = "http://u"
	want.Identity.APIKey = &APIKey{Header: DefaultAPIKeyHeader}
	want.Routes = []Route{{Name: "a", Path: "/a", OnUnavailable: DefaultOnUnavailable,
		Features: []RouteFeature{{Feature: "f", MaxCost: DefaultMaxCost}}}}
	c.lines = nil
	if !reflect.DeepEqual(c, want) {
		t.Errorf("got  %+v\nwant %+v", c, want)
	}

	// A Config built in Go gets the same per-item defaults from SetDefaults.
	g := Default()
	g.Upstream.URL = "http://u"
	g.Identity.APIKey = &APIKey{}
	g.Routes = []Route{{Name: "a", Path: "/a", Features: []RouteFeature{{Feature: "f"}}}}
	g.SetDefaults()
	if !reflect.DeepEqual(g, want) {
		t.Errorf("SetDefaults: got %+v\nwant %+v", g, want)
	}
}

func TestSyntaxErrorLine(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		line     int
	}{
		{"bad indent", "upstream:\n  url: http://u\nroutes:\n  - name: a\n    path: /a\n   features: []\n", 6},
		{"tab", "a: 1\nb: 2\n\tc: 3\n", 3},
		{"first line", "a: b: c\n", 1},
		{"unclosed flow", "upstream: {url: http://u}\nroutes: [\n  {name: a}\n", 3},
		{"error inside a flow", "routes: [\n  {name: a},\n  {name: b} x: y\n]\n", 3},
		{"unclosed quote after a multi-line one", "a: 'x\n  y'\nb: 'z\n", 3},
		{"unknown anchor", "a: 1\nb: *nope\n", 2},
		{"control character", "a: 1\nb: \x01\n", 2},
		{"second document", "a: 1\n---\nb: [\n", 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(strings.NewReader(tc.in))
			var se *SyntaxError
			if !errors.As(err, &se) {
				t.Fatalf("got %v (%T), want a *SyntaxError", err, err)
			}
			if se.Line != tc.line || !strings.HasSuffix(se.Error(), " at line "+strconv.Itoa(tc.line)) {
				t.Errorf("got %q (line %d), want line %d", se.Error(), se.Line, tc.line)
			}
		})
	}
}

func TestUnknownKey(t *testing.T) {
	in := "upstream:\n  url: http://u\nroutes:\n  - name: a\n    path: /a\n    features:\n    featurs: []\n"
	_, err := Parse(strings.NewReader(in))
	var ce *Error
	if !errors.As(err, &ce) {
		t.Fatalf("got %v, want *Error", err)
	}
	want := Problem{Path: "routes[0].featurs", Line: 7, Msg: `unknown field (did you mean "features"?)`}
	if len(ce.Problems) != 1 || ce.Problems[0] != want {
		t.Fatalf("got %#v, want %#v", ce.Problems, want)
	}
	if s := err.Error(); s != `routes[0].featurs: unknown field (did you mean "features"?) at line 7` {
		t.Errorf("message %q", s)
	}
}

func TestLoad(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gatehouse.yaml")
	if err := os.WriteFile(path, []byte("upstream: {url: http://u}\nlisten: nope\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Load(path)
	want := path + `: listen: must be host:port with a numeric port, such as ":8080" or "127.0.0.1:8080" (got "nope") at line 2`
	if err == nil || err.Error() != want {
		t.Errorf("got %v\nwant %s", err, want)
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

func TestParseTooLarge(t *testing.T) {
	r := strings.NewReader("# " + strings.Repeat("x", MaxFileBytes))
	if _, err := Parse(r); err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Errorf("got %v", err)
	}
}

func TestAliasBomb(t *testing.T) {
	// 1101 routes, each with the same list of 1100 features by an alias: far more than
	// maxNodes values once expanded, from 60 kB.
	in := "upstream: {url: http://u}\nroutes:\n  - {name: a, path: /a, features: &fs [" +
		strings.TrimSuffix(strings.Repeat("{feature: f},", 1100), ",") + "]}\n" +
		strings.Repeat("  - {name: b, path: /b, features: *fs}\n", 1100)
	_, err := Parse(strings.NewReader(in))
	if err == nil || !strings.Contains(err.Error(), "once aliases are expanded") {
		t.Errorf("got %.300v", err)
	}
}

// FuzzParse checks that Parse never panics, that every problem it reports has a path,
// and that a configuration it accepts validates again.
func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.yaml")
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte("a: &a [*a]\n"))
	f.Add([]byte("<<: {listen: ':1'}\nupstream: {url: http://u}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(strings.NewReader(string(data)))
		var ce *Error
		if errors.As(err, &ce) {
			if len(ce.Problems) == 0 {
				t.Fatal("*Error without problems")
			}
			for _, p := range ce.Problems {
				if p.Path == "" || p.Msg == "" {
					t.Fatalf("problem without path or message: %#v", p)
				}
				if strings.ContainsAny(p.String(), "\r\n") {
					t.Fatalf("problem spans lines: %q", p.String())
				}
			}
		}
		if err == nil {
			if c == nil {
				t.Fatal("nil Config and nil error")
			}
			if err := c.Validate(); err != nil {
				t.Fatalf("Parse accepted what Validate refuses: %v", err)
			}
		}
	})
}
