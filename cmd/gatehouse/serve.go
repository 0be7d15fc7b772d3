package main

import (
	"context"
	"fmt"
	"io"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/sidecar"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"go.uber.org/zap"
)

func cmdServe(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flags("serve", stderr)
	path := fs.String("config", "", "configuration file")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	log, access, err := newLogger(cfg.Log, stderr)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck
	var waitReloader func()
	err = serve(ctx, cfg, nil, log, access, func(sc *sidecar.Sidecar) { waitReloader = startReloader(ctx, sc, *path) })
	if waitReloader != nil {
		waitReloader()
	}
	return err
}

// serve runs a sidecar until ctx is done, then shuts it down within the configured
// deadline. started, when set, is called once the sidecar serves.
func serve(ctx context.Context, cfg *config.Config, snaps []*limiter.Snapshot, log, access *zap.Logger, started func(*sidecar.Sidecar)) error {
	if snaps == nil && cfg.Entitlements.File != "" {
		var err error
		if snaps, err = loadSnapshots(cfg.Entitlements.File); err != nil {
			return &exitError{code: 2, err: err}
		}
	}
	sc, err := sidecar.New(sidecar.Options{Config: cfg, Log: log, AccessLog: access, Snapshots: snaps})
	if err != nil {
		return err
	}
	if err := sc.Start(ctx); err != nil {
		return err
	}
	if started != nil {
		started(sc)
	}
	<-ctx.Done()
	log.Info("shutting down", zap.Duration("deadline", cfg.Server.ShutdownTimeout))
	sctx, cancel := context.WithTimeout(context.Background(), cfg.Server.ShutdownTimeout)
	defer cancel()
	if err := sc.Close(sctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return nil
}

func loadSnapshots(path string) ([]*limiter.Snapshot, error) {
	return sidecar.LoadSnapshots(path)
}
