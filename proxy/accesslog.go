package proxy

import (
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"
)

// accessLog writes one Info line, message "request", per request that reaches the
// handler (proxied, refused, or answered by a check endpoint), when log.access_log is
// on. It is off by default; Reload switches it.
//
// Fields: method, path (for a check, the original path it decided on), status (as sent
// to the client or gateway), route, result, reason and feature (refusals only),
// customer, client (the peer's IP), duration (since the request was read), and check
// (the endpoint, for checks only).
//
// It allocates nothing of its own: the field slice is pooled, and request bytes are
// handed to zap as strings that alias them. That is safe because a zap core encodes the
// entry before Write returns (every core that cmd/gatehouse builds does); a core that
// kept fields past Write (zaptest/observer) would see them change.
type accessLog struct {
	enabled atomic.Bool
	log     *zap.Logger
	fields  sync.Pool // *accessFields
}

const maxAccessFields = 12

type accessFields [maxAccessFields]zap.Field

func newAccessLog(l *zap.Logger) *accessLog {
	a := &accessLog{log: l}
	a.fields.New = func() any { return new(accessFields) }
	return a
}

func (a *accessLog) on() bool { return a.enabled.Load() }

// write logs the request of ctx, once its response is set. path is the path the
// decision was made on. st.buf is overwritten.
func (a *accessLog) write(ctx *fasthttp.RequestCtx, check string, path []byte, o *outcome, st *reqState) {
	ce := a.log.Check(zap.InfoLevel, "request")
	if ce == nil {
		return
	}
	fp := a.fields.Get().(*accessFields)
	f := append(fp[:0],
		zap.String("method", unsafeString(ctx.Method())),
		zap.String("path", unsafeString(path)),
		zap.Int("status", ctx.Response.StatusCode()),
	)
	route := unmatchedRoute
	if o.route != nil {
		route = o.route.name
	}
	f = append(f, zap.String("route", route), zap.String("result", resultNames[resultOf(o)]))
	if o.decision.Reason != limiter.OK {
		f = append(f, zap.String("reason", o.decision.Reason.String()))
		if o.decision.Feature != "" {
			f = append(f, zap.String("feature", o.decision.Feature))
		}
	}
	switch {
	case o.snap != nil:
		f = append(f, zap.String("customer", o.snap.CustomerID))
	case len(o.customer) > 0:
		f = append(f, zap.String("customer", unsafeString(o.customer)))
	}
	st.buf = appendIP(st.buf[:0], ctx.RemoteIP())
	f = append(f, zap.String("client", unsafeString(st.buf)), zap.Duration("duration", time.Since(ctx.Time())))
	if check != "" {
		f = append(f, zap.String("check", check))
	}
	ce.Write(f...)
	clear(fp[:]) // keep no request bytes alive in the pool
	a.fields.Put(fp)
}

// unsafeString is b as a string without a copy. The string is valid only while b is
// unchanged: here, for the duration of one log call.
func unsafeString(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(unsafe.SliceData(b), len(b))
}
