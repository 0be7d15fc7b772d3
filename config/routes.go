package config

import (
	"sort"
	"strconv"
	"strings"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

// routes checks each route:
//   - name: required, unique, at most 128 bytes of letters, digits and _ - . : /
//     (it labels metrics and logs);
//   - method: empty (any) or an upper-case HTTP token such as GET;
//   - path: see checkRoutePath;
//   - a route that an earlier one always matches first is refused: it could never match;
//   - features: at most 16, each a valid feature key named once; cost >= 0 and <= max_cost;
//     max_cost > 0; at most one of cost_request_header and cost_response_header, each a
//     header name that is not hop-by-hop. A route without features is valid: it matches,
//     so unmatched does not apply, and admits every identified customer;
//   - headers: see routeHeaders;
//   - on_unavailable: deny or allow.
func (v *validator) routes(c *Config) {
	names := map[string]int{}
	for i := range c.Routes {
		r := &c.Routes[i]
		p := index("routes", i)
		switch {
		case r.Name == "":
			v.add(p+".name", "required: names the route in logs and metrics")
		case !isRouteName(r.Name):
			v.add(p+".name", "must be 1 to %d letters, digits or _ - . : / (got %q)", maxRouteNameLen, r.Name)
		default:
			if j, dup := names[r.Name]; dup {
				v.add(p+".name", "%q is also the name of routes[%d]", r.Name, j)
			} else {
				names[r.Name] = i
			}
		}
		methodOK := r.Method == "" || isToken(r.Method) && strings.ToUpper(r.Method) == r.Method
		if !methodOK {
			v.add(p+".method", "must be an upper-case HTTP method such as GET or POST, or absent for any (got %q)", r.Method)
		}
		pathOK := true
		if msg := checkRoutePath(r.Path); msg != "" {
			v.add(p+".path", "%s", msg)
			pathOK = false
		}
		if methodOK && pathOK {
			for j := range c.Routes[:i] {
				e := &c.Routes[j]
				if checkRoutePath(e.Path) == "" && covers(e, r) {
					v.add(p+".path", "never matches: routes[%d] (%q, %s %s) comes first and matches every request it would",
						j, e.Name, methodName(e.Method), e.Path)
					break
				}
			}
		}
		v.routeFeatures(p, r)
		v.routeHeaders(p, r, &c.Identity)
		v.oneOf(p+".on_unavailable", r.OnUnavailable, "deny", "allow")
	}
}

func methodName(m string) string {
	if m == "" {
		return "any method"
	}
	return m
}

func isRouteName(s string) bool {
	if len(s) > maxRouteNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("_-.:/", c) >= 0) {
			return false
		}
	}
	return true
}

// checkRoutePath returns what is wrong with a route path, or "". A path starts with "/";
// it may contain "*" only as a whole final segment, "/*" (one segment) or "/**" (any
// depth); it has no "?" or "#" (routes match the path only), no empty segment ("//"),
// no "." or ".." segment and no space or control character, since request paths are
// normalized before matching and such a route could never match.
func checkRoutePath(s string) string {
	switch {
	case s == "":
		return `required: such as "/v1/chat", "/v1/chat/*" or "/v1/**"`
	case s[0] != '/':
		return `must start with "/" (got ` + quote(s) + `)`
	case strings.ContainsAny(s, "?#"):
		return `must not contain "?" or "#": routes match the path only (got ` + quote(s) + `)`
	case strings.Contains(s, "//"):
		return `must not contain "//" (got ` + quote(s) + `)`
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] == 0x7f {
			return "must not contain spaces or control characters (got " + quote(s) + ")"
		}
	}
	segs := strings.Split(s[1:], "/")
	for k, seg := range segs {
		if seg == "." || seg == ".." {
			return `must not contain "." or ".." segments: request paths are normalized before matching (got ` + quote(s) + `)`
		}
		if strings.Contains(seg, "*") && (k != len(segs)-1 || seg != "*" && seg != "**") {
			return `may contain "*" only as a final "/*" (one segment) or "/**" (any depth) (got ` + quote(s) + `)`
		}
	}
	return ""
}

func quote(s string) string {
	if len(s) > 128 {
		s = s[:128] + "..."
	}
	return strconv.Quote(s)
}

// covers reports whether every request that b matches is matched by a, with the
// matching rules of package proxy: "/a/*" matches "/a/x" (one non-empty segment);
// "/a/**" matches "/a", "/a/" and everything below "/a/".
func covers(a, b *Route) bool {
	if a.Method != "" && a.Method != b.Method {
		return false
	}
	switch {
	case a.Path == b.Path:
		return true
	case strings.HasSuffix(a.Path, "/**"):
		base := strings.TrimSuffix(a.Path, "/**")
		return b.Path == base || strings.HasPrefix(b.Path, base+"/")
	case strings.HasSuffix(a.Path, "/*"):
		rest, ok := strings.CutPrefix(b.Path, strings.TrimSuffix(a.Path, "*"))
		return ok && rest != "" && rest != "**" && !strings.Contains(rest, "/")
	}
	return false
}

func (v *validator) routeFeatures(p string, r *Route) {
	if len(r.Features) > MaxRouteFeatures {
		v.add(p+".features", "at most %d features per route (got %d)", MaxRouteFeatures, len(r.Features))
	}
	seen := map[string]int{}
	for j := range r.Features {
		f := &r.Features[j]
		fp := index(p+".features", j)
		if f.Feature == "" {
			v.add(fp+".feature", "required: the feature's lookup key, such as api_calls")
		} else if err := limiter.CheckFeatureKey(f.Feature); err != nil {
			v.add(fp+".feature", "%v", err)
		} else if k, dup := seen[f.Feature]; dup {
			v.add(fp+".feature", "%q is already features[%d] of this route", f.Feature, k)
		} else {
			seen[f.Feature] = j
		}
		if f.Cost != nil && *f.Cost < 0 {
			v.add(fp+".cost", "must be >= 0 (got %d)", *f.Cost)
		}
		if f.MaxCost <= 0 {
			v.add(fp+".max_cost", "must be > 0 (got %d)", f.MaxCost)
		} else if f.Cost != nil && *f.Cost > f.MaxCost {
			v.add(fp+".cost", "must be <= max_cost %d (got %d)", f.MaxCost, *f.Cost)
		}
		if f.CostRequestHeader != "" {
			v.costHeader(fp+".cost_request_header", f.CostRequestHeader)
		}
		if f.CostResponseHeader != "" {
			if f.CostRequestHeader != "" {
				v.add(fp+".cost_response_header", "set cost_request_header or cost_response_header, not both")
			}
			v.costHeader(fp+".cost_response_header", f.CostResponseHeader)
		}
	}
}

// costHeader checks a header that carries a cost: a token and not hop-by-hop, since
// proxies remove those. Content-Length is allowed: it is a fair cost of an upload.
func (v *validator) costHeader(path, name string) {
	if v.headerName(path, name) && strings.HasPrefix(reservedHeader(name), "a hop-by-hop") {
		v.add(path, "must not be %s (got %q)", reservedHeader(name), name)
	}
}

// forwardedHeaders are set by the proxy on every forwarded request.
var forwardedHeaders = []string{"X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded"}

// routeHeaders checks the headers a route forwards upstream: each name a token, not
// hop-by-hop, Host or Content-Length, not the identity headers or a header the proxy
// sets itself (X-Forwarded-*, Forwarded), and not named twice in different case; each
// value a valid feature key.
func (v *validator) routeHeaders(p string, r *Route, id *Identity) {
	names := make([]string, 0, len(r.Headers))
	for h := range r.Headers {
		names = append(names, h)
	}
	sort.Strings(names)
	seen := map[string]string{}
	for _, h := range names {
		hp := field(p+".headers", h)
		if v.requestHeader(hp, h) {
			switch {
			case strings.EqualFold(h, id.Header):
				v.add(hp, "must not be identity.header (%q), which carries the customer", id.Header)
			case id.APIKey != nil && strings.EqualFold(h, id.APIKey.Header):
				v.add(hp, "must not be identity.api_key.header (%q)", id.APIKey.Header)
			case isForwardedHeader(h):
				v.add(hp, "must not be %s, which the proxy sets", h)
			default:
				if first, dup := seen[strings.ToLower(h)]; dup {
					v.add(hp, "names the same header as %q (header names ignore case)", first)
				}
				seen[strings.ToLower(h)] = h
			}
		}
		if err := limiter.CheckFeatureKey(r.Headers[h]); err != nil {
			v.add(hp, "value: %v", err)
		}
	}
}

func isForwardedHeader(h string) bool {
	for _, f := range forwardedHeaders {
		if strings.EqualFold(h, f) {
			return true
		}
	}
	return false
}
