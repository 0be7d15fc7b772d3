// Package config owns gatehouse's configuration: the YAML schema of DESIGN.md section 10,
// its defaults, strict decoding (unknown keys are errors) and validation that reports
// every problem at once, each with its field path and line.
//
// It must not start anything: it reads bytes and returns a *Config or an error.
package config

import "time"

// Config is one gatehouse configuration file. The zero value of a field is replaced by
// its default (see Default) before the file is decoded over it.
type Config struct {
	Listen       string       `yaml:"listen"`
	AdminListen  string       `yaml:"admin_listen"`
	Upstream     Upstream     `yaml:"upstream"`
	DataDir      string       `yaml:"data_dir"`
	NATS         NATS         `yaml:"nats"`
	Identity     Identity     `yaml:"identity"`
	Entitlements Entitlements `yaml:"entitlements"`
	Unmatched    string       `yaml:"unmatched"` // allow | deny
	Shadow       bool         `yaml:"shadow"`    // every route decides, logs and counts, never refuses
	Routes       []Route      `yaml:"routes"`
	Server       Server       `yaml:"server"`
	Usage        Usage        `yaml:"usage"`
	Quota        Quota        `yaml:"quota"`
	Log          Log          `yaml:"log"`
	Flexprice    Flexprice    `yaml:"flexprice"`

	// lines maps the field path of every key and list item that Parse read (as
	// Problem.Path spells it) to its line in the file, so that Validate can name lines.
	// It is nil for a Config built in Go; it goes stale if routes are reordered.
	lines map[string]int
}

// Upstream is the API that gatehouse forwards admitted requests to.
type Upstream struct {
	URL         string        `yaml:"url"`          // http://host:port; https is supported
	Timeout     time.Duration `yaml:"timeout"`      // whole exchange with the upstream
	DialTimeout time.Duration `yaml:"dial_timeout"` // TCP connect
	MaxConns    int           `yaml:"max_conns"`    // open connections to the upstream
}

// NATS says where the control plane is. No URLs: an embedded server under DataDir.
type NATS struct {
	URLs           []string      `yaml:"urls"`
	EmbeddedListen string        `yaml:"embedded_listen"`
	Credentials    string        `yaml:"credentials"`   // optional .creds file
	PingInterval   time.Duration `yaml:"ping_interval"` // a dead link is noticed within ~2 of these
}

// Identity says how a request names its customer.
type Identity struct {
	// Header carries the customer id, as set by a trusted auth layer in front of
	// gatehouse, and is the header gatehouse forwards the customer id in. When APIKey is
	// set, the key alone identifies: Header is then only the forwarded header
	// (X-Customer-Id when empty), and a client-sent copy is replaced.
	Header string  `yaml:"header"`
	APIKey *APIKey `yaml:"api_key"`
}

// APIKey identifies the customer by an API key whose SHA-256 is listed in a snapshot.
type APIKey struct {
	Header string `yaml:"header"` // default Authorization
	Scheme string `yaml:"scheme"` // e.g. Bearer; empty: the whole header value is the key
}

// Entitlements configures where snapshots come from besides the KV bucket.
type Entitlements struct {
	File      string `yaml:"file"`       // JSON array or NDJSON of snapshots, pushed into the bucket at start
	CacheSize int    `yaml:"cache_size"` // customers kept decoded in memory; the rest are read from Badger
}

// Route maps requests to the features they use. Routes are tried in order; the first
// match wins.
type Route struct {
	Name     string            `yaml:"name"`
	Method   string            `yaml:"method"` // empty: any method
	Path     string            `yaml:"path"`   // exact, or ending in /* (one segment) or /** (any depth)
	Features []RouteFeature    `yaml:"features"`
	Headers  map[string]string `yaml:"headers"` // header name -> static or config feature
	// OnUnavailable decides when the replica has never synced, or a hard limit's fleet
	// quota cannot be reached and this sidecar's lease is spent: deny (503 with
	// Retry-After) or allow (forwarded and counted like any other request).
	OnUnavailable string `yaml:"on_unavailable"` // deny | allow
	Shadow        bool   `yaml:"shadow"`
}

// RouteFeature is one feature a route needs, and what a request costs of it.
//
// For a metered feature the cost is, in order of precedence: the value of
// CostResponseHeader in the upstream's response (then Cost, default 0, is what is
// reserved before forwarding); the value of CostRequestHeader in the request (then Cost,
// when set, is the cost of a request without the header); or Cost (default 1).
type RouteFeature struct {
	Feature            string `yaml:"feature"`
	Cost               *int64 `yaml:"cost"`
	CostRequestHeader  string `yaml:"cost_request_header"`
	CostResponseHeader string `yaml:"cost_response_header"`
	MaxCost            int64  `yaml:"max_cost"` // bound on a header-supplied cost; default 1,000,000
}

// Server bounds what a client can make the proxy do.
type Server struct {
	ReadTimeout     time.Duration `yaml:"read_timeout"`
	WriteTimeout    time.Duration `yaml:"write_timeout"`
	IdleTimeout     time.Duration `yaml:"idle_timeout"`
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	MaxHeaderBytes  int           `yaml:"max_header_bytes"` // larger request headers get 431
	MaxBodyBytes    int           `yaml:"max_body_bytes"`   // larger request bodies get 413
	Concurrency     int           `yaml:"concurrency"`      // requests served at once
	// BackgroundNice is added to the nice value of the thread that publishes usage
	// (Linux), so that its bursts give way to the request path when the cores are busy;
	// 0 leaves it at the process's priority. Default 10.
	BackgroundNice int `yaml:"background_nice"`
}

// Usage configures usage out (DESIGN.md section 7).
type Usage struct {
	// Enabled makes committed usage durable and publishes it (default true). Off, usage
	// is counted in memory only: limits still hold, but not across restarts, and nothing
	// reaches billing. For measuring the cost of accounting, not for production.
	Enabled        bool          `yaml:"enabled"`
	FlushInterval  time.Duration `yaml:"flush_interval"`
	StreamReplicas int           `yaml:"stream_replicas"`
	MaxOutboxBytes int64         `yaml:"max_outbox_bytes"`
}

// Quota configures fleet-exact hard limits (DESIGN.md section 6): each sidecar admits
// hard-limited usage only against a lease of the limit taken from the KV bucket
// Bucket, so that a fleet of sidecars never admits more than the limit between them.
type Quota struct {
	// Enabled takes leases for every hard limit (default true). Off, each sidecar
	// enforces every hard limit alone: a fleet of n sidecars may admit n times the limit.
	Enabled  bool   `yaml:"enabled"`
	Bucket   string `yaml:"bucket"`    // KV bucket of the leases; default gatehouse_quota
	Replicas int    `yaml:"replicas"`  // replicas of the bucket when gatehouse creates it
	MinLease int64  `yaml:"min_lease"` // smallest lease sized by rate; default 10
	MaxLease int64  `yaml:"max_lease"` // largest lease taken at once; default 100,000
	// LeasePeriod sizes a lease by rate: what lasts this long at the sidecar's recent
	// rate of use (default 2s). A lease is the larger of that and 1/16 of what is left
	// per sidecar (at most max_lease), and never more than half of what is left per
	// sidecar.
	LeasePeriod time.Duration `yaml:"lease_period"`
	// LowWaterPercent is the part of a lease, in percent, below which it is refilled
	// ahead of need, off the request path (default 25).
	LowWaterPercent int `yaml:"low_water_percent"`
	// Wait bounds how long a request waits for a refill when its sidecar holds nothing
	// and the customer has quota left (default 1s); then the route's on_unavailable
	// policy decides.
	Wait time.Duration `yaml:"wait"`
	// IdleReturn returns a lease that no request used for this long (default 1m; 0s
	// never), so that other sidecars can take it.
	IdleReturn time.Duration `yaml:"idle_return"`
}

// Log configures the process log.
type Log struct {
	Level     string `yaml:"level"`  // debug | info | warn | error
	Format    string `yaml:"format"` // json | console
	AccessLog bool   `yaml:"access_log"`
}

// Flexprice configures `gatehouse bridge flexprice`; the sidecar ignores it.
type Flexprice struct {
	APIURL        string                      `yaml:"api_url"`
	APIKeyEnv     string                      `yaml:"api_key_env"`
	APIKeyFile    string                      `yaml:"api_key_file"`
	Customers     []string                    `yaml:"customers"`
	SyncInterval  time.Duration               `yaml:"sync_interval"`
	WebhookListen string                      `yaml:"webhook_listen"`
	AdminListen   string                      `yaml:"admin_listen"`
	Features      map[string]FlexpriceFeature `yaml:"features"`
}

// FlexpriceFeature says how one feature's usage becomes Flexprice events.
type FlexpriceFeature struct {
	EventName string `yaml:"event_name"`
	Mode      string `yaml:"mode"`     // count | sum
	Property  string `yaml:"property"` // sum: the property that carries the quantity
}

// Default returns the configuration that an empty file means.
func Default() *Config {
	return &Config{
		Listen:       ":8080",
		AdminListen:  "127.0.0.1:9901",
		Upstream:     Upstream{Timeout: 30 * time.Second, DialTimeout: 3 * time.Second, MaxConns: 1024},
		DataDir:      "./gatehouse-data",
		NATS:         NATS{EmbeddedListen: "127.0.0.1:4222", PingInterval: 2 * time.Second},
		Identity:     Identity{Header: "X-Customer-Id"},
		Entitlements: Entitlements{CacheSize: 100_000},
		Unmatched:    "allow",
		Server: Server{
			ReadTimeout: 60 * time.Second, WriteTimeout: 60 * time.Second, IdleTimeout: 120 * time.Second,
			ShutdownTimeout: 15 * time.Second, MaxHeaderBytes: 16 << 10, MaxBodyBytes: 10 << 20,
			Concurrency: 256 * 1024, BackgroundNice: 10,
		},
		Usage: Usage{Enabled: true, FlushInterval: 5 * time.Second, StreamReplicas: 1, MaxOutboxBytes: 256 << 20},
		Quota: Quota{
			Enabled: true, Bucket: "gatehouse_quota", Replicas: 1, MinLease: 10, MaxLease: 100_000,
			LeasePeriod: 2 * time.Second, LowWaterPercent: 25, Wait: time.Second, IdleReturn: time.Minute,
		},
		Log: Log{Level: "info", Format: "json"},
		Flexprice: Flexprice{
			APIURL: "https://us.api.flexprice.io/v1", APIKeyEnv: "FLEXPRICE_API_KEY",
			SyncInterval: 5 * time.Minute, WebhookListen: "127.0.0.1:9902", AdminListen: "127.0.0.1:9903",
		},
	}
}
