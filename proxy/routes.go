package proxy

import (
	"bytes"
	"fmt"
	"strings"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/limiter"
)

// pattern is a compiled route path: exact, one more segment (/*) or any depth (/**).
type pattern struct {
	prefix []byte // for exact: the whole path; otherwise the part before "/*" or "/**"
	kind   patternKind
}

type patternKind uint8

const (
	exact patternKind = iota
	oneSegment
	anyDepth
)

// parsePattern compiles a route path. "/a/*" matches "/a/b" only; "/a/**" matches "/a",
// "/a/" and everything below "/a/".
func parsePattern(p string) (pattern, error) {
	if !strings.HasPrefix(p, "/") {
		return pattern{}, fmt.Errorf("path %q must start with /", p)
	}
	kind := exact
	switch {
	case strings.HasSuffix(p, "/**"):
		kind, p = anyDepth, strings.TrimSuffix(p, "/**")
	case strings.HasSuffix(p, "/*"):
		kind, p = oneSegment, strings.TrimSuffix(p, "/*")
	}
	if strings.ContainsAny(p, "*?#") {
		return pattern{}, fmt.Errorf("path %q: * may only end the path, as /* or /**, and ? # are not allowed", p)
	}
	return pattern{prefix: []byte(p), kind: kind}, nil
}

func (p *pattern) match(path []byte) bool {
	switch p.kind {
	case exact:
		return bytes.Equal(path, p.prefix)
	case oneSegment:
		if len(path) <= len(p.prefix)+1 || !bytes.HasPrefix(path, p.prefix) || path[len(p.prefix)] != '/' {
			return false
		}
		return bytes.IndexByte(path[len(p.prefix)+1:], '/') < 0
	default:
		if !bytes.HasPrefix(path, p.prefix) {
			return false
		}
		return len(path) == len(p.prefix) || path[len(p.prefix)] == '/'
	}
}

// route is a compiled config.Route.
type route struct {
	name          string
	method        []byte // nil: any
	path          pattern
	features      []routeFeature
	headers       []staticHeader
	allowUnready  bool // on_unavailable: allow
	shadow        bool
	deferredCosts bool // some feature's cost comes from the response
}

type routeFeature struct {
	feature      string
	id           int32 // limiter.FeatureID(feature)
	cost         int64 // fixed cost, fallback, or reservation (see config.RouteFeature)
	costSet      bool
	reqHeader    string
	respHeader   string
	maxCost      int64
	usesResponse bool
}

type staticHeader struct {
	name    string
	key     []byte // name, canonical
	feature string
	id      int32 // limiter.FeatureID(feature)
}

// table is the compiled routing configuration, swapped whole on reload.
type table struct {
	routes       []route
	denyUnmatch  bool
	shadowAll    bool
	strip        [][]byte // request headers a client may not send: gatehouse sets them
	customerHdr  string   // header the customer id is forwarded in
	customerKey  []byte   // customerHdr, canonical
	identityHdr  []byte   // header that names the customer, nil when API keys identify
	apiKeyHdr    []byte
	apiKeyScheme []byte
}

func compile(cfg *config.Config) (*table, error) {
	t := &table{denyUnmatch: cfg.Unmatched == "deny", shadowAll: cfg.Shadow}
	t.customerHdr = cfg.Identity.Header
	if t.customerHdr == "" {
		t.customerHdr = "X-Customer-Id"
	}
	if k := cfg.Identity.APIKey; k != nil {
		// With API keys configured the key is the identity; the header only carries
		// the customer to the upstream, so a client cannot name itself.
		t.apiKeyHdr = []byte(k.Header)
		if len(t.apiKeyHdr) == 0 {
			t.apiKeyHdr = []byte("Authorization")
		}
		t.apiKeyScheme = []byte(k.Scheme)
	} else {
		t.identityHdr = []byte(cfg.Identity.Header)
	}
	t.customerKey = []byte(canonical(t.customerHdr))
	strip := map[string]bool{canonical(t.customerHdr): true, "X-Forwarded-For": true}
	for i, rc := range cfg.Routes {
		p, err := parsePattern(rc.Path)
		if err != nil {
			return nil, fmt.Errorf("routes[%d]: %w", i, err)
		}
		r := route{name: rc.Name, path: p, allowUnready: rc.OnUnavailable == "allow", shadow: rc.Shadow}
		if rc.Method != "" {
			r.method = []byte(rc.Method)
		}
		if len(rc.Features) > limiter.MaxRouteFeatures {
			return nil, fmt.Errorf("routes[%d]: more than %d features", i, limiter.MaxRouteFeatures)
		}
		for _, f := range rc.Features {
			rf := routeFeature{feature: f.Feature, id: limiter.FeatureID(f.Feature), reqHeader: f.CostRequestHeader, respHeader: f.CostResponseHeader, maxCost: f.MaxCost}
			if rf.maxCost <= 0 {
				rf.maxCost = 1_000_000
			}
			switch {
			case f.Cost != nil:
				rf.cost, rf.costSet = *f.Cost, true
			case f.CostResponseHeader != "":
				rf.cost = 0
			default:
				rf.cost = 1
			}
			if f.CostResponseHeader != "" {
				rf.usesResponse, r.deferredCosts = true, true
			}
			r.features = append(r.features, rf)
		}
		for name, feature := range rc.Headers {
			r.headers = append(r.headers, staticHeader{name: name, key: []byte(canonical(name)), feature: feature, id: limiter.FeatureID(feature)})
			strip[canonical(name)] = true
		}
		t.routes = append(t.routes, r)
	}
	for h := range strip {
		t.strip = append(t.strip, []byte(h))
	}
	return t, nil
}

// match returns the first route that matches, or nil.
func (t *table) match(method, path []byte) *route {
	for i := range t.routes {
		r := &t.routes[i]
		if r.method != nil && !bytes.Equal(r.method, method) {
			continue
		}
		if r.path.match(path) {
			return r
		}
	}
	return nil
}

// canonical is the header name as fasthttp normalises it (Content-Type style).
func canonical(name string) string {
	b := []byte(strings.ToLower(name))
	upper := true
	for i, c := range b {
		if upper && 'a' <= c && c <= 'z' {
			b[i] = c - 'a' + 'A'
		}
		upper = c == '-'
	}
	return string(b)
}
