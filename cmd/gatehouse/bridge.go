package main

import (
	"context"
	"io"

	"github.com/gatehouse-dev/gatehouse/sync/flexprice"
)

// cmdBridge runs `gatehouse bridge flexprice`: entitlements from Flexprice into the
// bucket, usage from the stream into Flexprice events. One per deployment.
func cmdBridge(ctx context.Context, args []string, stderr io.Writer) error {
	if len(args) == 0 || args[0] != "flexprice" {
		return usageErr("usage: gatehouse bridge flexprice -config FILE")
	}
	fs := flags("bridge flexprice", stderr)
	path := fs.String("config", "", "configuration file (nats and flexprice sections)")
	if err := parseFlags(fs, args[1:]); err != nil {
		return err
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	log, _, err := newLogger(cfg.Log, stderr)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck
	opts, err := flexprice.OptionsFromConfig(cfg.Flexprice)
	if err != nil {
		return usageErr("flexprice: %v", err)
	}
	nc, err := connectClient(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer nc.Close()
	opts.JetStream, opts.Logger, opts.StreamReplicas = nc.JS(), log, cfg.Usage.StreamReplicas
	b, err := flexprice.New(opts)
	if err != nil {
		return usageErr("flexprice: %v", err)
	}
	return b.Run(ctx)
}
