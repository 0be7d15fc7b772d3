package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/natsd"
	"github.com/gatehouse-dev/gatehouse/sync/replica"
	"github.com/gatehouse-dev/gatehouse/sync/usage"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// clientTimeout bounds the one-shot commands' work against NATS.
const clientTimeout = 30 * time.Second

// withClient runs a one-shot command's work against NATS, bounded by clientTimeout.
func withClient(ctx context.Context, cfg *config.Config, fn func(ctx context.Context, js jetstream.JetStream) error) error {
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	nc, err := connectClient(ctx, cfg, zap.NewNop())
	if err != nil {
		return err
	}
	defer nc.Close()
	return fn(ctx, nc.JS())
}

// connectClient connects a one-shot command to the configured NATS, or, with no URLs,
// to the embedded server of a sidecar running with this configuration.
func connectClient(ctx context.Context, cfg *config.Config, log *zap.Logger) (*natsd.Conn, error) {
	urls := cfg.NATS.URLs
	if len(urls) == 0 {
		urls = []string{"nats://" + cfg.NATS.EmbeddedListen}
	}
	return natsd.Connect(ctx, natsd.Options{URLs: urls, Credentials: cfg.NATS.Credentials, Log: log, Name: "gatehouse-cli", FailFast: true})
}

func cmdPush(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("push", stderr)
	path := fs.String("config", "", "configuration file (for nats)")
	file := fs.String("f", "", "snapshots: a JSON array or NDJSON")
	del := fs.String("delete", "", "revoke this customer")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if (*file == "") == (*del == "") {
		return usageErr("give exactly one of -f SNAPSHOTS and -delete CUSTOMER")
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	var docs []limiter.RawDoc
	if *file != "" {
		f, err := os.Open(*file)
		if err != nil {
			return usageErr("-f: %v", err)
		}
		docs, err = limiter.ReadSnapshotDocs(f)
		f.Close()
		if err != nil {
			return &exitError{code: 2, err: err}
		}
	}
	return withClient(ctx, cfg, func(ctx context.Context, js jetstream.JetStream) error {
		kv, err := replica.EnsureBucket(ctx, js)
		if err != nil {
			return err
		}
		if *del != "" {
			if err := replica.Delete(ctx, kv, *del); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "revoked %s\n", *del)
			return nil
		}
		res, err := replica.Push(ctx, kv, docs, zap.NewNop())
		out, _ := json.Marshal(res)
		fmt.Fprintf(stdout, "%s\n", out)
		var fe limiter.FileErrors
		if errors.As(err, &fe) {
			return &exitError{code: 2, err: err}
		}
		return err
	})
}

func cmdUsage(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("usage", stderr)
	path := fs.String("config", "", "configuration file (for nats)")
	asJSON := fs.Bool("json", false, "print JSON instead of a table")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	return withClient(ctx, cfg, func(ctx context.Context, js jetstream.JetStream) error {
		totals, err := usage.Totals(ctx, js)
		if err != nil {
			return err
		}
		return usage.PrintTotals(stdout, totals, *asJSON)
	})
}
