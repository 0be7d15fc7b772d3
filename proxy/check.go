package proxy

import (
	"bytes"
	"strconv"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"
)

// Check endpoints: the proxy's decision without the proxying, for gatehouse behind
// another gateway. They live on the proxy listener under the reserved prefix
// /.gatehouse, which is matched before any route: a route cannot shadow it, and a
// request under it is never forwarded (an unknown path there gets 404).
//
//   - Envoy ext_authz, HTTP service, with path_prefix /.gatehouse/envoy: the check
//     request carries the original method, the original path after the prefix and the
//     original headers. Allow is 200 with the headers to add upstream (the customer
//     header and the route's static headers; list them in allowed_upstream_headers) and
//     x-envoy-auth-headers-to-remove naming the headers gatehouse owns but did not set,
//     so a client's copy never reaches the upstream. Deny is the real status (401, 403,
//     429, 503, 400) with the problem body and headers (Retry-After, RateLimit,
//     WWW-Authenticate), which Envoy sends to the client.
//   - Traefik forwardAuth at /.gatehouse/traefik: the original request is in
//     X-Forwarded-Method and X-Forwarded-Uri (X-Forwarded-Host and -Proto are not
//     needed: routes match method and path). Allow is 200 with the same headers (list
//     them in authResponseHeaders, which also removes a client's copy); deny is the
//     refusal as the proxy would send it, which Traefik returns to the client as is.
//   - nginx auth_request at /.gatehouse/nginx: the original request is in
//     X-Original-Method and X-Original-URI. nginx accepts only 2xx, 401 and 403 from
//     an auth subrequest, so a refusal is 401 (no or bad identity) or 403 (all others),
//     and the real status and reason travel in X-Gatehouse-Status and
//     X-Gatehouse-Reason, with Retry-After and RateLimit, for auth_request_set.
//
// Every refusal, whatever the endpoint, carries X-Gatehouse-Status and
// X-Gatehouse-Reason; an allow that shadow mode turned from a refusal carries
// X-Gatehouse-Shadow with the reason.
//
// A check endpoint sees no upstream response, so usage is committed when the check
// allows: a 5xx from the upstream is not refunded, and a feature whose cost comes from
// the response (cost_response_header) commits its reserved cost, the route's cost
// (default 0), so that it gates admission (one unit must be left under a hard limit)
// but counts only what the route's cost says. Costs from request headers work as in the
// proxy, provided the gateway passes those headers to the check.
const (
	CheckPrefix  = "/.gatehouse"
	CheckEnvoy   = CheckPrefix + "/envoy"
	CheckTraefik = CheckPrefix + "/traefik"
	CheckNginx   = CheckPrefix + "/nginx"
)

// Response headers of the check endpoints.
const (
	HeaderCheckStatus = "X-Gatehouse-Status"
	HeaderCheckReason = "X-Gatehouse-Reason"
	HeaderCheckShadow = "X-Gatehouse-Shadow"
	headerEnvoyRemove = "X-Envoy-Auth-Headers-To-Remove"
)

type checkEndpoint uint8

const (
	checkEnvoy checkEndpoint = iota
	checkTraefik
	checkNginx
	checkInvalid // a path under the prefix that is no endpoint
	numCheckEndpoints
)

var checkEndpointNames = [numCheckEndpoints]string{"envoy", "traefik", "nginx", "invalid"}

var (
	checkPrefix  = []byte(CheckPrefix)
	envoySegment = []byte("/envoy")
	rootPath     = []byte("/")
)

// isCheckPath reports whether path is under the reserved prefix: /.gatehouse itself or
// anything below /.gatehouse/.
func isCheckPath(path []byte) bool {
	return bytes.HasPrefix(path, checkPrefix) && (len(path) == len(checkPrefix) || path[len(checkPrefix)] == '/')
}

// serveCheck answers a request under the reserved prefix.
func (p *Proxy) serveCheck(ctx *fasthttp.RequestCtx) {
	rest := ctx.Path()[len(checkPrefix):]
	h := &ctx.Request.Header
	var (
		e      checkEndpoint
		method []byte
		uri    []byte // the original request target, for traefik and nginx
		path   []byte
	)
	switch {
	case bytes.HasPrefix(rest, envoySegment) && (len(rest) == len(envoySegment) || rest[len(envoySegment)] == '/'):
		e, method, path = checkEnvoy, ctx.Method(), rest[len(envoySegment):]
		if len(path) == 0 {
			path = rootPath
		}
	case string(rest) == "/traefik":
		e, method, uri = checkTraefik, h.Peek("X-Forwarded-Method"), h.Peek("X-Forwarded-Uri")
	case string(rest) == "/nginx":
		e, method, uri = checkNginx, h.Peek("X-Original-Method"), h.Peek("X-Original-URI")
	default:
		p.metrics.checked(checkInvalid, resultDeny)
		writeSimpleProblem(ctx, fasthttp.StatusNotFound, "check_not_found", "No check endpoint at this path")
		setCheckStatus(ctx, fasthttp.StatusNotFound, "check_not_found")
		return
	}
	if len(method) == 0 {
		method = ctx.Method()
	}
	if e != checkEnvoy {
		if len(uri) == 0 {
			p.metrics.checked(e, resultDeny)
			writeSimpleProblem(ctx, fasthttp.StatusBadRequest, "check_request_invalid",
				"The check request does not carry the original request's URI")
			setCheckStatus(ctx, fasthttp.StatusBadRequest, "check_request_invalid")
			if e == checkNginx {
				ctx.SetStatusCode(fasthttp.StatusForbidden)
			}
			return
		}
		// The original URI is normalized as the proxy normalizes a request's path, so
		// that /a/../b and /a/%2e%2e/b match the routes that /b matches.
		u := fasthttp.AcquireURI()
		defer fasthttp.ReleaseURI(u)
		if err := u.Parse(nil, uri); err != nil {
			path = rootPath
		} else {
			path = u.Path()
		}
	}

	t := p.table.Load()
	st := p.states.Get().(*reqState)
	defer p.putState(st)
	now := ctx.Time()
	start, timed := p.metrics.startTiming(st)
	o := p.decide(t, method, path, h, now, st)
	p.metrics.decided(&o, start, timed)
	p.metrics.checked(e, resultOf(&o))
	if o.decision.Reason != limiter.OK && !o.shadow {
		p.refuse(ctx, &o, now, st)
		status := ctx.Response.StatusCode()
		setCheckStatus(ctx, status, o.decision.Reason.String())
		if e == checkNginx && status != fasthttp.StatusUnauthorized {
			ctx.SetStatusCode(fasthttp.StatusForbidden)
		}
	} else {
		if o.decision.Reason != limiter.OK {
			p.shadowRefusal(&o)
			ctx.Response.Header.Set(HeaderCheckShadow, o.decision.Reason.String())
		}
		p.checkAllow(ctx, e, t, &o, now, st)
	}
	if p.access.on() {
		p.access.write(ctx, checkEndpointNames[e], path, &o, st)
	}
}

// setCheckStatus sets X-Gatehouse-Status and X-Gatehouse-Reason.
func setCheckStatus(ctx *fasthttp.RequestCtx, status int, reason string) {
	var b [8]byte
	ctx.Response.Header.SetBytesV(HeaderCheckStatus, strconv.AppendInt(b[:0], int64(status), 10))
	ctx.Response.Header.Set(HeaderCheckReason, reason)
}

// checkAllow answers an admitted check: 200, the headers for the upstream, and the
// RateLimit fields; the reservation is committed now, since no response will follow.
func (p *Proxy) checkAllow(ctx *fasthttp.RequestCtx, e checkEndpoint, t *table, o *outcome, now time.Time, st *reqState) {
	ctx.SetStatusCode(fasthttp.StatusOK)
	h := &ctx.Response.Header
	if o.snap != nil {
		setIdentity(h, t, o.route, o.snap)
	}
	if e == checkEnvoy {
		// Envoy adds the headers above upstream but leaves a client's copy of one that
		// gatehouse did not set: name those for removal.
		st.buf = st.buf[:0]
		for _, name := range t.strip {
			if string(name) == "X-Forwarded-For" || len(h.PeekBytes(name)) > 0 {
				continue
			}
			if len(st.buf) > 0 {
				st.buf = append(st.buf, ", "...)
			}
			st.buf = append(st.buf, name...)
		}
		if len(st.buf) > 0 {
			h.SetBytesV(headerEnvoyRemove, st.buf)
		}
	}
	if !o.reserved {
		return
	}
	p.setRateLimit(h, &st.res, now, st)
	st.usage = p.opts.Limiter.Commit(&st.res, st.usage[:0])
	if len(st.usage) > 0 && p.opts.Recorder != nil {
		if err := p.opts.Recorder.Record(st.usage); err != nil {
			p.metrics.recordError()
			p.log.Error("usage not durable", zap.Error(err))
		}
	}
}

// shadowRefusal logs a refusal that shadow mode turned into an allow.
func (p *Proxy) shadowRefusal(o *outcome) {
	if ce := p.log.Check(zap.InfoLevel, "shadow refusal"); ce != nil {
		route := unmatchedRoute
		if o.route != nil {
			route = o.route.name
		}
		customer := zap.ByteString("customer", o.customer)
		if o.snap != nil {
			customer = zap.String("customer", o.snap.CustomerID)
		}
		ce.Write(zap.String("route", route), zap.String("reason", o.decision.Reason.String()),
			zap.String("feature", o.decision.Feature), customer)
	}
}
