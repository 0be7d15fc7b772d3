// Command bench is gatehouse's load harness: it starts an upstream, the baselines (a
// bare fasthttp reverse proxy, nginx when installed) and the sidecar, each as its own
// process on loopback, loads them closed-loop and open-loop in interleaved pairs, and
// writes a terminal table, results.json and a latency chart. See bench/README.md.
//
//	go run ./bench                       # the default set, under 5 minutes on 2 cores
//	go run ./bench -scenario steady -pairs 7 -duration 6s
//
// It must not import the packages under test (the sidecar is built and run as a
// separate process) and must not need anything but Go: nginx is optional.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// options are the harness's flags.
type options struct {
	Scenarios     []string      `json:"scenarios"`
	Duration      time.Duration `json:"duration"`       // closed loop, recorded, per run
	Warmup        time.Duration `json:"warmup"`         // before every closed-loop run
	OpenDuration  time.Duration `json:"open_duration"`  // open loop at -rate, per run
	OpenWarmup    time.Duration `json:"open_warmup"`    // before every open-loop run
	SweepDuration time.Duration `json:"sweep_duration"` // open loop at each of -rates
	Conns         int           `json:"conns"`
	Rate          float64       `json:"rate"`
	Rates         []float64     `json:"rates"`
	Pairs         int           `json:"pairs"`
	Control       bool          `json:"control"`
	Customers     int           `json:"customers"`
	ExhaustCusts  int           `json:"exhaust_customers"`
	CompareDur    time.Duration `json:"compare_duration"` // churn's and fleet's runs, recorded
	ChurnRate     float64       `json:"churn_rate"`
	ChurnRounds   int           `json:"churn_rounds"`
	Fleet         int           `json:"fleet"`
	FleetCusts    int           `json:"fleet_customers"`
	FleetRounds   int           `json:"fleet_rounds"`
	Outage        time.Duration `json:"outage"`
	OutageRate    float64       `json:"outage_rate"`
	UsageRate     float64       `json:"usage_rate"`
	MaxNoise      float64       `json:"max_noise"`
	MaxRedo       int           `json:"max_redo"`
	QuietWait     time.Duration `json:"quiet_wait"`
	Budget        time.Duration `json:"budget"`
	Nginx         bool          `json:"nginx"`
	NginxWorkers  int           `json:"nginx_workers"`
	GenProcs      int           `json:"generator_gomaxprocs"`
	ProxyProcs    int           `json:"proxy_gomaxprocs"`
	UpstreamProcs int           `json:"upstream_gomaxprocs"`
	Out           string        `json:"out"`
	Gatehouse     string        `json:"gatehouse_binary,omitempty"`
	Usage         bool          `json:"usage"`
	SidecarExtra  string        `json:"sidecar_extra,omitempty"`
	Profile       bool          `json:"profile"`
	SlowLog       string        `json:"slow_log,omitempty"`
	SlowOver      time.Duration `json:"slow_over,omitempty"`
	Serve         bool          `json:"-"`
	Quiet         bool          `json:"-"`
}

func defaultScenarios() []string { return []string{"steady", "exhaust", "churn", "fleet", "outage"} }

func parseOptions(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	scen := fs.String("scenario", "all", "comma-separated scenarios: steady, exhaust, churn, fleet, outage, usage; all: every one but usage")
	rates := fs.String("rates", "2000,10000", "open-loop rates for the latency-against-load chart, besides -rate (empty: none)")
	fs.DurationVar(&o.Duration, "duration", 4*time.Second, "recorded time of each closed-loop run")
	fs.StringVar(&o.SlowLog, "slow-log", "", "write every recorded open-loop request slower than -slow-over to this file: intended send time (unix µs), latency (µs), target and run, one per line: whether slow requests come in bursts, and when (the sidecar's usage flush interval is 5 s by default)")
	fs.DurationVar(&o.SlowOver, "slow-over", 1500*time.Microsecond, "see -slow-log")
	fs.DurationVar(&o.Warmup, "warmup", time.Second, "unrecorded warm-up before each closed-loop run")
	fs.DurationVar(&o.OpenDuration, "open-duration", 3*time.Second, "recorded time of each open-loop run at -rate; at least the sidecar's usage.flush_interval (5 s by default) when it publishes usage, so that every run holds one of its cuts")
	fs.DurationVar(&o.OpenWarmup, "open-warmup", 500*time.Millisecond, "unrecorded warm-up before each open-loop run")
	fs.DurationVar(&o.SweepDuration, "sweep-duration", 3*time.Second, "recorded time of each open-loop run at -rates")
	fs.IntVar(&o.Conns, "conns", 64, "connections (closed loop: each sends as fast as answered; open loop: the pool)")
	fs.Float64Var(&o.Rate, "rate", 5000, "open-loop rate (requests/s) of the latency pairs")
	fs.IntVar(&o.Pairs, "pairs", 5, "adjacent (sidecar, bare proxy) pairs per comparison (5 or more: the median of per-pair ratios needs them on a noisy machine)")
	fs.BoolVar(&o.Control, "control", true, "measure one bare-vs-bare control pair (the noise floor)")
	fs.IntVar(&o.Customers, "customers", 10000, "customers in steady")
	fs.IntVar(&o.ExhaustCusts, "exhaust-customers", 200, "customers in exhaust (and in fleet's exhaust phase), each with its own hard limit")
	fs.DurationVar(&o.CompareDur, "compare-duration", 2*time.Second, "recorded time of each run of churn's and fleet's comparisons (closed and open loop; warm-ups as -warmup and -open-warmup)")
	fs.Float64Var(&o.ChurnRate, "churn-rate", 100, "churn: entitlement snapshots pushed per second during the churn runs")
	fs.IntVar(&o.ChurnRounds, "churn-rounds", 2, "churn: closed-loop (no churn, churn) rounds, and open-loop pairs at -rate")
	fs.IntVar(&o.Fleet, "fleet", 4, "fleet: sidecars sharing one NATS")
	fs.IntVar(&o.FleetCusts, "fleet-customers", 2000, "fleet: customers far from their limits, for the throughput rounds")
	fs.IntVar(&o.FleetRounds, "fleet-rounds", 2, "fleet: closed-loop (one sidecar, the fleet) rounds")
	fs.DurationVar(&o.Outage, "outage", 5*time.Second, "outage: how long NATS stays down")
	fs.Float64Var(&o.OutageRate, "outage-rate", 2000, "outage: open-loop rate (requests/s) while NATS goes away and comes back")
	fs.Float64Var(&o.UsageRate, "usage-rate", 20000, "usage: the open-loop rate (requests/s) at which the usage-on sidecar's Badger writes and publishes are read besides the closed loop")
	fs.Float64Var(&o.MaxNoise, "max-noise", 0.10, "redo a pair when another process or the hypervisor took more than this share of the machine")
	fs.IntVar(&o.MaxRedo, "max-redo", 2, "redone pairs allowed per comparison")
	fs.DurationVar(&o.Budget, "budget", 4*time.Minute+45*time.Second, "redos and waits for quiet stop when the run would take longer than this")
	fs.DurationVar(&o.QuietWait, "quiet-wait", 30*time.Second, "longest total wait, over the run, for other processes to leave the machine alone")
	fs.BoolVar(&o.Nginx, "nginx", true, "measure nginx as a baseline when it is installed")
	fs.IntVar(&o.NginxWorkers, "nginx-workers", 0, "nginx worker_processes (0: one per core, like the Go proxies' GOMAXPROCS)")
	fs.IntVar(&o.GenProcs, "gen-procs", 1, "GOMAXPROCS of the load generator (this process)")
	fs.IntVar(&o.ProxyProcs, "proxy-procs", 0, "GOMAXPROCS of the sidecar and the bare proxy (0: all cores)")
	fs.IntVar(&o.UpstreamProcs, "upstream-procs", 1, "GOMAXPROCS of the upstream")
	fs.StringVar(&o.Out, "out", "", "results folder (default bench/results/<UTC time> in the module)")
	fs.StringVar(&o.Gatehouse, "gatehouse", "", "a gatehouse binary to test instead of building ./cmd/gatehouse")
	fs.BoolVar(&o.Usage, "usage", true, "run the sidecar with usage accounting (usage.enabled); false measures what accounting costs")
	fs.StringVar(&o.SidecarExtra, "sidecar-extra", "", "YAML appended to the sidecar's configuration, e.g. 'quota: {enabled: false}' (top-level keys the harness does not write)")
	fs.BoolVar(&o.Profile, "profile", false, "steady: one more closed-loop run of the sidecar and of the bare proxy under perf record; where their CPU goes")
	fs.BoolVar(&o.Serve, "serve", false, "start steady's targets, print their addresses and wrk commands, and wait for Ctrl-C")
	fs.BoolVar(&o.Quiet, "q", false, "no progress lines")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if *scen == "all" || *scen == "" {
		o.Scenarios = defaultScenarios()
	} else {
		o.Scenarios = strings.Split(*scen, ",")
	}
	for _, f := range strings.Split(*rates, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		r, err := strconv.ParseFloat(f, 64)
		if err != nil || r <= 0 {
			return nil, fmt.Errorf("-rates: bad rate %q", f)
		}
		o.Rates = append(o.Rates, r)
	}
	switch {
	case o.Conns < 1:
		return nil, fmt.Errorf("-conns must be >= 1")
	case o.Pairs < 1:
		return nil, fmt.Errorf("-pairs must be >= 1")
	case o.Rate <= 0:
		return nil, fmt.Errorf("-rate must be > 0")
	case o.Customers < 1 || o.ExhaustCusts < 1:
		return nil, fmt.Errorf("-customers and -exhaust-customers must be >= 1")
	case o.ChurnRate <= 0 || o.ChurnRounds < 1 || o.CompareDur <= 0:
		return nil, fmt.Errorf("-churn-rate and -compare-duration must be > 0, -churn-rounds >= 1")
	case o.Fleet < 2 || o.FleetRounds < 1 || o.FleetCusts < 1:
		return nil, fmt.Errorf("-fleet must be >= 2, -fleet-rounds and -fleet-customers >= 1")
	case o.Outage <= 0 || o.OutageRate <= 0:
		return nil, fmt.Errorf("-outage and -outage-rate must be > 0")
	case o.UsageRate <= 0:
		return nil, fmt.Errorf("-usage-rate must be > 0")
	}
	return o, nil
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	opts, err := parseOptions(os.Args[1:], os.Stderr)
	if err != nil {
		stop()
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "bench:", err)
		}
		os.Exit(2)
	}
	if opts.Serve {
		err := serveOnly(ctx, opts, os.Stdout)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	res, err := run(ctx, opts, os.Stdout)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	if !res.Pass {
		os.Exit(1) // a check failed; the summary says which
	}
}
