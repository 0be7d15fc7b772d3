package config

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// valid returns a Config built in Go that passes Validate, for cases to break.
func valid() *Config {
	c := Default()
	c.Upstream.URL = "http://127.0.0.1:9000"
	c.Identity.APIKey = &APIKey{Scheme: "Bearer"}
	c.Routes = []Route{
		{
			Name: "chat", Method: "POST", Path: "/v1/chat/*",
			Features: []RouteFeature{
				{Feature: "api_calls", Cost: i64(1)},
				{Feature: "tokens", CostResponseHeader: "X-Tokens-Used"},
			},
			Headers: map[string]string{"X-Support-Tier": "support_tier"},
		},
		{Name: "health", Path: "/healthz"},
	}
	c.Flexprice.Features = map[string]FlexpriceFeature{
		"api_calls": {EventName: "api_request", Mode: "count"},
		"tokens":    {EventName: "llm_usage", Mode: "sum", Property: "tokens"},
	}
	c.SetDefaults()
	return c
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(c *Config)
		want string // the whole error text; "" for valid
	}{
		{"valid", func(c *Config) {}, ""},
		{"default lacks upstream", func(c *Config) { *c = *Default() }, `upstream.url: required: the API to forward to, such as "http://127.0.0.1:9000"`},

		// listeners
		{"listen any host", func(c *Config) { c.Listen = ":0"; c.AdminListen = ":0" }, ""},
		{"listen ipv6", func(c *Config) { c.Listen = "[::1]:8080" }, ""},
		{"listen name", func(c *Config) { c.Listen = "localhost:8080" }, ""},
		{"listen empty", func(c *Config) { c.Listen = "" }, `listen: required: host:port such as ":8080" or "127.0.0.1:8080"`},
		{"listen no port", func(c *Config) { c.Listen = "127.0.0.1" }, `listen: must be host:port with a numeric port, such as ":8080" or "127.0.0.1:8080" (got "127.0.0.1")`},
		{"listen named port", func(c *Config) { c.Listen = ":http" }, `listen: must be host:port with a numeric port, such as ":8080" or "127.0.0.1:8080" (got ":http")`},
		{"listen bad host", func(c *Config) { c.Listen = "a b:80" }, `listen: must be host:port with a numeric port, such as ":8080" or "127.0.0.1:8080" (got "a b:80")`},
		{"admin disabled", func(c *Config) { c.AdminListen = "" }, ""},
		{"admin same port", func(c *Config) { c.AdminListen = "127.0.0.1:8080" }, `admin_listen: "127.0.0.1:8080" takes the same port as listen (":8080")`},
		{"admin same port other host", func(c *Config) { c.Listen = "10.0.0.1:8080"; c.AdminListen = "127.0.0.1:8080" }, ""},
		{"embedded same port", func(c *Config) { c.NATS.EmbeddedListen = "127.0.0.1:9901" }, `nats.embedded_listen: "127.0.0.1:9901" takes the same port as admin_listen ("127.0.0.1:9901")`},
		{"embedded unused", func(c *Config) { c.NATS.EmbeddedListen = "127.0.0.1:9901"; c.NATS.URLs = []string{"nats://n:4222"} }, ""},
		{"embedded bad", func(c *Config) { c.NATS.EmbeddedListen = "4222" }, `nats.embedded_listen: must be host:port with a numeric port, such as ":8080" or "127.0.0.1:8080" (got "4222")`},

		// upstream
		{"upstream https slash", func(c *Config) { c.Upstream.URL = "https://api.internal:8443/" }, ""},
		{"upstream scheme", func(c *Config) { c.Upstream.URL = "ftp://x" }, `upstream.url: must start with http:// or https:// (got "ftp://x")`},
		{"upstream no scheme", func(c *Config) { c.Upstream.URL = "127.0.0.1:9000" }, `upstream.url: must be a URL such as "http://127.0.0.1:9000" (got "127.0.0.1:9000")`},
		{"upstream no host", func(c *Config) { c.Upstream.URL = "http:///x" }, `upstream.url: must name a host (got "http:///x")`},
		{"upstream path", func(c *Config) { c.Upstream.URL = "http://u/api" }, `upstream.url: must not have a path: each request is forwarded with its own path (got "/api")`},
		{"upstream query", func(c *Config) { c.Upstream.URL = "http://u/?a=1" }, `upstream.url: must not have a query or fragment (got "http://u/?a=1")`},
		{"upstream user", func(c *Config) { c.Upstream.URL = "http://me:secret@u" }, `upstream.url: must not hold user info (got "http://xxx@u")`},
		{"upstream timeouts", func(c *Config) { c.Upstream.Timeout = 0; c.Upstream.DialTimeout = -time.Second },
			"upstream.timeout: must be > 0 (got 0s)\nupstream.dial_timeout: must be > 0 (got -1s)"},
		{"upstream max_conns", func(c *Config) { c.Upstream.MaxConns = 0 }, `upstream.max_conns: must be > 0 (got 0)`},
		{"data_dir", func(c *Config) { c.DataDir = "" }, `data_dir: required: the directory for Badger, embedded NATS storage and the sidecar id`},

		// nats
		{"nats urls", func(c *Config) { c.NATS.URLs = []string{"nats://a:4222", "tls://b", "ws://c/ws", "wss://u:p@d"} }, ""},
		{"nats scheme", func(c *Config) { c.NATS.URLs = []string{"http://a:4222"} }, `nats.urls[0]: must start with nats://, tls://, ws:// or wss:// (got "http://a:4222")`},
		{"nats bare", func(c *Config) { c.NATS.URLs = []string{"a:4222"} }, `nats.urls[0]: must be a URL such as "nats://127.0.0.1:4222" (got "a:4222")`},
		{"nats repeated", func(c *Config) { c.NATS.URLs = []string{"nats://a", "nats://a"} }, `nats.urls[1]: repeats nats.urls[0]`},
		{"nats ping", func(c *Config) { c.NATS.PingInterval = 0 }, `nats.ping_interval: must be > 0 (got 0s)`},

		// identity
		{"identity header only", func(c *Config) { c.Identity.APIKey = nil }, ""},
		{"identity api key only", func(c *Config) { c.Identity.Header = "" }, ""},
		{"identity none", func(c *Config) { c.Identity = Identity{} }, `identity: set header, api_key or both: requests must name their customer`},
		{"identity header token", func(c *Config) { c.Identity.Header = "X:Id" }, "identity.header: must be a header name: letters, digits and !#$%&'*+-.^_`|~ (got \"X:Id\")"},
		{"identity header hop", func(c *Config) { c.Identity.Header = "Keep-Alive" }, `identity.header: must not be a hop-by-hop header, which proxies remove (got "Keep-Alive")`},
		{"identity header host", func(c *Config) { c.Identity.Header = "host" }, `identity.header: must not be Host or Content-Length, which frame the request (got "host")`},
		{"api key header empty", func(c *Config) { c.Identity.APIKey.Header = "" }, `identity.api_key.header: required: the header that carries the key, such as Authorization`},
		{"api key header same", func(c *Config) { c.Identity.APIKey.Header = "x-customer-id" }, `identity.api_key.header: must differ from identity.header (both "x-customer-id")`},
		{"api key header te", func(c *Config) { c.Identity.APIKey.Header = "TE" }, `identity.api_key.header: must not be a hop-by-hop header, which proxies remove (got "TE")`},
		{"api key no scheme", func(c *Config) { c.Identity.APIKey.Scheme = "" }, ""},
		{"api key scheme", func(c *Config) { c.Identity.APIKey.Scheme = "Bearer " }, `identity.api_key.scheme: must be one word such as Bearer, or empty for the whole header value (got "Bearer ")`},
		{"unmatched", func(c *Config) { c.Unmatched = "Deny" }, `unmatched: must be allow or deny (got "Deny")`},

		// routes
		{"no routes", func(c *Config) { c.Routes = nil }, ""},
		{"route name required", func(c *Config) { c.Routes[0].Name = "" }, `routes[0].name: required: names the route in logs and metrics`},
		{"route name chars", func(c *Config) { c.Routes[0].Name = "chat v1" }, `routes[0].name: must be 1 to 128 letters, digits or _ - . : / (got "chat v1")`},
		{"route name long", func(c *Config) { c.Routes[0].Name = strings.Repeat("a", 129) }, `routes[0].name: must be 1 to 128 letters, digits or _ - . : / (got "` + strings.Repeat("a", 129) + `")`},
		{"route name unique", func(c *Config) { c.Routes[1].Name = "chat" }, `routes[1].name: "chat" is also the name of routes[0]`},
		{"route method custom", func(c *Config) { c.Routes[0].Method = "PROPFIND" }, ""},
		{"route method lower", func(c *Config) { c.Routes[0].Method = "Post" }, `routes[0].method: must be an upper-case HTTP method such as GET or POST, or absent for any (got "Post")`},
		{"route method space", func(c *Config) { c.Routes[0].Method = "GET POST" }, `routes[0].method: must be an upper-case HTTP method such as GET or POST, or absent for any (got "GET POST")`},
		{"route path root", func(c *Config) { c.Routes[1].Path = "/" }, ""},
		{"route path trailing slash", func(c *Config) { c.Routes[1].Path = "/v1/" }, ""},
		{"route path catch-all", func(c *Config) { c.Routes[1].Path = "/**" }, ""},
		{"route path required", func(c *Config) { c.Routes[1].Path = "" }, `routes[1].path: required: such as "/v1/chat", "/v1/chat/*" or "/v1/**"`},
		{"route path relative", func(c *Config) { c.Routes[1].Path = "healthz" }, `routes[1].path: must start with "/" (got "healthz")`},
		{"route path query", func(c *Config) { c.Routes[1].Path = "/a?b" }, `routes[1].path: must not contain "?" or "#": routes match the path only (got "/a?b")`},
		{"route path fragment", func(c *Config) { c.Routes[1].Path = "/a#b" }, `routes[1].path: must not contain "?" or "#": routes match the path only (got "/a#b")`},
		{"route path double slash", func(c *Config) { c.Routes[1].Path = "/a//b" }, `routes[1].path: must not contain "//" (got "/a//b")`},
		{"route path dot", func(c *Config) { c.Routes[1].Path = "/a/./b" }, `routes[1].path: must not contain "." or ".." segments: request paths are normalized before matching (got "/a/./b")`},
		{"route path space", func(c *Config) { c.Routes[1].Path = "/a b" }, `routes[1].path: must not contain spaces or control characters (got "/a b")`},
		{"route path inner star", func(c *Config) { c.Routes[1].Path = "/a/*/b" }, `routes[1].path: may contain "*" only as a final "/*" (one segment) or "/**" (any depth) (got "/a/*/b")`},
		{"route path partial star", func(c *Config) { c.Routes[1].Path = "/a/b*" }, `routes[1].path: may contain "*" only as a final "/*" (one segment) or "/**" (any depth) (got "/a/b*")`},
		{"route path triple star", func(c *Config) { c.Routes[1].Path = "/a/***" }, `routes[1].path: may contain "*" only as a final "/*" (one segment) or "/**" (any depth) (got "/a/***")`},
		{"route duplicate", func(c *Config) { c.Routes[1].Path = "/v1/chat/*"; c.Routes[1].Method = "POST" },
			`routes[1].path: never matches: routes[0] ("chat", POST /v1/chat/*) comes first and matches every request it would`},
		{"route covered by star", func(c *Config) { c.Routes[1].Path = "/v1/chat/x"; c.Routes[1].Method = "POST" },
			`routes[1].path: never matches: routes[0] ("chat", POST /v1/chat/*) comes first and matches every request it would`},
		{"route other method", func(c *Config) { c.Routes[1].Path = "/v1/chat/x"; c.Routes[1].Method = "GET" }, ""},
		{"route any method not covered by POST", func(c *Config) { c.Routes[1].Path = "/v1/chat/x" }, ""},
		{"route deeper than star", func(c *Config) { c.Routes[1].Path = "/v1/chat/x/y" }, ""},
		{"route star vs double star", func(c *Config) { c.Routes[1].Path = "/v1/chat/**"; c.Routes[1].Method = "POST" }, ""},
		{"route covered by double star", func(c *Config) {
			c.Routes[0].Path = "/v1/**"
			c.Routes[0].Method = ""
			c.Routes[1].Path = "/v1/a/b/*"
		}, `routes[1].path: never matches: routes[0] ("chat", any method /v1/**) comes first and matches every request it would`},
		{"route prefix itself covered", func(c *Config) { c.Routes[0].Path = "/v1/**"; c.Routes[0].Method = ""; c.Routes[1].Path = "/v1" },
			`routes[1].path: never matches: routes[0] ("chat", any method /v1/**) comes first and matches every request it would`},
		{"route sibling prefix not covered", func(c *Config) { c.Routes[0].Path = "/v1/**"; c.Routes[0].Method = ""; c.Routes[1].Path = "/v10" }, ""},
		{"route catch-all first", func(c *Config) { c.Routes[0].Path = "/**"; c.Routes[0].Method = "" },
			`routes[1].path: never matches: routes[0] ("chat", any method /**) comes first and matches every request it would`},
		{"route unavailable allow", func(c *Config) { c.Routes[0].OnUnavailable = "allow" }, ""},
		{"route unavailable", func(c *Config) { c.Routes[0].OnUnavailable = "fail" }, `routes[0].on_unavailable: must be deny or allow (got "fail")`},

		// route features
		{"feature key", func(c *Config) { c.Routes[0].Features[0].Feature = "api/calls" },
			`routes[0].features[0].feature: feature key "api/calls": byte 3 is '/': only A-Z a-z 0-9 _ - . : are allowed`},
		{"feature key long", func(c *Config) { c.Routes[0].Features[0].Feature = strings.Repeat("f", 257) },
			`routes[0].features[0].feature: feature key longer than 256 bytes`},
		{"feature key chars", func(c *Config) { c.Routes[0].Features[0].Feature = "a.b:c-d_E9" }, ""},
		{"feature required", func(c *Config) { c.Routes[0].Features[0].Feature = "" }, `routes[0].features[0].feature: required: the feature's lookup key, such as api_calls`},
		{"feature twice", func(c *Config) { c.Routes[0].Features[1].Feature = "api_calls" }, `routes[0].features[1].feature: "api_calls" is already features[0] of this route`},
		{"feature twice in two routes", func(c *Config) { c.Routes[1].Features = []RouteFeature{{Feature: "api_calls", MaxCost: 1}} }, ""},
		{"features 16", func(c *Config) { c.Routes[1].Features = features(16) }, ""},
		{"features 17", func(c *Config) { c.Routes[1].Features = features(17) }, `routes[1].features: at most 16 features per route (got 17)`},
		{"cost zero", func(c *Config) { c.Routes[0].Features[0].Cost = i64(0) }, ""},
		{"cost negative", func(c *Config) { c.Routes[0].Features[0].Cost = i64(-1) }, `routes[0].features[0].cost: must be >= 0 (got -1)`},
		{"cost at max", func(c *Config) { c.Routes[0].Features[0].Cost = i64(DefaultMaxCost) }, ""},
		{"cost over max", func(c *Config) { c.Routes[0].Features[0].Cost = i64(DefaultMaxCost + 1) }, `routes[0].features[0].cost: must be <= max_cost 1000000 (got 1000001)`},
		{"max cost zero", func(c *Config) { c.Routes[0].Features[0].MaxCost = 0 }, `routes[0].features[0].max_cost: must be > 0 (got 0)`},
		{"max cost negative", func(c *Config) { c.Routes[0].Features[0].MaxCost = -5 }, `routes[0].features[0].max_cost: must be > 0 (got -5)`},
		{"both cost headers", func(c *Config) { c.Routes[0].Features[1].CostRequestHeader = "X-Cost" },
			`routes[0].features[1].cost_response_header: set cost_request_header or cost_response_header, not both`},
		{"cost request header", func(c *Config) { c.Routes[0].Features[0].CostRequestHeader = "Content-Length" }, ""},
		{"cost request header hop", func(c *Config) { c.Routes[0].Features[0].CostRequestHeader = "Upgrade" },
			`routes[0].features[0].cost_request_header: must not be a hop-by-hop header, which proxies remove (got "Upgrade")`},
		{"cost response header hop", func(c *Config) { c.Routes[0].Features[1].CostResponseHeader = "Trailer" },
			`routes[0].features[1].cost_response_header: must not be a hop-by-hop header, which proxies remove (got "Trailer")`},
		{"cost response header token", func(c *Config) { c.Routes[0].Features[1].CostResponseHeader = "X(Used)" },
			"routes[0].features[1].cost_response_header: must be a header name: letters, digits and !#$%&'*+-.^_`|~ (got \"X(Used)\")"},

		// route headers
		{"header forwards", func(c *Config) { c.Routes[0].Headers["X-Plan"] = "plan.name" }, ""},
		{"header no identity header", func(c *Config) { c.Identity.Header = ""; c.Routes[0].Headers["X-Customer-Id"] = "x" }, ""},
		{"header hop", func(c *Config) { c.Routes[0].Headers["Transfer-Encoding"] = "x" },
			`routes[0].headers.Transfer-Encoding: must not be a hop-by-hop header, which proxies remove (got "Transfer-Encoding")`},
		{"header proxy-", func(c *Config) { c.Routes[0].Headers["proxy-connection"] = "x" },
			`routes[0].headers.proxy-connection: must not be a hop-by-hop header, which proxies remove (got "proxy-connection")`},
		{"header content-length", func(c *Config) { c.Routes[0].Headers["content-length"] = "x" },
			`routes[0].headers.content-length: must not be Host or Content-Length, which frame the request (got "content-length")`},
		{"header identity", func(c *Config) { c.Routes[0].Headers["x-customer-id"] = "x" },
			`routes[0].headers.x-customer-id: must not be identity.header ("X-Customer-Id"), which carries the customer`},
		{"header api key", func(c *Config) { c.Routes[0].Headers["Authorization"] = "x" },
			`routes[0].headers.Authorization: must not be identity.api_key.header ("Authorization")`},
		{"header forwarded", func(c *Config) { c.Routes[0].Headers["x-forwarded-proto"] = "x" },
			`routes[0].headers.x-forwarded-proto: must not be x-forwarded-proto, which the proxy sets`},
		{"header case twice", func(c *Config) { c.Routes[0].Headers["X-SUPPORT-TIER"] = "x" },
			`routes[0].headers.X-Support-Tier: names the same header as "X-SUPPORT-TIER" (header names ignore case)`},
		{"header value", func(c *Config) { c.Routes[0].Headers["X-Support-Tier"] = "" }, `routes[0].headers.X-Support-Tier: value: feature key is empty`},
		{"header name quoted path", func(c *Config) { c.Routes[0].Headers["X.Y"] = "x" }, ""},
		{"header name bad", func(c *Config) { c.Routes[0].Headers["X Y"] = "x" },
			"routes[0].headers[\"X Y\"]: must be a header name: letters, digits and !#$%&'*+-.^_`|~ (got \"X Y\")"},

		// server, usage, log
		{"server timeouts", func(c *Config) {
			c.Server.ReadTimeout, c.Server.WriteTimeout, c.Server.IdleTimeout, c.Server.ShutdownTimeout = 0, 0, -1, 0
		},
			"server.read_timeout: must be > 0 (got 0s)\nserver.write_timeout: must be > 0 (got 0s)\nserver.idle_timeout: must be > 0 (got -1ns)\nserver.shutdown_timeout: must be > 0 (got 0s)"},
		{"header bytes low edge", func(c *Config) { c.Server.MaxHeaderBytes = 1024 }, ""},
		{"header bytes high edge", func(c *Config) { c.Server.MaxHeaderBytes = 1 << 20 }, ""},
		{"header bytes low", func(c *Config) { c.Server.MaxHeaderBytes = 1023 }, `server.max_header_bytes: must be between 1024 and 1048576 (got 1023)`},
		{"header bytes high", func(c *Config) { c.Server.MaxHeaderBytes = 1<<20 + 1 }, `server.max_header_bytes: must be between 1024 and 1048576 (got 1048577)`},
		{"body bytes zero", func(c *Config) { c.Server.MaxBodyBytes = 0 }, ""},
		{"body bytes negative", func(c *Config) { c.Server.MaxBodyBytes = -1 }, `server.max_body_bytes: must be >= 0 (got -1)`},
		{"concurrency", func(c *Config) { c.Server.Concurrency = 0 }, `server.concurrency: must be > 0 (got 0)`},
		{"flush edges", func(c *Config) { c.Usage.FlushInterval = 10 * time.Millisecond }, ""},
		{"flush hour", func(c *Config) { c.Usage.FlushInterval = time.Hour }, ""},
		{"flush short", func(c *Config) { c.Usage.FlushInterval = 9 * time.Millisecond }, `usage.flush_interval: must be between 10ms and 1h (got 9ms)`},
		{"flush long", func(c *Config) { c.Usage.FlushInterval = time.Hour + time.Second }, `usage.flush_interval: must be between 10ms and 1h (got 1h0m1s)`},
		{"replicas 5", func(c *Config) { c.Usage.StreamReplicas = 5 }, ""},
		{"replicas 0", func(c *Config) { c.Usage.StreamReplicas = 0 }, `usage.stream_replicas: must be between 1 and 5 (got 0)`},
		{"replicas 6", func(c *Config) { c.Usage.StreamReplicas = 6 }, `usage.stream_replicas: must be between 1 and 5 (got 6)`},
		{"outbox", func(c *Config) { c.Usage.MaxOutboxBytes = 0 }, `usage.max_outbox_bytes: must be > 0 (got 0)`},
		{"log levels", func(c *Config) { c.Log.Level = "warn" }, ""},
		{"log level", func(c *Config) { c.Log.Level = "INFO" }, `log.level: must be debug, info, warn or error (got "INFO")`},
		{"log format", func(c *Config) { c.Log.Format = "text" }, `log.format: must be json or console (got "text")`},

		// quota
		{"quota off keeps checks", func(c *Config) { c.Quota.Enabled = false }, ""},
		{"quota bucket entitlements", func(c *Config) { c.Quota.Bucket = "gatehouse_entitlements" }, `quota.bucket: must differ from the entitlements bucket (got "gatehouse_entitlements")`},
		{"quota bucket empty", func(c *Config) { c.Quota.Bucket = "" }, `quota.bucket: required: the KV bucket of the leases, such as gatehouse_quota`},
		{"quota max below min", func(c *Config) { c.Quota.MinLease, c.Quota.MaxLease = 100, 99 }, `quota.max_lease: must be >= quota.min_lease (got 99 < 100)`},
		{"quota one unit", func(c *Config) { c.Quota.MinLease, c.Quota.MaxLease = 1, 1 }, ""},
		{"quota wait long", func(c *Config) { c.Quota.Wait = 2 * time.Minute }, `quota.wait: must be > 0 and at most 1m (got 2m)`},
		{"quota no idle return", func(c *Config) { c.Quota.IdleReturn = 0 }, ""},

		// flexprice
		{"flexprice api url", func(c *Config) { c.Flexprice.APIURL = "us.api.flexprice.io" },
			`flexprice.api_url: must be an http(s) URL without query, such as "https://us.api.flexprice.io/v1" (got "us.api.flexprice.io")`},
		{"flexprice key file only", func(c *Config) { c.Flexprice.APIKeyEnv = ""; c.Flexprice.APIKeyFile = "/k" }, ""},
		{"flexprice no key", func(c *Config) { c.Flexprice.APIKeyEnv = "" }, `flexprice.api_key_env: set api_key_env or api_key_file: the bridge needs an API key`},
		{"flexprice key env", func(c *Config) { c.Flexprice.APIKeyEnv = "FP-KEY" }, `flexprice.api_key_env: must be an environment variable name such as FLEXPRICE_API_KEY (got "FP-KEY")`},
		{"flexprice customers", func(c *Config) { c.Flexprice.Customers = []string{"a", " ", "a"} },
			"flexprice.customers[1]: must not be empty\nflexprice.customers[2]: repeats flexprice.customers[0] (\"a\")"},
		{"flexprice sync", func(c *Config) { c.Flexprice.SyncInterval = 999 * time.Millisecond }, `flexprice.sync_interval: must be >= 1s (got 999ms)`},
		{"flexprice webhook required", func(c *Config) { c.Flexprice.WebhookListen = "" }, `flexprice.webhook_listen: required: host:port such as ":8080" or "127.0.0.1:8080"`},
		{"flexprice admin disabled", func(c *Config) { c.Flexprice.AdminListen = "" }, ""},
		{"flexprice same port", func(c *Config) { c.Flexprice.AdminListen = ":9902" }, `flexprice.admin_listen: ":9902" takes the same port as flexprice.webhook_listen ("127.0.0.1:9902")`},
		{"flexprice event required", func(c *Config) { c.Flexprice.Features["x"] = FlexpriceFeature{Mode: "count"} },
			`flexprice.features.x.event_name: required: the Flexprice event that carries this feature's usage`},
		{"flexprice event control", func(c *Config) { c.Flexprice.Features["x"] = FlexpriceFeature{EventName: "a\nb", Mode: "count"} },
			`flexprice.features.x.event_name: must be at most 256 bytes without control characters (got "a\nb")`},
		{"flexprice mode", func(c *Config) { c.Flexprice.Features["x"] = FlexpriceFeature{EventName: "e"} }, `flexprice.features.x.mode: must be count or sum (got "")`},
		{"flexprice sum property", func(c *Config) { c.Flexprice.Features["x"] = FlexpriceFeature{EventName: "e", Mode: "sum"} },
			`flexprice.features.x.property: required with mode sum: the event property that carries the quantity`},
		{"flexprice count property", func(c *Config) {
			c.Flexprice.Features["x"] = FlexpriceFeature{EventName: "e", Mode: "count", Property: "p"}
		},
			`flexprice.features.x.property: only applies to mode sum (mode is count)`},
		{"flexprice feature key", func(c *Config) { c.Flexprice.Features["a b"] = FlexpriceFeature{EventName: "e", Mode: "count"} },
			`flexprice.features["a b"]: feature key "a b": byte 1 is ' ': only A-Z a-z 0-9 _ - . : are allowed`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := valid()
			tc.edit(c)
			err := c.Validate()
			got := ""
			if err != nil {
				got = err.Error()
			}
			if got != tc.want {
				t.Errorf("got\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
}

func features(n int) []RouteFeature {
	fs := make([]RouteFeature, n)
	for i := range fs {
		fs[i] = RouteFeature{Feature: "f" + strings.Repeat("x", i), MaxCost: 1}
	}
	return fs
}

// TestValidateProblems checks that callers can range over problems, and that a Config
// from Parse keeps naming lines after it is edited in Go.
func TestValidateProblems(t *testing.T) {
	c, err := Parse(strings.NewReader("upstream:\n  url: http://u\nroutes:\n  - name: a\n    path: /a\n"))
	if err != nil {
		t.Fatal(err)
	}
	c.Routes[0].Path = "a"
	c.Routes[0].Name = ""
	c.Log.Level = "loud"
	err = c.Validate()
	var ce *Error
	if !errors.As(err, &ce) {
		t.Fatalf("got %v (%T)", err, err)
	}
	want := []Problem{
		{Path: "routes[0].name", Line: 4, Msg: "required: names the route in logs and metrics"},
		{Path: "routes[0].path", Line: 5, Msg: `must start with "/" (got "a")`},
		{Path: "log.level", Msg: `must be debug, info, warn or error (got "loud")`},
	}
	if len(ce.Problems) != len(want) {
		t.Fatalf("got %v, want %v", ce.Problems, want)
	}
	for i := range want {
		if ce.Problems[i] != want[i] {
			t.Errorf("problem %d: got %#v, want %#v", i, ce.Problems[i], want[i])
		}
	}
}

func TestPaths(t *testing.T) {
	for _, tc := range []struct{ path, parent string }{
		{"routes[2].features[0].cost", "routes[2].features[0]"},
		{"routes[2].features[0]", "routes[2].features"},
		{"routes[2]", "routes"},
		{"routes", ""},
		{`flexprice.features["a.b[1]"]`, "flexprice.features"},
		{`flexprice.features["a\"]"].mode`, `flexprice.features["a\"]"]`},
		{`["x y"]`, ""},
	} {
		got, _ := parent(tc.path)
		if got != tc.parent {
			t.Errorf("parent(%q) = %q, want %q", tc.path, got, tc.parent)
		}
	}
	lines := map[string]int{"routes": 3, "routes[0]": 4, `flexprice.features["a.b"]`: 9}
	for path, want := range map[string]int{
		"routes[0].features[1].max_cost":   4,
		"routes[1].name":                   3,
		`flexprice.features["a.b"].mode`:   9,
		"listen":                           0,
		`flexprice.features["a.c"].mode`:   0,
		"routes[0]":                        4,
		"routesx":                          0,
		"routes[0].headers[\"X.Y\"]":       4,
		"routes[0].headers[\"bad\\\"quote": 0, // malformed: no line rather than a guess
	} {
		if got := lineOf(lines, path); got != want {
			t.Errorf("lineOf(%q) = %d, want %d", path, got, want)
		}
	}
	if field("", "a-b_c") != "a-b_c" || field("x", "a.b") != `x["a.b"]` || field("x", "") != `x[""]` {
		t.Error("field")
	}
}
