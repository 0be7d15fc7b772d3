// Package sidecar assembles one gatehouse sidecar from its configuration: the limiter,
// the entitlement source, the proxy and the admin listener. cmd/gatehouse runs it, and
// tests that need a whole sidecar in process start it here.
//
// It owns the start and stop order of the parts; it decides nothing itself.
package sidecar

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/proxy"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Options configure a Sidecar.
type Options struct {
	Config *config.Config
	Log    *zap.Logger
	// Snapshots, when set, are served instead of those of entitlements.file (the demo
	// and tests pass them directly).
	Snapshots []*limiter.Snapshot
}

// Sidecar is a running gatehouse.
type Sidecar struct {
	cfg      *config.Config
	log      *zap.Logger
	Limiter  *limiter.Limiter
	Source   limiter.Source
	Proxy    *proxy.Proxy
	Registry *prometheus.Registry

	ln, adminLn net.Listener
	admin       *adminServer
	wg          sync.WaitGroup // serving goroutines and the maintenance loop
	stop        context.CancelFunc
	closeOnce   sync.Once
	closeErr    error
}

// New builds a sidecar and binds its listeners; Start serves.
func New(opts Options) (*Sidecar, error) {
	cfg, log := opts.Config, opts.Log
	if log == nil {
		log = zap.NewNop()
	}
	s := &Sidecar{cfg: cfg, log: log, Limiter: limiter.New(), Registry: prometheus.NewRegistry()}
	snaps := opts.Snapshots
	if snaps == nil && cfg.Entitlements.File != "" {
		var err error
		if snaps, err = LoadSnapshots(cfg.Entitlements.File); err != nil {
			return nil, err
		}
	}
	s.Source = limiter.NewMemorySource(snaps...)

	metrics := proxy.NewMetrics()
	if err := metrics.Register(s.Registry); err != nil {
		return nil, err
	}
	p, err := proxy.New(proxy.Options{Config: cfg, Source: s.Source, Limiter: s.Limiter, Log: log, Metrics: metrics})
	if err != nil {
		return nil, err
	}
	s.Proxy = p
	if s.ln, err = proxy.Listen(cfg.Listen); err != nil {
		return nil, err
	}
	if cfg.AdminListen != "" {
		if s.adminLn, err = proxy.Listen(cfg.AdminListen); err != nil {
			s.ln.Close()
			return nil, err
		}
		s.admin = newAdmin(s)
	}
	return s, nil
}

// LoadSnapshots reads a snapshot file (JSON array or NDJSON); every bad snapshot is
// reported with its position.
func LoadSnapshots(path string) ([]*limiter.Snapshot, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("entitlements.file: %w", err)
	}
	defer f.Close()
	snaps, err := limiter.ParseSnapshots(f)
	if err != nil {
		return nil, fmt.Errorf("entitlements.file %s:\n%w", path, err)
	}
	return snaps, nil
}

// Addr is the proxy's listening address.
func (s *Sidecar) Addr() net.Addr { return s.ln.Addr() }

// AdminAddr is the admin listener's address, nil when disabled.
func (s *Sidecar) AdminAddr() net.Addr {
	if s.adminLn == nil {
		return nil
	}
	return s.adminLn.Addr()
}

// Start serves the proxy and the admin listener in the background.
func (s *Sidecar) Start(ctx context.Context) error {
	ctx, s.stop = context.WithCancel(ctx)
	s.serve("proxy", func() error { return s.Proxy.Serve(s.ln) })
	if s.admin != nil {
		s.serve("admin", func() error { return s.admin.serve(s.adminLn) })
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.maintain(ctx)
	}()
	s.log.Info("gatehouse serving", zap.Stringer("listen", s.Addr()), zap.Stringer("admin", s.AdminAddr()),
		zap.String("upstream", s.cfg.Upstream.URL))
	return nil
}

func (s *Sidecar) serve(name string, fn func() error) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := fn(); err != nil && !errors.Is(err, net.ErrClosed) {
			s.log.Error("listener stopped", zap.String("listener", name), zap.Error(err))
		}
	}()
}

// maintain runs the periodic housekeeping: dropping counters of ended windows.
func (s *Sidecar) maintain(ctx context.Context) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if n := s.Limiter.Sweep(now.Add(-time.Hour)); n > 0 {
				s.log.Debug("dropped counters of ended windows", zap.Int("counters", n))
			}
		}
	}
}

// Reload swaps in a new configuration's routes and policies.
func (s *Sidecar) Reload(cfg *config.Config) error {
	return s.Proxy.Reload(cfg)
}

// Close stops the sidecar: no new connections, requests in flight finish until ctx is
// done. It is safe to call twice.
func (s *Sidecar) Close(ctx context.Context) error {
	s.closeOnce.Do(func() {
		var errs []error
		errs = append(errs, s.Proxy.Shutdown(ctx))
		if s.admin != nil {
			errs = append(errs, s.admin.shutdown(ctx))
		}
		if s.stop != nil {
			s.stop()
		}
		s.wg.Wait()
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}
