package config

import (
	"fmt"
	"net"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

// Bounds that Validate enforces.
const (
	MaxRouteFeatures  = limiter.MaxRouteFeatures // features one route may name
	MinMaxHeaderBytes = 1 << 10                  // server.max_header_bytes
	MaxMaxHeaderBytes = 1 << 20                  // server.max_header_bytes
	MinFlushInterval  = 10 * time.Millisecond    // usage.flush_interval
	MaxFlushInterval  = time.Hour                // usage.flush_interval
	MaxStreamReplicas = 5                        // usage.stream_replicas; JetStream's own limit
	MinSyncInterval   = time.Second              // flexprice.sync_interval
	MaxQuotaWait      = time.Minute              // quota.wait
	MaxLeasePeriod    = time.Hour                // quota.lease_period
	maxRouteNameLen   = 128                      // routes[].name
	maxEventNameLen   = 256                      // flexprice.features.*.event_name
	maxHeaderNameLen  = 256                      // any header name
)

// Validate checks c and returns nil or an *Error that lists every problem, one per line
// of its message, each with its field path and, when c came from Parse, its line.
//
// The rules, besides the ones documented next to each check below:
//   - addresses (listen, admin_listen, nats.embedded_listen, flexprice.*_listen) are
//     host:port with a numeric port; admin_listen and flexprice.admin_listen may be empty
//     to disable; two listeners of one process may not share a port on overlapping hosts;
//   - every timeout and interval is > 0, and counts and sizes are within the bounds above;
//   - enums are spelt exactly as documented (lower case);
//   - header names are HTTP tokens (RFC 9110) and never ones that a proxy must own.
func (c *Config) Validate() error {
	ps := c.problems()
	if len(ps) == 0 {
		return nil
	}
	sortProblems(ps)
	return &Error{Problems: ps}
}

// validator collects problems, giving each the line of its path.
type validator struct {
	lines    map[string]int
	problems []Problem
}

func (v *validator) add(path, format string, args ...any) {
	v.problems = append(v.problems, Problem{Path: path, Line: lineOf(v.lines, path), Msg: fmt.Sprintf(format, args...)})
}

func (c *Config) problems() []Problem {
	v := &validator{lines: c.lines}
	v.listeners(c)
	v.upstream(&c.Upstream)
	if c.DataDir == "" {
		v.add("data_dir", "required: the directory for Badger, embedded NATS storage and the sidecar id")
	}
	v.nats(&c.NATS)
	v.identity(&c.Identity)
	v.oneOf("unmatched", c.Unmatched, "allow", "deny")
	v.routes(c)
	v.server(&c.Server)
	v.usage(&c.Usage)
	v.quota(&c.Quota)
	if c.Entitlements.CacheSize < 1 {
		v.add("entitlements.cache_size", "must be > 0 (got %d)", c.Entitlements.CacheSize)
	}
	v.oneOf("log.level", c.Log.Level, "debug", "info", "warn", "error")
	v.oneOf("log.format", c.Log.Format, "json", "console")
	v.flexprice(&c.Flexprice)
	return v.problems
}

// oneOf checks that s is one of the allowed spellings, exactly.
func (v *validator) oneOf(path, s string, allowed ...string) {
	for _, a := range allowed {
		if s == a {
			return
		}
	}
	v.add(path, "must be %s (got %q)", orList(allowed), s)
}

func orList(s []string) string {
	if len(s) == 1 {
		return s[0]
	}
	return strings.Join(s[:len(s)-1], ", ") + " or " + s[len(s)-1]
}

// dur formats d as it would be written: 1h rather than 1h0m0s.
func dur(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

func (v *validator) positive(path string, d time.Duration) {
	if d <= 0 {
		v.add(path, "must be > 0 (got %s)", dur(d))
	}
}

// listener is a validated address that one process listens on.
type listener struct {
	path, addr, host, port string
}

// listeners checks the sidecar's addresses and that no two of them collide. The
// embedded NATS server listens only when nats.urls is empty.
func (v *validator) listeners(c *Config) {
	var ls []listener
	if l, ok := v.hostPort("listen", c.Listen, false); ok {
		ls = append(ls, l)
	}
	if l, ok := v.hostPort("admin_listen", c.AdminListen, true); ok {
		ls = append(ls, l)
	}
	if l, ok := v.hostPort("nats.embedded_listen", c.NATS.EmbeddedListen, false); ok && len(c.NATS.URLs) == 0 {
		ls = append(ls, l)
	}
	v.collisions(ls)
}

// hostPort checks that s is host:port with a numeric port (0 picks a free one); the
// host may be empty (every interface), an IP address or a name. optional allows "".
func (v *validator) hostPort(path, s string, optional bool) (listener, bool) {
	if s == "" {
		if !optional {
			v.add(path, `required: host:port such as ":8080" or "127.0.0.1:8080"`)
		}
		return listener{}, false
	}
	host, port, err := net.SplitHostPort(s)
	if err == nil {
		var n uint64
		n, err = strconv.ParseUint(port, 10, 16)
		if err != nil || port != strconv.FormatUint(n, 10) {
			err = fmt.Errorf("bad port")
		} else if host != "" && net.ParseIP(host) == nil && !isHostname(host) {
			err = fmt.Errorf("bad host")
		}
	}
	if err != nil {
		v.add(path, `must be host:port with a numeric port, such as ":8080" or "127.0.0.1:8080" (got %q)`, s)
		return listener{}, false
	}
	return listener{path, s, host, port}, true
}

// isHostname reports whether s is a DNS name: labels of letters, digits, '-' and '_'.
func isHostname(s string) bool {
	if len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(strings.TrimSuffix(s, "."), ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// collisions reports a listener whose port an earlier one already takes: same port (not
// 0) and the same host, or either host a wildcard. Different names for one host
// (localhost, 127.0.0.1) are not detected.
func (v *validator) collisions(ls []listener) {
	wild := func(h string) bool { return h == "" || h == "0.0.0.0" || h == "::" }
	for i, b := range ls {
		for _, a := range ls[:i] {
			if a.port != "0" && a.port == b.port && (a.host == b.host || wild(a.host) || wild(b.host)) {
				v.add(b.path, "%q takes the same port as %s (%q)", b.addr, a.path, a.addr)
				break
			}
		}
	}
}

// upstream: url is http or https with a host; it has no path, query or user info,
// because each request keeps its own path and query when forwarded.
func (v *validator) upstream(u *Upstream) {
	switch {
	case u.URL == "":
		v.add("upstream.url", `required: the API to forward to, such as "http://127.0.0.1:9000"`)
	default:
		p, err := url.Parse(u.URL)
		switch {
		case err != nil || p.Opaque != "":
			v.add("upstream.url", `must be a URL such as "http://127.0.0.1:9000" (got %q)`, u.URL)
		case p.Scheme != "http" && p.Scheme != "https":
			v.add("upstream.url", `must start with http:// or https:// (got %q)`, u.URL)
		case p.Host == "" || p.Hostname() == "":
			v.add("upstream.url", "must name a host (got %q)", u.URL)
		case p.User != nil:
			v.add("upstream.url", "must not hold user info (got %q)", redact(p))
		case p.Path != "" && p.Path != "/":
			v.add("upstream.url", "must not have a path: each request is forwarded with its own path (got %q)", p.Path)
		case p.RawQuery != "" || p.ForceQuery || p.Fragment != "":
			v.add("upstream.url", "must not have a query or fragment (got %q)", u.URL)
		}
	}
	v.positive("upstream.timeout", u.Timeout)
	v.positive("upstream.dial_timeout", u.DialTimeout)
	if u.MaxConns <= 0 {
		v.add("upstream.max_conns", "must be > 0 (got %d)", u.MaxConns)
	}
}

func redact(u *url.URL) string {
	c := *u
	c.User = url.User("xxx")
	return c.String()
}

// nats: each URL is nats://, tls://, ws:// or wss:// with a host (user info allowed,
// as nats.go accepts it); URLs are not repeated; ping_interval > 0.
func (v *validator) nats(n *NATS) {
	seen := map[string]int{}
	for i, s := range n.URLs {
		p := index("nats.urls", i)
		u, err := url.Parse(s)
		switch {
		case err != nil || u.Opaque != "" || u.Host == "" || u.Hostname() == "":
			v.add(p, `must be a URL such as "nats://127.0.0.1:4222" (got %q)`, s)
			continue
		case u.Scheme != "nats" && u.Scheme != "tls" && u.Scheme != "ws" && u.Scheme != "wss":
			v.add(p, `must start with nats://, tls://, ws:// or wss:// (got %q)`, s)
			continue
		}
		if j, dup := seen[s]; dup {
			v.add(p, "repeats nats.urls[%d]", j)
		}
		seen[s] = i
	}
	v.positive("nats.ping_interval", n.PingInterval)
}

// identity: at least one of header and api_key; each header a usable request header;
// the two different; the scheme, when set, a token such as Bearer.
func (v *validator) identity(id *Identity) {
	if id.Header == "" && id.APIKey == nil {
		v.add("identity", "set header, api_key or both: requests must name their customer")
	}
	if id.Header != "" {
		v.requestHeader("identity.header", id.Header)
	}
	if k := id.APIKey; k != nil {
		switch {
		case k.Header == "":
			v.add("identity.api_key.header", "required: the header that carries the key, such as Authorization")
		case v.requestHeader("identity.api_key.header", k.Header) && strings.EqualFold(k.Header, id.Header):
			v.add("identity.api_key.header", "must differ from identity.header (both %q)", k.Header)
		}
		if k.Scheme != "" && !isToken(k.Scheme) {
			v.add("identity.api_key.scheme", "must be one word such as Bearer, or empty for the whole header value (got %q)", k.Scheme)
		}
	}
}

// requestHeader checks a header that gatehouse reads from requests: a token, and not one
// that the proxy strips or owns (hop-by-hop, Host, Content-Length). It reports whether
// name was acceptable.
func (v *validator) requestHeader(path, name string) bool {
	if !v.headerName(path, name) {
		return false
	}
	if why := reservedHeader(name); why != "" {
		v.add(path, "must not be %s (got %q)", why, name)
		return false
	}
	return true
}

// headerName checks that name is an HTTP token (RFC 9110 section 5.6.2).
func (v *validator) headerName(path, name string) bool {
	switch {
	case name == "":
		v.add(path, "must not be empty")
	case len(name) > maxHeaderNameLen:
		v.add(path, "must be at most %d bytes (got %d)", maxHeaderNameLen, len(name))
	case !isToken(name):
		v.add(path, "must be a header name: letters, digits and !#$%%&'*+-.^_`|~ (got %q)", name)
	default:
		return true
	}
	return false
}

// reservedHeader says why a header may not be configured for gatehouse to read or set,
// or returns "".
func reservedHeader(name string) string {
	l := strings.ToLower(name)
	switch {
	case l == "connection" || l == "keep-alive" || l == "te" || l == "trailer" ||
		l == "transfer-encoding" || l == "upgrade" || strings.HasPrefix(l, "proxy-"):
		return "a hop-by-hop header, which proxies remove"
	case l == "host" || l == "content-length":
		return "Host or Content-Length, which frame the request"
	}
	return ""
}

// isToken reports whether s is a non-empty RFC 9110 token.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' ||
			strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// server: timeouts > 0; max_header_bytes in [1 KiB, 1 MiB], which fits real headers
// and bounds memory per connection; max_body_bytes >= 0; concurrency > 0;
// background_nice in [0, 19], the range of nice values.
func (v *validator) server(s *Server) {
	v.positive("server.read_timeout", s.ReadTimeout)
	v.positive("server.write_timeout", s.WriteTimeout)
	v.positive("server.idle_timeout", s.IdleTimeout)
	v.positive("server.shutdown_timeout", s.ShutdownTimeout)
	if s.MaxHeaderBytes < MinMaxHeaderBytes || s.MaxHeaderBytes > MaxMaxHeaderBytes {
		v.add("server.max_header_bytes", "must be between %d and %d (got %d)", MinMaxHeaderBytes, MaxMaxHeaderBytes, s.MaxHeaderBytes)
	}
	if s.MaxBodyBytes < 0 {
		v.add("server.max_body_bytes", "must be >= 0 (got %d)", s.MaxBodyBytes)
	}
	if s.Concurrency <= 0 {
		v.add("server.concurrency", "must be > 0 (got %d)", s.Concurrency)
	}
	if s.BackgroundNice < 0 || s.BackgroundNice > 19 {
		v.add("server.background_nice", "must be between 0 and 19 (got %d)", s.BackgroundNice)
	}
}

// usage: flush_interval in [10ms, 1h]: shorter floods JetStream, longer leaves billing
// and a crashed sidecar's outbox far behind; stream_replicas 1 to 5 as JetStream allows;
// max_outbox_bytes > 0.
func (v *validator) usage(u *Usage) {
	if u.FlushInterval < MinFlushInterval || u.FlushInterval > MaxFlushInterval {
		v.add("usage.flush_interval", "must be between %s and %s (got %s)", dur(MinFlushInterval), dur(MaxFlushInterval), dur(u.FlushInterval))
	}
	if u.StreamReplicas < 1 || u.StreamReplicas > MaxStreamReplicas {
		v.add("usage.stream_replicas", "must be between 1 and %d (got %d)", MaxStreamReplicas, u.StreamReplicas)
	}
	if u.MaxOutboxBytes <= 0 {
		v.add("usage.max_outbox_bytes", "must be > 0 (got %d)", u.MaxOutboxBytes)
	}
}

// quota is checked always, although only a sidecar with quota.enabled reads it; its
// defaults are valid. bucket is a KV bucket name (letters, digits, _ and -) other than
// the entitlements bucket; replicas 1 to 5 as JetStream allows; 1 <= min_lease <=
// max_lease; lease_period in (0, 1h]; low_water_percent 1 to 99; wait in (0, 1m]: a
// request must not hang on NATS; idle_return >= 0 (0 never returns an idle lease).
func (v *validator) quota(q *Quota) {
	switch {
	case q.Bucket == "":
		v.add("quota.bucket", "required: the KV bucket of the leases, such as gatehouse_quota")
	case !isBucketName(q.Bucket):
		v.add("quota.bucket", "must be letters, digits, _ and - (got %q)", q.Bucket)
	case q.Bucket == "gatehouse_entitlements":
		v.add("quota.bucket", "must differ from the entitlements bucket (got %q)", q.Bucket)
	}
	if q.Replicas < 1 || q.Replicas > MaxStreamReplicas {
		v.add("quota.replicas", "must be between 1 and %d (got %d)", MaxStreamReplicas, q.Replicas)
	}
	if q.MinLease < 1 {
		v.add("quota.min_lease", "must be >= 1 (got %d)", q.MinLease)
	}
	if q.MaxLease < max(q.MinLease, 1) {
		v.add("quota.max_lease", "must be >= quota.min_lease (got %d < %d)", q.MaxLease, max(q.MinLease, 1))
	}
	if q.LeasePeriod <= 0 || q.LeasePeriod > MaxLeasePeriod {
		v.add("quota.lease_period", "must be > 0 and at most %s (got %s)", dur(MaxLeasePeriod), dur(q.LeasePeriod))
	}
	if q.LowWaterPercent < 1 || q.LowWaterPercent > 99 {
		v.add("quota.low_water_percent", "must be between 1 and 99 (got %d)", q.LowWaterPercent)
	}
	if q.Wait <= 0 || q.Wait > MaxQuotaWait {
		v.add("quota.wait", "must be > 0 and at most %s (got %s)", dur(MaxQuotaWait), dur(q.Wait))
	}
	if q.IdleReturn < 0 {
		v.add("quota.idle_return", "must be >= 0 (got %s)", dur(q.IdleReturn))
	}
}

func isBucketName(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return s != ""
}

// flexprice is checked always, although only the bridge reads it; its defaults are
// valid. api_url is http(s) with a host (a path such as /v1 is expected); the API key
// comes from api_key_env (a valid variable name) or api_key_file; customers are
// non-empty and unique; sync_interval >= 1s so as not to hammer the API;
// webhook_listen is host:port, admin_listen host:port or empty, and they differ; each
// feature is a valid feature key with an event_name, and mode count, or sum with the
// property that carries the quantity (property is refused with count, where it would
// be ignored).
func (v *validator) flexprice(f *Flexprice) {
	if u, err := url.Parse(f.APIURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
		u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		v.add("flexprice.api_url", `must be an http(s) URL without query, such as "https://us.api.flexprice.io/v1" (got %q)`, f.APIURL)
	}
	switch {
	case f.APIKeyEnv == "" && f.APIKeyFile == "":
		v.add("flexprice.api_key_env", "set api_key_env or api_key_file: the bridge needs an API key")
	case f.APIKeyEnv != "" && !isEnvName(f.APIKeyEnv):
		v.add("flexprice.api_key_env", "must be an environment variable name such as FLEXPRICE_API_KEY (got %q)", f.APIKeyEnv)
	}
	seen := map[string]int{}
	for i, id := range f.Customers {
		p := index("flexprice.customers", i)
		if strings.TrimSpace(id) == "" {
			v.add(p, "must not be empty")
			continue
		}
		if j, dup := seen[id]; dup {
			v.add(p, "repeats flexprice.customers[%d] (%q)", j, id)
		}
		seen[id] = i
	}
	if f.SyncInterval < MinSyncInterval {
		v.add("flexprice.sync_interval", "must be >= %s (got %s)", dur(MinSyncInterval), dur(f.SyncInterval))
	}
	var ls []listener
	if l, ok := v.hostPort("flexprice.webhook_listen", f.WebhookListen, false); ok {
		ls = append(ls, l)
	}
	if l, ok := v.hostPort("flexprice.admin_listen", f.AdminListen, true); ok {
		ls = append(ls, l)
	}
	v.collisions(ls)

	keys := make([]string, 0, len(f.Features))
	for k := range f.Features {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		ff := f.Features[k]
		p := field("flexprice.features", k)
		if err := limiter.CheckFeatureKey(k); err != nil {
			v.add(p, "%v", err)
		}
		switch {
		case ff.EventName == "":
			v.add(p+".event_name", "required: the Flexprice event that carries this feature's usage")
		case len(ff.EventName) > maxEventNameLen || hasControl(ff.EventName):
			v.add(p+".event_name", "must be at most %d bytes without control characters (got %q)", maxEventNameLen, ff.EventName)
		}
		v.oneOf(p+".mode", ff.Mode, "count", "sum")
		switch {
		case ff.Mode == "sum" && ff.Property == "":
			v.add(p+".property", "required with mode sum: the event property that carries the quantity")
		case ff.Mode == "count" && ff.Property != "":
			v.add(p+".property", "only applies to mode sum (mode is count)")
		}
	}
}

func isEnvName(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '_' || i > 0 && '0' <= c && c <= '9') {
			return false
		}
	}
	return s != ""
}

func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < ' ' || s[i] == 0x7f {
			return true
		}
	}
	return false
}
