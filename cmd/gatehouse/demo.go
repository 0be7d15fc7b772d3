package main

import (
	"bytes"
	"context"
	_ "embed"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/echo"
	"github.com/gatehouse-dev/gatehouse/internal/sidecar"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"go.uber.org/zap"
)

var (
	//go:embed demo/config.yaml
	demoConfig []byte
	//go:embed demo/entitlements.json
	demoEntitlements []byte
)

func cmdDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flags("demo", stderr)
	listen := fs.String("listen", "127.0.0.1:8080", "proxy listen address")
	admin := fs.String("admin", "127.0.0.1:9901", "admin listen address (empty: off)")
	natsAddr := fs.String("nats", "127.0.0.1:4222", "embedded NATS client address (port 0: any free port)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	upLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("demo upstream: %w", err)
	}
	defer upLn.Close()
	go func() { _ = echo.Serve(upLn, false) }()

	cfg, err := config.Parse(bytes.NewReader(demoConfig))
	if err != nil {
		return fmt.Errorf("demo config: %w", err)
	}
	cfg.Listen, cfg.AdminListen, cfg.NATS.EmbeddedListen = *listen, *admin, *natsAddr
	cfg.Upstream.URL = "http://" + upLn.Addr().String()
	dir, err := os.MkdirTemp("", "gatehouse-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cfg.DataDir = dir
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("demo config: %w", err)
	}
	snaps, err := limiter.ParseSnapshots(bytes.NewReader(demoEntitlements))
	if err != nil {
		return fmt.Errorf("demo entitlements: %w", err)
	}
	log, access, err := newLogger(cfg.Log, stderr)
	if err != nil {
		return err
	}
	return serve(ctx, cfg, snaps, log, access, func(sc *sidecar.Sidecar) {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := sc.WaitReady(wctx); err != nil {
			log.Warn("replica not ready yet", zap.Error(err))
		}
		help := demoHelp(sc.Addr().String(), cfg.Upstream.URL, sc.NATS.ClientURL(), dir)
		if a := sc.AdminAddr(); a != nil {
			help = strings.ReplaceAll(help, "ADMIN", a.String())
		}
		fmt.Fprint(stdout, help)
	})
}

func demoHelp(addr, upstream, natsURL, dir string) string {
	r := strings.NewReplacer("ADDR", addr, "UPSTREAM", upstream, "NATSURL", natsURL, "DATADIR", dir)
	return r.Replace(`
gatehouse demo: a sidecar on http://ADDR in front of an echo upstream on UPSTREAM.
Embedded NATS with JetStream on NATSURL; Badger and NATS data under DATADIR.
Customers: acme (small limits) and globex, pushed into the entitlement bucket. Try, in another terminal:

  # allowed: the upstream sees X-Customer-Id and the static X-Support-Tier: 24/7
  curl -i http://ADDR/v1/hello -H 'X-Customer-Id: acme'

  # boolean feature off for acme: 403 feature_not_entitled (globex has it: 200)
  curl -i http://ADDR/v1/analytics/summary -H 'X-Customer-Id: acme'
  curl -i http://ADDR/v1/analytics/summary -H 'X-Customer-Id: globex'

  # hard limit of 3 reports a day: the 4th gets 429 usage_limit_exceeded with Retry-After
  for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code}\n' -X POST http://ADDR/v1/reports -H 'X-Customer-Id: acme'; done

  # soft limit of 2 exports: every call is forwarded, the 3rd and later are overage
  for i in 1 2 3 4; do curl -s -D - -o /dev/null -X POST http://ADDR/v1/exports -H 'X-Customer-Id: acme' | grep -i '^ratelimit:'; done

  # cost from the upstream's response: the echo upstream reports 42 tokens used
  curl -i -X POST http://ADDR/v1/chat -H 'X-Customer-Id: acme' -H 'X-Echo-Response-Header: X-Tokens-Used: 42'

  # no identity: 401 customer_missing; unknown customer: 403 customer_unknown
  curl -i http://ADDR/v1/hello
  curl -i http://ADDR/v1/hello -H 'X-Customer-Id: nobody'

  # what the sidecar knows of acme: entitlements, usage per window, remaining
  curl -s http://ADMIN/v1/customers/acme

  # usage published to JetStream (flushed every second), from another shell in this repo
  printf 'upstream:\n  url: http://127.0.0.1:1\nnats:\n  urls: [NATSURL]\n' > /tmp/gatehouse-demo.yaml
  go run ./cmd/gatehouse usage -config /tmp/gatehouse-demo.yaml

Press Ctrl-C to stop.
`)
}
