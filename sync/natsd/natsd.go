// Package natsd owns gatehouse's link to NATS: with no URLs it runs an embedded
// nats-server with JetStream (stored under <data dir>/nats, listening on loopback unless
// told otherwise) and connects to it in process; with URLs it connects to them and
// reconnects forever, pinging often enough that a dead link is noticed in seconds.
//
// It hands out the connection and a JetStream context; it must not create streams,
// buckets or consumers (their owners under sync/ do), and it must not block the caller
// while NATS is away: Connect returns at once and the client keeps retrying.
package natsd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// Defaults of Options.
const (
	DefaultEmbeddedListen = "127.0.0.1:4222"
	DefaultPingInterval   = 2 * time.Second
	DefaultName           = "gatehouse"
)

// Options configure Connect. The zero value of each field means its documented default.
type Options struct {
	// URLs of the NATS servers (several for a cluster); empty: run an embedded server.
	URLs []string
	// EmbeddedListen is the embedded server's client address; default 127.0.0.1:4222.
	// Port 0 or -1 picks a free port.
	EmbeddedListen string
	// DataDir holds the embedded server's JetStream storage, under DataDir/nats.
	DataDir string
	// PingInterval is how often the client pings the server; two missed pings close the
	// link and start reconnecting. Default 2s.
	PingInterval time.Duration
	// Credentials is an optional NATS .creds file (remote servers only).
	Credentials string
	// Log receives connection events; nil discards them.
	Log *zap.Logger
	// Name is the client connection name shown by the server; default "gatehouse".
	Name string
	// FailFast makes Connect return an error when no server answers at once, instead
	// of retrying in the background: for one-shot commands, not for the sidecar.
	FailFast bool

	// reconnectWait is the pause between reconnect attempts; tests shorten it.
	reconnectWait time.Duration
}

// Conn is a NATS connection, with the embedded server it talks to, if any.
type Conn struct {
	nc  *nats.Conn
	js  jetstream.JetStream
	srv *server.Server // nil when connected to remote servers
	log *zap.Logger

	closeOnce sync.Once
	closeErr  error
	closed    chan struct{} // closed by the connection's ClosedHandler
}

// Connect starts the embedded server when opts.URLs is empty, then connects. With URLs it
// returns at once even when no server answers (unless FailFast): the client keeps
// reconnecting, forever.
func Connect(ctx context.Context, opts Options) (*Conn, error) {
	log := opts.Log
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("nats")
	if opts.PingInterval <= 0 {
		opts.PingInterval = DefaultPingInterval
	}
	if opts.Name == "" {
		opts.Name = DefaultName
	}
	if opts.reconnectWait <= 0 {
		opts.reconnectWait = time.Second
	}
	c := &Conn{log: log, closed: make(chan struct{})}
	nopts := []nats.Option{
		nats.Name(opts.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(opts.reconnectWait),
		nats.PingInterval(opts.PingInterval),
		nats.MaxPingsOutstanding(2),
		nats.RetryOnFailedConnect(!opts.FailFast),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			log.Warn("disconnected from nats; serving from the local replica", zap.Error(err))
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("reconnected to nats", zap.String("url", nc.ConnectedUrlRedacted()))
		}),
		nats.ConnectHandler(func(nc *nats.Conn) {
			log.Info("connected to nats", zap.String("url", nc.ConnectedUrlRedacted()))
		}),
		nats.DiscoveredServersHandler(func(nc *nats.Conn) {
			log.Info("discovered nats servers", zap.Strings("servers", nc.DiscoveredServers()))
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			f := []zap.Field{zap.Error(err)}
			if sub != nil {
				f = append(f, zap.String("subject", sub.Subject))
			}
			log.Warn("nats error", f...)
		}),
		nats.ClosedHandler(func(*nats.Conn) { close(c.closed) }),
	}
	var url string
	if len(opts.URLs) == 0 {
		srv, err := startEmbedded(opts, log)
		if err != nil {
			return nil, err
		}
		c.srv = srv
		url = srv.ClientURL()
		nopts = append(nopts, nats.InProcessServer(srv))
	} else {
		url = strings.Join(opts.URLs, ",")
		if opts.Credentials != "" {
			if _, err := os.Stat(opts.Credentials); err != nil {
				return nil, fmt.Errorf("nats credentials: %w", err)
			}
			nopts = append(nopts, nats.UserCredentials(opts.Credentials))
		}
	}
	nc, err := nats.Connect(url, nopts...)
	if err != nil {
		c.shutdownServer()
		return nil, fmt.Errorf("connect to nats %s: %w", url, err)
	}
	c.nc = nc
	if c.js, err = jetstream.New(nc); err != nil {
		nc.Close()
		c.shutdownServer()
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	if err := ctx.Err(); err != nil {
		c.Close()
		return nil, err
	}
	if !nc.IsConnected() {
		log.Warn("nats not reachable yet; retrying in the background", zap.Strings("urls", opts.URLs))
	}
	return c, nil
}

// startEmbedded runs a nats-server with JetStream under opts.DataDir/nats.
func startEmbedded(opts Options, log *zap.Logger) (*server.Server, error) {
	if opts.DataDir == "" {
		return nil, errors.New("embedded nats: no data directory")
	}
	listen := opts.EmbeddedListen
	if listen == "" {
		listen = DefaultEmbeddedListen
	}
	host, portStr, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, fmt.Errorf("embedded nats listen %q: %w", listen, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < -1 || port > 65535 {
		return nil, fmt.Errorf("embedded nats listen %q: bad port", listen)
	}
	if port == 0 {
		port = server.RANDOM_PORT // nats-server reads 0 as its default port, 4222
	}
	if host == "" {
		host = "127.0.0.1"
	}
	if port != server.RANDOM_PORT {
		// nats-server only logs a port it cannot listen on, and is then never ready:
		// try it first, to fail at once with the reason.
		ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return nil, fmt.Errorf("embedded nats (nats.embedded_listen): %w", err)
		}
		ln.Close()
	}
	dir := filepath.Join(opts.DataDir, "nats")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	sopts := &server.Options{
		ServerName: "gatehouse-embedded",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   dir,
		// Snapshots may be up to 1 MiB, and a KV value travels with headers.
		MaxPayload:             8 << 20,
		NoSigs:                 true,
		NoLog:                  true,
		DisableJetStreamBanner: true,
	}
	srv, err := server.NewServer(sopts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	srv.SetLogger(serverLogger{log.Named("server").Sugar()}, false, false)
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil, fmt.Errorf("embedded nats on %s: not ready after 10s (is the port in use?)", listen)
	}
	log.Info("embedded nats-server started", zap.String("url", srv.ClientURL()), zap.String("store_dir", dir))
	return srv, nil
}

// NC is the NATS connection.
func (c *Conn) NC() *nats.Conn { return c.nc }

// JS is the JetStream context over the connection.
func (c *Conn) JS() jetstream.JetStream { return c.js }

// ClientURL is the embedded server's client URL, for other sidecars and the control
// plane; with remote servers, the URL currently connected to ("" while disconnected).
func (c *Conn) ClientURL() string {
	if c.srv != nil {
		return c.srv.ClientURL()
	}
	return c.nc.ConnectedUrlRedacted()
}

// Embedded reports whether the connection is to an embedded server.
func (c *Conn) Embedded() bool { return c.srv != nil }

// Close drains the connection (waiting up to its drain timeout), then shuts the
// embedded server down. It is safe to call twice.
func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		if c.nc.IsConnected() {
			if err := c.nc.Drain(); err != nil {
				c.log.Warn("drain", zap.Error(err))
				c.nc.Close()
			}
			select {
			case <-c.closed:
			case <-time.After(35 * time.Second): // the default drain timeout is 30s
				c.nc.Close()
			}
		} else {
			c.nc.Close()
		}
		c.shutdownServer()
	})
	return c.closeErr
}

func (c *Conn) shutdownServer() {
	if c.srv != nil {
		c.srv.Shutdown()
		c.srv.WaitForShutdown()
		c.log.Info("embedded nats-server stopped")
	}
}

// serverLogger routes the embedded server's log to zap.
type serverLogger struct{ s *zap.SugaredLogger }

func (l serverLogger) Noticef(f string, a ...any) { l.s.Infof(f, a...) }
func (l serverLogger) Warnf(f string, a ...any)   { l.s.Warnf(f, a...) }
func (l serverLogger) Fatalf(f string, a ...any)  { l.s.Errorf(f, a...) }
func (l serverLogger) Errorf(f string, a ...any)  { l.s.Errorf(f, a...) }
func (l serverLogger) Debugf(f string, a ...any)  { l.s.Debugf(f, a...) }
func (l serverLogger) Tracef(f string, a ...any)  { l.s.Debugf(f, a...) }
