package proxy

import (
	"bytes"
	"errors"
	"strconv"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"
)

// outcome is a decision on one request, before anything is forwarded.
type outcome struct {
	route    *route
	snap     *limiter.Snapshot
	decision limiter.Decision
	customer []byte // for problem bodies; aliases the request or the snapshot
	shadow   bool   // decided as shadow: never refuse
	unready  bool   // replica not ready and the route allows it: forwarded unchecked
	reserved bool   // st.res holds a reservation to commit or refund
}

// decide identifies the customer of a request, matches its route and reserves its
// cost. It is shared by the proxy and the check endpoints.
func (p *Proxy) decide(t *table, method, path []byte, h *fasthttp.RequestHeader, now time.Time, st *reqState) outcome {
	var o outcome
	o.route = t.match(method, path)
	if o.route == nil {
		if t.denyUnmatch {
			o.decision.Reason = limiter.RouteNotAllowed
			o.shadow = t.shadowAll
		}
		return o
	}
	o.shadow = t.shadowAll || o.route.shadow
	kind, id := readIdentity(h, t, &st.keySum)
	switch kind {
	case idNone:
		o.decision.Reason = limiter.CustomerMissing
		return o
	case idBadKey:
		o.decision.Reason = limiter.APIKeyInvalid
		return o
	case idHeader:
		o.customer = id
		o.snap = p.opts.Source.Customer(id)
	case idAPIKey:
		o.snap = p.opts.Source.CustomerByKey(&st.keySum)
	}
	if o.snap == nil {
		if !p.opts.Source.Ready() {
			if o.route.allowUnready {
				o.unready = true
				return o
			}
			o.decision.Reason = limiter.ReplicaNotReady
			return o
		}
		if kind == idAPIKey {
			o.decision.Reason = limiter.APIKeyInvalid
		} else {
			o.decision.Reason = limiter.CustomerUnknown
		}
		return o
	}
	o.customer = nil
	uses := st.uses[:len(o.route.features)]
	for i := range o.route.features {
		rf := &o.route.features[i]
		u := limiter.Use{Feature: rf.feature, ID: rf.id, Cost: rf.cost, Deferred: rf.usesResponse, FailOpen: o.route.allowUnready}
		if rf.reqHeader != "" {
			if v := h.Peek(rf.reqHeader); len(v) > 0 {
				c, ok := parseCost(v, rf.maxCost)
				if !ok {
					o.decision = limiter.Decision{Reason: limiter.CostInvalid, Feature: rf.feature}
					return o
				}
				u.Cost = c
			} else if !rf.costSet {
				o.decision = limiter.Decision{Reason: limiter.CostInvalid, Feature: rf.feature}
				return o
			}
		}
		uses[i] = u
	}
	o.decision = p.opts.Limiter.Reserve(o.snap, uses, now, o.shadow, &st.res)
	o.reserved = o.decision.Reason == limiter.OK || o.shadow
	return o
}

// Handle is the proxy's request handler. Paths under CheckPrefix are the check
// endpoints' and are never forwarded.
func (p *Proxy) Handle(ctx *fasthttp.RequestCtx) {
	if isCheckPath(ctx.Path()) {
		p.serveCheck(ctx)
		return
	}
	t := p.table.Load()
	st := p.states.Get().(*reqState)
	defer p.putState(st)
	now := ctx.Time()
	start, timed := p.metrics.startTiming(st)
	st.timed = timed
	o := p.decide(t, ctx.Method(), ctx.Path(), &ctx.Request.Header, now, st)
	p.metrics.decided(&o, start, timed)
	if o.decision.Reason != limiter.OK && !o.shadow {
		p.refuse(ctx, &o, now, st)
	} else {
		if o.decision.Reason != limiter.OK {
			p.shadowRefusal(&o)
		}
		p.forward(ctx, t, &o, now, st)
	}
	if p.access.on() {
		p.access.write(ctx, "", ctx.Path(), &o, st)
	}
}

func (p *Proxy) putState(st *reqState) {
	st.res.Reset()
	st.usage = st.usage[:0]
	st.buf, st.policy, st.limit = st.buf[:0], st.policy[:0], st.limit[:0]
	p.states.Put(st)
}

// forward sends the request upstream, then commits or refunds its reservation.
func (p *Proxy) forward(ctx *fasthttp.RequestCtx, t *table, o *outcome, now time.Time, st *reqState) {
	req, resp := &ctx.Request, &ctx.Response
	h := &req.Header
	// A request forwarded unchecked (no route, or the replica not ready and the route
	// allows it) keeps the customer its trusted identity header named. With API keys
	// only a verified customer is ever named upstream.
	var trusted []byte
	if o.snap == nil && t.identityHdr != nil {
		if v := bytes.TrimSpace(h.PeekBytes(t.identityHdr)); len(v) > 0 {
			st.ident = append(st.ident[:0], v...)
			trusted = st.ident
		}
	}
	stripRequest(h, t)
	if o.snap != nil {
		setIdentity(h, t, o.route, o.snap)
	} else if trusted != nil {
		h.SetCanonical(t.customerKey, trusted)
	}
	st.buf = appendIP(st.buf[:0], ctx.RemoteIP())
	h.SetCanonical(xffKey, st.buf)

	// Upstream latency is timed on the same sampled requests as decisions: reading the
	// clock costs more than the decision on some VMs.
	var upStart time.Time
	if st.timed {
		upStart = time.Now()
	}
	err := p.client.DoTimeout(req, resp, time.Duration(p.timeout.Load()))
	p.metrics.upstream(resp.StatusCode(), err, upStart)
	if err != nil {
		if o.reserved {
			p.opts.Limiter.Refund(&st.res)
		}
		status, reason := fasthttp.StatusBadGateway, "upstream_unavailable"
		if errors.Is(err, fasthttp.ErrTimeout) {
			status, reason = fasthttp.StatusGatewayTimeout, "upstream_timeout"
		}
		if ce := p.log.Check(zap.WarnLevel, "upstream failed"); ce != nil {
			ce.Write(zap.Error(err))
		}
		writeSimpleProblem(ctx, status, reason, fasthttp.StatusMessage(status))
		return
	}
	stripResponse(&resp.Header)
	if o.route != nil && o.route.deferredCosts && !o.reserved {
		for i := range o.route.features {
			if rf := &o.route.features[i]; rf.usesResponse {
				resp.Header.Del(rf.respHeader)
			}
		}
	}
	if !o.reserved {
		return
	}
	if resp.StatusCode() >= 500 {
		p.opts.Limiter.Refund(&st.res)
		for i := range o.route.features {
			if rf := &o.route.features[i]; rf.usesResponse {
				resp.Header.Del(rf.respHeader)
			}
		}
		return
	}
	for i := range o.route.features {
		rf := &o.route.features[i]
		if !rf.usesResponse {
			continue
		}
		if v := resp.Header.Peek(rf.respHeader); len(v) > 0 {
			if c, ok := parseCost(v, rf.maxCost); ok {
				st.res.SetActual(i, c)
			} else if ce := p.log.Check(zap.WarnLevel, "bad cost in upstream response; committing the reserved cost"); ce != nil {
				ce.Write(zap.String("header", rf.respHeader), zap.ByteString("value", v))
			}
		}
		resp.Header.Del(rf.respHeader)
	}
	p.setRateLimit(&resp.Header, &st.res, now, st)
	st.usage = p.opts.Limiter.Commit(&st.res, st.usage[:0])
	if len(st.usage) > 0 && p.opts.Recorder != nil {
		if err := p.opts.Recorder.Record(st.usage); err != nil {
			p.metrics.recordError()
			p.log.Error("usage not durable", zap.Error(err))
		}
	}
}

func (p *Proxy) setRateLimit(h *fasthttp.ResponseHeader, r *limiter.Reservation, now time.Time, st *reqState) {
	st.policy, st.limit = appendRateLimit(st.policy[:0], st.limit[:0], r, now)
	if len(st.policy) > 0 {
		h.SetCanonical(rateLimitPolicyKey, st.policy)
		h.SetCanonical(rateLimitKey, st.limit)
	}
}

// refuse answers a refused request with its problem body. Nothing reaches the upstream.
func (p *Proxy) refuse(ctx *fasthttp.RequestCtx, o *outcome, now time.Time, st *reqState) {
	d := &o.decision
	status := statusOf(d.Reason)
	ctx.Response.Reset()
	ctx.SetStatusCode(status)
	ctx.SetContentType("application/problem+json")
	customer := o.customer
	if o.snap != nil {
		customer = append(st.buf[:0], o.snap.CustomerID...)
	}
	switch d.Reason {
	case limiter.UsageLimitExceeded:
		ra := retryAfterNever
		if d.ResetAt != limiter.NeverEnds {
			ra = retryAfter(d.ResetAt, now)
		}
		ctx.Response.Header.Set("Retry-After", strconv.FormatInt(ra, 10))
		st.policy = append(append(append(st.policy[:0], '"'), d.Feature...), `";q=`...)
		st.policy = strconv.AppendInt(st.policy, d.Limit, 10)
		st.limit = append(append(append(st.limit[:0], '"'), d.Feature...), `";r=0`...)
		if d.ResetAt != limiter.NeverEnds {
			st.limit = append(st.limit, ";t="...)
			st.limit = strconv.AppendInt(st.limit, ra, 10)
		}
		ctx.Response.Header.SetBytesV("RateLimit-Policy", st.policy)
		ctx.Response.Header.SetBytesV("RateLimit", st.limit)
	case limiter.ReplicaNotReady:
		ctx.Response.Header.Set("Retry-After", strconv.Itoa(retryAfterUnready))
	case limiter.QuotaUnavailable:
		ctx.Response.Header.Set("Retry-After", strconv.Itoa(retryAfterQuota))
	case limiter.CustomerMissing, limiter.APIKeyInvalid:
		if t := p.table.Load(); t.apiKeyHdr != nil {
			ctx.Response.Header.Set("WWW-Authenticate", string(t.apiKeyScheme)+` realm="gatehouse"`)
		}
	}
	ctx.SetBody(appendProblem(nil, d, customer))
}

// Canonical header names, set without normalising them on every request.
var (
	xffKey             = []byte("X-Forwarded-For")
	rateLimitPolicyKey = []byte("Ratelimit-Policy")
	rateLimitKey       = []byte("Ratelimit")
)

// retryAfterNever is the Retry-After of a limit whose window never resets: only a new
// entitlement helps, so the client should not come back soon.
const retryAfterNever int64 = 3600

// appendIP appends the textual form of ip.
func appendIP(b []byte, ip []byte) []byte {
	if len(ip) == 16 && bytes.Equal(ip[:12], v4InV6Prefix) {
		ip = ip[12:]
	}
	if len(ip) == 4 {
		for i, c := range ip {
			if i > 0 {
				b = append(b, '.')
			}
			b = strconv.AppendUint(b, uint64(c), 10)
		}
		return b
	}
	return append(b, netIPString(ip)...)
}

var v4InV6Prefix = []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff}
