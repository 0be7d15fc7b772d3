// Package proxy is gatehouse's HTTP front: a fasthttp server that identifies the
// customer of every request, matches its route, asks the limiter for a decision, and
// then forwards the request to the upstream or refuses it with an
// application/problem+json body. It also serves the same decision without proxying,
// for use behind another gateway.
//
// The request path reads entitlements from memory (through limiter.Source), counts with
// atomics, and makes no network call but the forward to the upstream. It must not keep
// fasthttp's request bytes after a handler returns.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/jsonx"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"
)

// Limiter is what the proxy needs of the decision engine; *limiter.Limiter implements it.
// Every method must be safe for concurrent use, allocate nothing once a customer's
// counters exist, and take well under a microsecond.
type Limiter interface {
	Reserve(s *limiter.Snapshot, uses []limiter.Use, now time.Time, force bool, r *limiter.Reservation) limiter.Decision
	Commit(r *limiter.Reservation, out []limiter.Usage) []limiter.Usage
	Refund(r *limiter.Reservation)
}

// Recorder makes committed usage durable. Record returns once u is safe against a
// killed process (sync/usage appends it to a memory-mapped log: a copy, no system call)
// and must only read u during the call.
type Recorder interface {
	Record(u []limiter.Usage) error
}

var _ Limiter = (*limiter.Limiter)(nil)

// Options configure a Proxy. Config, Source and Limiter are required.
type Options struct {
	Config   *config.Config
	Source   limiter.Source
	Limiter  Limiter
	Recorder Recorder // nil: usage is counted in memory only
	Log      *zap.Logger
	Metrics  *Metrics // nil: a fresh, unregistered set
	// AccessLog receives the access log when log.access_log is on; nil: Log. Give it a
	// logger without sampling, or busy periods lose lines.
	AccessLog *zap.Logger
	// Upstream overrides the HTTP client to the upstream (tests use an in-memory dialer).
	Upstream *fasthttp.HostClient
}

// Proxy is the sidecar's HTTP server.
type Proxy struct {
	opts     Options
	log      *zap.Logger
	table    atomic.Pointer[table]
	client   *fasthttp.HostClient
	timeout  atomic.Int64 // upstream timeout, nanoseconds
	server   *fasthttp.Server
	metrics  *Metrics
	access   *accessLog
	states   sync.Pool // *reqState
	closed   atomic.Bool
	lnMu     sync.Mutex     // protects lns, and orders Serve against Shutdown
	lns      []net.Listener // every listener Serve was given
	serveErr chan error
}

// reqState is the per-request scratch space, pooled so that a request allocates nothing.
type reqState struct {
	res    limiter.Reservation
	uses   [limiter.MaxRouteFeatures]limiter.Use
	usage  []limiter.Usage
	buf    []byte
	policy []byte
	limit  []byte
	ident  []byte // the identity header's value, kept across stripping
	keySum [32]byte
	timing uint32 // decisions until the next one timed (Metrics.startTiming)
	timed  bool   // this request is timed
}

// New builds a Proxy; it does not listen yet.
func New(opts Options) (*Proxy, error) {
	if opts.Config == nil || opts.Source == nil || opts.Limiter == nil {
		return nil, errors.New("proxy: Config, Source and Limiter are required")
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics()
	}
	if opts.AccessLog == nil {
		opts.AccessLog = opts.Log
	}
	p := &Proxy{opts: opts, log: opts.Log.Named("proxy"), metrics: opts.Metrics, serveErr: make(chan error, 1),
		access: newAccessLog(opts.AccessLog.Named("access"))}
	p.states.New = func() any { return &reqState{usage: make([]limiter.Usage, 0, limiter.MaxRouteFeatures)} }
	if err := p.Reload(opts.Config); err != nil {
		return nil, err
	}
	cfg := opts.Config
	if opts.Upstream != nil {
		p.client = opts.Upstream
	} else {
		c, err := newUpstreamClient(&cfg.Upstream)
		if err != nil {
			return nil, err
		}
		p.client = c
	}
	s := cfg.Server
	p.server = &fasthttp.Server{
		Handler:                       p.Handle,
		ErrorHandler:                  p.serverError,
		ReadTimeout:                   s.ReadTimeout,
		WriteTimeout:                  s.WriteTimeout,
		IdleTimeout:                   s.IdleTimeout,
		ReadBufferSize:                s.MaxHeaderBytes,
		MaxRequestBodySize:            s.MaxBodyBytes,
		Concurrency:                   s.Concurrency,
		NoDefaultServerHeader:         true,
		NoDefaultContentType:          true,
		DisablePreParseMultipartForm:  true,
		DisableHeaderNamesNormalizing: false,
		CloseOnShutdown:               true,
		Logger:                        zapPrintf{p.log},
	}
	return p, nil
}

func newUpstreamClient(u *config.Upstream) (*fasthttp.HostClient, error) {
	parsed, err := url.Parse(u.URL)
	if err != nil {
		return nil, fmt.Errorf("upstream.url: %w", err)
	}
	host := parsed.Host
	tls := parsed.Scheme == "https"
	if parsed.Port() == "" {
		if tls {
			host = net.JoinHostPort(parsed.Hostname(), "443")
		} else {
			host = net.JoinHostPort(parsed.Hostname(), "80")
		}
	}
	dialTimeout := u.DialTimeout
	return &fasthttp.HostClient{
		Addr:                          host,
		IsTLS:                         tls,
		MaxConns:                      u.MaxConns,
		MaxIdleConnDuration:           90 * time.Second,
		NoDefaultUserAgentHeader:      true,
		DisableHeaderNamesNormalizing: false,
		Dial: func(addr string) (net.Conn, error) {
			return fasthttp.DialTimeout(addr, dialTimeout)
		},
	}, nil
}

// Reload swaps in the routes, identity and policies of cfg atomically: a request sees
// either the old table or the new one, never a mix. The upstream timeout and the access
// log switch follow cfg too. The listener, the upstream and the server limits are not
// reloaded.
func (p *Proxy) Reload(cfg *config.Config) error {
	t, err := compile(cfg)
	if err != nil {
		return err
	}
	p.metrics.bind(t)
	p.table.Store(t)
	p.timeout.Store(int64(cfg.Upstream.Timeout))
	p.access.enabled.Store(cfg.Log.AccessLog)
	return nil
}

// Listen binds addr (":0" and "127.0.0.1:0" work) and returns the listener for Serve.
func Listen(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return ln, nil
}

// Serve serves requests on ln until Shutdown. After Shutdown it closes ln and returns
// nil at once.
func (p *Proxy) Serve(ln net.Listener) error {
	p.lnMu.Lock()
	if p.closed.Load() {
		p.lnMu.Unlock()
		ln.Close()
		return nil
	}
	p.lns = append(p.lns, ln)
	p.lnMu.Unlock()
	err := p.server.Serve(ln)
	if p.closed.Load() {
		return nil
	}
	return err
}

// Shutdown stops accepting connections and waits, until ctx is done, for the requests
// in flight to finish. It is safe to call twice.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.lnMu.Lock()
	p.closed.Store(true)
	lns := p.lns
	p.lnMu.Unlock()
	err := p.server.ShutdownWithContext(ctx)
	// fasthttp closes only the listeners its Serve has registered: one that Serve was
	// given but had not registered yet would otherwise be served for ever.
	for _, ln := range lns {
		ln.Close()
	}
	p.client.CloseIdleConnections()
	return err
}

// serverError answers what fasthttp could not parse: oversized headers (431), an
// oversized body (413), a read timeout (408) or a malformed request (400). Such a request
// never reaches the upstream.
func (p *Proxy) serverError(ctx *fasthttp.RequestCtx, err error) {
	status, reason := fasthttp.StatusBadRequest, "malformed_request"
	var small *fasthttp.ErrSmallBuffer
	var netErr net.Error
	switch {
	case errors.As(err, &small):
		status, reason = fasthttp.StatusRequestHeaderFieldsTooLarge, "headers_too_large"
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		status, reason = fasthttp.StatusRequestEntityTooLarge, "body_too_large"
	case errors.As(err, &netErr) && netErr.Timeout():
		status, reason = fasthttp.StatusRequestTimeout, "request_timeout"
	}
	p.metrics.protocolError(reason)
	writeSimpleProblem(ctx, status, reason, fasthttp.StatusMessage(status))
}

// writeSimpleProblem answers with a problem body that has no customer or feature.
func writeSimpleProblem(ctx *fasthttp.RequestCtx, status int, reason, title string) {
	ctx.Response.Reset()
	ctx.SetStatusCode(status)
	ctx.SetContentType("application/problem+json")
	b := append([]byte(`{"type":"urn:gatehouse:problem:`), reason...)
	b = append(b, `","title":`...)
	b = jsonx.AppendString(b, title)
	b = append(b, `,"status":`...)
	b = fmt.Appendf(b, "%d", status)
	b = append(b, `,"reason":"`...)
	b = append(b, reason...)
	b = append(b, `"}`...)
	ctx.SetBody(b)
}

type zapPrintf struct{ log *zap.Logger }

func (z zapPrintf) Printf(format string, args ...any) {
	z.log.Debug(fmt.Sprintf(format, args...))
}
