// Command gatehouse is the edge entitlement sidecar. See the README for the commands.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"syscall"

	"github.com/gatehouse-dev/gatehouse/config"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	_ "time/tzdata" // billing time zones must resolve in a scratch image
)

// The main goroutine keeps the main thread to itself, so that no goroutine of the
// request path runs there and none of the background loops that lower their thread's
// priority lands there either (lowprio.ErrMainThread): ps and top show the main
// thread's nice value as the process's.
func init() { runtime.LockOSThread() }

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// capabilities are what this build of serve does, as `gatehouse version` lists them on
// its second line, so that tools (the bench harness) need not guess from the version:
// nats (the replica on an embedded or external NATS), usage-outbox (usage published to
// JetStream, read back by `gatehouse usage`), fleet-quota (hard limits through KV leases).
const capabilities = "nats usage-outbox fleet-quota"

// exitError carries the exit status of a failure: 2 for bad usage or bad config.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func usageErr(format string, args ...any) error {
	return &exitError{code: 2, err: fmt.Errorf(format, args...)}
}

const usageText = `gatehouse: edge entitlement enforcement

Usage:
  gatehouse serve -config FILE                  run the sidecar
  gatehouse demo                                run a sidecar with embedded NATS, example entitlements and an echo upstream
  gatehouse check-config -config FILE           validate a configuration file and exit
  gatehouse push -config FILE -f SNAPSHOTS      write snapshots (JSON array or NDJSON) into the entitlement bucket
  gatehouse push -config FILE -delete CUSTOMER  revoke a customer
  gatehouse usage -config FILE [-json]          print published usage per customer, feature and window
  gatehouse bridge flexprice -config FILE       sync entitlements from Flexprice and usage to it
  gatehouse version                             print the version and the capabilities of this build
`

// defaultMemoryLimit is the soft memory limit the Go runtime keeps to when GOMEMLIMIT
// is not set: a sidecar shares its pod, and without a limit the heap may grow to twice
// what is live before a collection.
const defaultMemoryLimit = 256 << 20

// defaultGCPercent is the GOGC the process runs with when GOGC is not set: a collection
// when the heap has grown to 5 times what is live (or at the memory limit, whichever
// comes first). Each collection takes CPU from the requests for tens of milliseconds on
// a small machine, which shows in the latency tail; the background work (Badger, the
// usage publisher, the embedded NATS) allocates steadily, so collecting less often is
// worth the memory, and the memory limit bounds it.
const defaultGCPercent = 400

func main() {
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(defaultMemoryLimit)
	}
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "gatehouse:", err)
		var ee *exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		os.Exit(1)
	}
}

// run dispatches a subcommand.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usageText)
		return usageErr("no command given")
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "serve":
		return cmdServe(ctx, args, stderr)
	case "demo":
		return cmdDemo(ctx, args, stdout, stderr)
	case "check-config":
		return cmdCheckConfig(args, stdout, stderr)
	case "push":
		return cmdPush(ctx, args, stdout, stderr)
	case "usage":
		return cmdUsage(ctx, args, stdout, stderr)
	case "bridge":
		return cmdBridge(ctx, args, stderr)
	case "version":
		fmt.Fprintln(stdout, "gatehouse", version)
		fmt.Fprintln(stdout, "capabilities:", capabilities)
		return nil
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usageText)
		return nil
	}
	fmt.Fprint(stderr, usageText)
	return usageErr("unknown command %q", cmd)
}

// flags returns a flag set that reports errors instead of exiting.
func flags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("gatehouse "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return &exitError{code: 2, err: err}
	}
	if fs.NArg() > 0 {
		return usageErr("unexpected arguments: %v", fs.Args())
	}
	return nil
}

// loadConfig loads a configuration file; a bad file is a usage error (exit 2).
func loadConfig(path string) (*config.Config, error) {
	if path == "" {
		return nil, usageErr("-config FILE is required")
	}
	cfg, err := config.Load(path)
	if err != nil {
		return nil, &exitError{code: 2, err: fmt.Errorf("invalid configuration:\n%w", err)}
	}
	return cfg, nil
}

func cmdCheckConfig(args []string, stdout, stderr io.Writer) error {
	fs := flags("check-config", stderr)
	path := fs.String("config", "", "configuration file")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	if cfg.Entitlements.File != "" {
		if _, err := loadSnapshots(cfg.Entitlements.File); err != nil {
			return &exitError{code: 2, err: err}
		}
	}
	fmt.Fprintf(stdout, "%s: ok (%d routes)\n", *path, len(cfg.Routes))
	return nil
}

// newLogger builds the process logger from the log section, and the access logger,
// which is not sampled and ignores log.level.
func newLogger(l config.Log, stderr io.Writer) (log, access *zap.Logger, err error) {
	level, err := zapcore.ParseLevel(l.Level)
	if err != nil {
		return nil, nil, usageErr("log.level: %v", err)
	}
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.TimeKey = "ts"
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	encCfg.EncodeDuration = zapcore.StringDurationEncoder
	var enc zapcore.Encoder
	if l.Format == "console" {
		encCfg.EncodeLevel = zapcore.CapitalColorLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	} else {
		enc = zapcore.NewJSONEncoder(encCfg)
	}
	out := zapcore.Lock(zapcore.AddSync(stderr))
	core := zapcore.NewCore(enc, out, level)
	// Sampling keeps a flood of identical hot-path messages from costing the proxy.
	core = zapcore.NewSamplerWithOptions(core, 1e9, 100, 100)
	return zap.New(core), zap.New(zapcore.NewCore(enc, out, zapcore.InfoLevel)), nil
}
