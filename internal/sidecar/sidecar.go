// Package sidecar assembles one gatehouse sidecar from its configuration: the Badger
// store, the NATS connection (an embedded server by default), the entitlement replica,
// the usage outbox, the limiter, the proxy and the admin listener. cmd/gatehouse runs it,
// and tests that need a whole sidecar in process start it here.
//
// It owns the start and stop order of the parts; it decides nothing itself.
//
// Hard limits are fleet-exact through sync/quota unless quota.enabled is off: the
// limiter takes leases from the quota manager, which the replica tells of changed limits.
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
	"github.com/gatehouse-dev/gatehouse/sync/natsd"
	"github.com/gatehouse-dev/gatehouse/sync/quota"
	"github.com/gatehouse-dev/gatehouse/sync/replica"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"github.com/gatehouse-dev/gatehouse/sync/usage"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Options configure a Sidecar.
type Options struct {
	Config *config.Config
	Log    *zap.Logger
	// AccessLog receives the access log (log.access_log); nil: Log. Give it a logger
	// without sampling.
	AccessLog *zap.Logger
	// Snapshots, when set, are pushed into the entitlement bucket at start instead of
	// those of entitlements.file (the demo and tests pass them directly).
	Snapshots []*limiter.Snapshot
	// Standalone runs without NATS or Badger: Snapshots (or entitlements.file) are
	// served from memory and usage is counted in memory only. For tests of the HTTP
	// surface; production sidecars never run this way.
	Standalone bool
}

// seedTimeout bounds one try to push entitlements.file into the bucket.
const seedTimeout = 10 * time.Second

// Sidecar is a running gatehouse.
type Sidecar struct {
	cfg      *config.Config
	log      *zap.Logger
	Limiter  *limiter.Limiter
	Source   limiter.Source
	Proxy    *proxy.Proxy
	Registry *prometheus.Registry
	Store    *store.Store     // nil when standalone
	NATS     *natsd.Conn      // nil when standalone
	Replica  *replica.Replica // nil when standalone
	Usage    *usage.Recorder  // nil when standalone
	Quota    *quota.Manager   // nil when standalone or quota.enabled is off
	seed     []*limiter.Snapshot

	ln, adminLn net.Listener
	admin       *adminServer
	wg          sync.WaitGroup // serving goroutines and the maintenance loop
	stop        context.CancelFunc
	closeOnce   sync.Once
	closeErr    error
	closers     []func(context.Context) error // in the order Close runs them
}

// New builds a sidecar: it opens the store, connects to NATS, loads the replica and
// restores the usage counters, and binds the listeners. Start serves.
func New(opts Options) (s *Sidecar, err error) {
	cfg, log := opts.Config, opts.Log
	if log == nil {
		log = zap.NewNop()
	}
	sc := &Sidecar{cfg: cfg, log: log, Limiter: limiter.New(), Registry: prometheus.NewRegistry()}
	s = sc
	// On failure, close what was opened: sc, since every error return sets s to nil.
	defer func() {
		if err != nil {
			if cerr := sc.closeParts(context.Background()); cerr != nil {
				log.Warn("closing after a failed start", zap.Error(cerr))
			}
		}
	}()
	s.seed = opts.Snapshots
	if s.seed == nil && cfg.Entitlements.File != "" {
		if s.seed, err = LoadSnapshots(cfg.Entitlements.File); err != nil {
			return nil, err
		}
	}
	var recorder proxy.Recorder
	if opts.Standalone {
		s.Source = limiter.NewMemorySource(s.seed...)
	} else {
		if err := s.openSync(); err != nil {
			return nil, err
		}
		s.Source = s.Replica
		if s.Usage != nil {
			recorder = s.Usage
		}
	}

	metrics := proxy.NewMetrics()
	if err := metrics.Register(s.Registry); err != nil {
		return nil, err
	}
	s.Proxy, err = proxy.New(proxy.Options{
		Config: cfg, Source: s.Source, Limiter: s.Limiter, Recorder: recorder,
		Log: log, AccessLog: opts.AccessLog, Metrics: metrics,
	})
	if err != nil {
		return nil, err
	}
	if s.ln, err = proxy.Listen(cfg.Listen); err != nil {
		return nil, err
	}
	s.closers = append([]func(context.Context) error{func(context.Context) error { s.ln.Close(); return nil }}, s.closers...)
	if cfg.AdminListen != "" {
		if s.adminLn, err = proxy.Listen(cfg.AdminListen); err != nil {
			return nil, err
		}
		s.admin = newAdmin(s)
	}
	if err := s.attach(s.parts()); err != nil {
		return nil, err
	}
	return s, nil
}

// openSync opens the store, NATS, the replica, the usage recorder and the quota
// manager, in that order, and restores the limiter's counters and leases from the store.
func (s *Sidecar) openSync() error {
	cfg, log := s.cfg, s.log
	st, err := store.Open(store.Options{Dir: cfg.DataDir, Log: log})
	if err != nil {
		return err
	}
	s.Store = st
	s.closers = append(s.closers, func(context.Context) error { return st.Close() })
	// Give the parts that take a context a long one: Close stops them.
	ctx := context.Background()
	nc, err := natsd.Connect(ctx, natsd.Options{
		URLs: cfg.NATS.URLs, EmbeddedListen: cfg.NATS.EmbeddedListen, DataDir: cfg.DataDir,
		PingInterval: cfg.NATS.PingInterval, Credentials: cfg.NATS.Credentials, Log: log,
		Name: "gatehouse-" + st.SidecarID(),
	})
	if err != nil {
		return err
	}
	s.NATS = nc
	s.closers = append([]func(context.Context) error{func(context.Context) error { return nc.Close() }}, s.closers...)

	// The quota manager hears of changed limits from the replica; it is set below,
	// before Start starts the replica's watch.
	var q *quota.Manager
	onChange := func(old, new *limiter.Snapshot) {
		if q != nil {
			q.OnChange(old, new)
		}
	}
	rep, err := replica.New(replica.Options{JS: nc.JS(), Store: st, Log: log, CacheSize: cfg.Entitlements.CacheSize, OnChange: onChange})
	if err != nil {
		return err
	}
	s.Replica = rep
	s.closers = append([]func(context.Context) error{func(context.Context) error { return rep.Close() }}, s.closers...)

	if cfg.Usage.Enabled {
		rec, err := usage.New(usage.Options{
			Store: st, JS: nc.JS(), Log: log, FlushInterval: cfg.Usage.FlushInterval,
			StreamReplicas: cfg.Usage.StreamReplicas, MaxOutboxBytes: cfg.Usage.MaxOutboxBytes,
			Nice: cfg.Server.BackgroundNice,
		})
		if err != nil {
			return err
		}
		s.Usage = rec
		s.closers = append([]func(context.Context) error{rec.Close}, s.closers...)
		if err := rec.Restore(s.Limiter); err != nil {
			return fmt.Errorf("restore usage counters: %w", err)
		}
	} else {
		log.Warn("usage accounting is off: usage is counted in memory only and never published")
	}

	if !cfg.Quota.Enabled {
		log.Warn("quota leases are off: each sidecar enforces hard limits alone, and a fleet may admit more than a limit")
		return nil
	}
	qc := cfg.Quota
	idle := qc.IdleReturn
	if idle == 0 {
		idle = -1 // never
	}
	if q, err = quota.New(quota.Options{
		JS: nc.JS(), Store: st, Log: log, Bucket: qc.Bucket, Replicas: qc.Replicas,
		MinLease: qc.MinLease, MaxLease: qc.MaxLease, LeasePeriod: qc.LeasePeriod,
		LowWaterPercent: qc.LowWaterPercent, Wait: qc.Wait, IdleReturn: idle,
	}); err != nil {
		return err
	}
	s.Quota = q
	// Closed first of the parts: unused leases go back to the fleet while NATS is up.
	s.closers = append([]func(context.Context) error{q.Close}, s.closers...)
	if err := q.Load(s.Limiter, s.Usage != nil); err != nil {
		return err
	}
	s.Limiter.SetQuota(q)
	return nil
}

// closeParts closes what New opened, newest first.
func (s *Sidecar) closeParts(ctx context.Context) error {
	var errs []error
	for _, c := range s.closers {
		errs = append(errs, c(ctx))
	}
	s.closers = nil
	return errors.Join(errs...)
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

// Start starts the replica's watch and the usage publisher, pushes the seed snapshots
// into the bucket, and serves the proxy and the admin listener in the background.
func (s *Sidecar) Start(ctx context.Context) error {
	ctx, s.stop = context.WithCancel(ctx)
	if s.Replica != nil {
		if err := s.Replica.Start(ctx); err != nil {
			return err
		}
		if s.Usage != nil {
			if err := s.Usage.Start(ctx); err != nil {
				return err
			}
		}
		if s.Quota != nil {
			s.Quota.Start(ctx)
		}
		// A replica from an earlier run serves at once, and the seed follows in the
		// background; an empty one has nothing to serve until the seed is in.
		if len(s.seed) > 0 && (s.Replica.Ready() || !s.pushSeed(ctx, seedTimeout)) {
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.retrySeed(ctx)
			}()
		}
	}
	s.serve("proxy", func() error { return s.Proxy.Serve(s.ln) })
	if s.admin != nil {
		s.serve("admin", func() error { return s.admin.serve(s.adminLn) })
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.maintain(ctx)
	}()
	admin := "off"
	if a := s.AdminAddr(); a != nil {
		admin = a.String()
	}
	fields := []zap.Field{zap.Stringer("listen", s.Addr()), zap.String("admin", admin), zap.String("upstream", s.cfg.Upstream.URL)}
	if s.NATS != nil {
		fields = append(fields, zap.String("nats", s.NATS.ClientURL()), zap.Bool("nats_embedded", s.NATS.Embedded()),
			zap.String("sidecar_id", s.Store.SidecarID()))
	}
	s.log.Info("gatehouse serving", fields...)
	return nil
}

// pushSeed writes the seed snapshots into the bucket (only those that changed) within
// timeout, and waits briefly for the replica to apply them, so that a sidecar that
// starts ready serves its seed. It reports whether the push succeeded.
func (s *Sidecar) pushSeed(ctx context.Context, timeout time.Duration) bool {
	pctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	kv, err := replica.EnsureBucket(pctx, s.NATS.JS())
	if err != nil {
		s.log.Warn("could not push entitlements into the bucket; serving the replica as it is", zap.Error(err))
		return false
	}
	res, err := replica.PushSnapshots(pctx, kv, s.seed, s.log)
	if err != nil {
		s.log.Warn("could not push entitlements into the bucket; serving the replica as it is", zap.Error(err))
		return false
	}
	s.log.Info("entitlements pushed from the seed", zap.Int("written", res.Written), zap.Int("unchanged", res.Unchanged))
	for res.Written > 0 && s.Replica.Stats().Revision < res.Revision && pctx.Err() == nil {
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

// retrySeed pushes the seed, retrying with backoff until it succeeds or ctx is done.
func (s *Sidecar) retrySeed(ctx context.Context) {
	wait := time.Second
	for !s.pushSeed(ctx, seedTimeout) {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, 30*time.Second)
	}
}

// WaitReady waits until the replica has caught up with the bucket (at once when
// standalone).
func (s *Sidecar) WaitReady(ctx context.Context) error {
	if s.Replica == nil {
		return nil
	}
	return s.Replica.WaitReady(ctx)
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

// Close stops the sidecar: no new connections; requests in flight finish, and the
// usage outbox publishes what it can, until ctx is done; then the replica, NATS and the
// store close. It is safe to call twice.
func (s *Sidecar) Close(ctx context.Context) error {
	s.closeOnce.Do(func() {
		var errs []error
		errs = append(errs, s.Proxy.Shutdown(ctx))
		if s.admin != nil {
			errs = append(errs, s.admin.shutdown(ctx))
		}
		// A Serve that had not started when Shutdown ran would otherwise accept forever.
		s.ln.Close()
		if s.adminLn != nil {
			s.adminLn.Close()
		}
		if s.stop != nil {
			s.stop()
		}
		s.wg.Wait()
		errs = append(errs, s.closeParts(ctx))
		s.closeErr = errors.Join(errs...)
	})
	return s.closeErr
}

// parts describes the replica and the usage outbox to the admin listener and metrics.
func (s *Sidecar) parts() Parts {
	var p Parts
	if r := s.Replica; r != nil {
		p.Replica = &ReplicaView{Resync: r.Resync, Stats: func() ReplicaStats {
			st := r.Stats()
			return ReplicaStats{Revision: st.Revision, Applied: st.Applied, Rejected: st.Rejected,
				CaughtUp: st.CaughtUp, LastContact: st.LastContact, Staleness: st.Staleness,
				Customers: st.Customers, Cached: st.CacheLen, Loads: st.Loads}
		}}
	}
	if q := s.Quota; q != nil {
		p.Leases = &LeaseView{Held: q.Held, Pending: q.Pending, Stats: func() LeaseStats {
			st := q.Stats()
			return LeaseStats{Refills: st.Refills, RefillErrors: st.RefillErrors, Leases: st.Leases, HeldUnits: st.HeldUnits}
		}}
	}
	if u := s.Usage; u != nil {
		p.Usage = &UsageView{Stats: func() UsageStats {
			st := u.Stats()
			return UsageStats{OutboxBytes: st.OutboxBytes, OutboxRecords: st.OutboxRecords, LogFileBytes: st.LogFileBytes,
				PublishErrors: st.PublishErrors, AtBound: st.AtBound, Records: st.Records, BadgerWrites: st.BadgerWrites,
				Published: st.Published, Unsettled: st.Unsettled}
		}}
	}
	return p
}
