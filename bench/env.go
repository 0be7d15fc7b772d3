package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// env is what scenarios share: the built binaries, the upstream, the CPU monitor, the
// machine description, and the progress log.
type env struct {
	o        *options
	w        io.Writer
	start    time.Time
	root     string // module root
	tmp      string // binaries, configs, logs, data dirs
	out      string // results folder
	bin      struct{ gatehouse, benchsrv, natssrv string }
	caps     map[string]bool // what this build of serve supports (capNATS, ...)
	capsFrom string          // how caps were found
	machine  machineInfo
	mon      *cpuMonitor
	up       *proc      // the upstream every target forwards to
	nginx    string     // nginx binary, "" when not installed or not wanted
	nginxNo  string     // why nginx is not measured
	procsMu  sync.Mutex // guards procs: the outage scenario restarts NATS during a run
	procs    []*proc
	waited   time.Duration // spent in waitQuiet so far
	slack    time.Duration // -budget minus the planned run: what redos and waits may take
	// admitted counts each tracked sidecar's 2xx answers per request template (track).
	admitted map[*proc][]atomic.Int64
	slow     *slowLog // -slow-log, or nil
}

// machineInfo is recorded with every result.
type machineInfo struct {
	Cores      int    `json:"cores"`
	CPUModel   string `json:"cpu_model"`
	GoVersion  string `json:"go_version"`
	Kernel     string `json:"kernel"`
	OSArch     string `json:"os_arch"`
	Hostname   string `json:"hostname"`
	MemTotal   string `json:"mem_total"`
	Gatehouse  string `json:"gatehouse_version"`
	Commit     string `json:"commit"`
	Tree       string `json:"working_tree,omitempty"`
	Nginx      string `json:"nginx_version,omitempty"`
	Generator  string `json:"generator_gomaxprocs"`
	ProxyProcs string `json:"proxy_gomaxprocs"`
}

func newEnv(ctx context.Context, o *options, w io.Writer) (*env, error) {
	e := &env{o: o, w: w, start: time.Now(), mon: newCPUMonitor(), caps: map[string]bool{}, admitted: map[*proc][]atomic.Int64{}}
	if o.SlowLog != "" {
		f, err := os.Create(o.SlowLog)
		if err != nil {
			return nil, fmt.Errorf("-slow-log: %w", err)
		}
		e.slow = &slowLog{f: bufio.NewWriter(f), c: f, over: o.SlowOver}
	}
	gomod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil || strings.TrimSpace(string(gomod)) == "" || strings.TrimSpace(string(gomod)) == os.DevNull {
		return nil, fmt.Errorf("find the module root (run from inside the gatehouse module): %v", err)
	}
	e.root = filepath.Dir(strings.TrimSpace(string(gomod)))
	if e.tmp, err = os.MkdirTemp("", "gatehouse-bench-"); err != nil {
		return nil, err
	}
	e.out = o.Out
	if e.out == "" {
		e.out = filepath.Join(e.root, "bench", "results", time.Now().UTC().Format("20060102-150405"))
	}
	if !o.Serve { // -serve writes no results
		if err := os.MkdirAll(e.out, 0o755); err != nil {
			e.close()
			return nil, err
		}
	}
	if err := e.build(ctx); err != nil {
		e.close()
		return nil, err
	}
	e.readCaps()
	e.findNginx()
	e.machine = describeMachine(e)
	addr, err := freeAddr()
	if err != nil {
		e.close()
		return nil, err
	}
	if e.up, err = e.startProc(ctx, "upstream", addr, o.UpstreamProcs, e.bin.benchsrv, "-role", "upstream", "-listen", addr); err != nil {
		e.close()
		return nil, err
	}
	return e, nil
}

// build compiles the sidecar and the helpers in parallel (the build cache makes the
// second run quick).
func (e *env) build(ctx context.Context) error {
	e.bin.benchsrv = filepath.Join(e.tmp, "benchsrv")
	e.bin.natssrv = filepath.Join(e.tmp, "natssrv")
	e.bin.gatehouse = e.o.Gatehouse
	jobs := [][]string{{"-o", e.bin.benchsrv, "./bench/internal/benchsrv"}, {"-o", e.bin.natssrv, "./bench/internal/natssrv"}}
	if e.bin.gatehouse == "" {
		e.bin.gatehouse = filepath.Join(e.tmp, "gatehouse")
		jobs = append(jobs, []string{"-o", e.bin.gatehouse, "./cmd/gatehouse"})
	}
	e.logf("building %s", strings.Join(func() (s []string) {
		for _, j := range jobs {
			s = append(s, j[2])
		}
		return s
	}(), " and "))
	errs := make([]error, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := exec.CommandContext(ctx, "go", append([]string{"build"}, j...)...)
			cmd.Dir = e.root
			if out, err := cmd.CombinedOutput(); err != nil {
				errs[i] = fmt.Errorf("go build %s: %v\n%s", j[2], err, out)
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// readCaps finds what this build of `gatehouse serve` supports. The capability line of
// `gatehouse version` ("capabilities: nats usage-outbox fleet-quota") is authoritative
// when present. Without it (a build from before the line), the harness probes the strict
// configuration decoder, which rejects unknown keys: a build that accepts usage.enabled
// runs the usage outbox, and so the replica on NATS; one that accepts quota.enabled takes
// fleet leases.
func (e *env) readCaps() {
	out, err := exec.Command(e.bin.gatehouse, "version").Output()
	if err != nil {
		return
	}
	version, caps, ok := parseVersion(string(out))
	e.machine.Gatehouse = version
	if ok {
		e.capsFrom = "gatehouse version"
		for _, c := range caps {
			e.caps[c] = true
		}
		return
	}
	knows := func(section string) bool {
		probe := filepath.Join(e.tmp, "probe.yaml")
		cfg := "upstream: {url: \"http://127.0.0.1:1\"}\n" + section + ": {enabled: true}\n"
		return os.WriteFile(probe, []byte(cfg), 0o644) == nil &&
			exec.Command(e.bin.gatehouse, "check-config", "-config", probe).Run() == nil
	}
	if knows("usage") {
		e.caps[capNATS], e.caps[capUsage] = true, true
		e.capsFrom = "probe: check-config accepts usage.enabled"
	}
	if e.caps[capNATS] && knows("quota") {
		e.caps[capFleet] = true
		e.capsFrom += ", quota.enabled"
	}
}

// parseVersion splits the output of `gatehouse version` into its first line and the
// capabilities its "capabilities:" line lists; ok is false when it has no such line.
func parseVersion(out string) (version string, caps []string, ok bool) {
	version = strings.TrimSpace(strings.SplitN(out, "\n", 2)[0])
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if rest, found := strings.CutPrefix(strings.TrimSpace(sc.Text()), "capabilities:"); found {
			caps, ok = append(caps, strings.Fields(rest)...), true
		}
	}
	return version, caps, ok
}

func (e *env) findNginx() {
	if !e.o.Nginx {
		e.nginxNo = "not measured: -nginx=false"
		return
	}
	if p, err := exec.LookPath("nginx"); err == nil {
		e.nginx = p
		return
	}
	for _, p := range []string{"/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"} {
		if _, err := os.Stat(p); err == nil {
			e.nginx = p
			return
		}
	}
	e.nginxNo = "not measured: nginx is not installed"
}

// startProc starts a helper or sidecar binary with GOMAXPROCS procs (0: the default)
// and registers it with the CPU monitor.
func (e *env) startProc(ctx context.Context, name, addr string, procs int, argv ...string) (*proc, error) {
	var env []string
	if procs > 0 {
		env = append(env, "GOMAXPROCS="+strconv.Itoa(procs))
	}
	p, err := startProc(ctx, e.tmp, name, addr, env, argv...)
	if err != nil {
		return nil, err
	}
	e.mon.add(p)
	e.procsMu.Lock()
	e.procs = append(e.procs, p)
	e.procsMu.Unlock()
	return p, nil
}

// stopProc stops p and forgets it.
func (e *env) stopProc(p *proc) {
	if p == nil {
		return
	}
	p.stop()
	e.mon.remove(p)
	if p.natsProc != nil {
		e.stopProc(p.natsProc)
	}
}

// startSidecar writes a configuration for snaps and runs `gatehouse serve` on it, with
// its own data directory and its own NATS server (a natssrv process on a free port, as
// production runs NATS apart from the sidecar: its JetStream work does not share the
// sidecar's Go runtime), then waits until its admin /readyz says the entitlements are in.
func (e *env) startSidecar(ctx context.Context, name string, snaps []snapshotDoc) (*proc, error) {
	return e.startSidecarWith(ctx, name, snaps, nil)
}

// startSidecarWith is startSidecar with NATS at natsURLs instead of a server of its own
// (nil: its own). With no snaps the sidecar has no entitlements file and takes what the
// bucket holds.
func (e *env) startSidecarWith(ctx context.Context, name string, snaps []snapshotDoc, natsURLs []string) (*proc, error) {
	return e.launchSidecar(ctx, name, snaps, natsURLs, e.o.Usage)
}

// launchSidecar is startSidecarWith with usage accounting on or off regardless of
// -usage (the usage scenario runs one of each).
func (e *env) launchSidecar(ctx context.Context, name string, snaps []snapshotDoc, natsURLs []string, usage bool) (*proc, error) {
	dir := filepath.Join(e.tmp, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	snapPath := ""
	if len(snaps) > 0 {
		snapPath = filepath.Join(dir, "entitlements.ndjson")
		if err := writeSnapshots(snapPath, snaps); err != nil {
			return nil, err
		}
	}
	var addrs [3]string // proxy, admin, its NATS server
	for i := range addrs {
		a, err := freeAddr()
		if err != nil {
			return nil, err
		}
		addrs[i] = a
	}
	var ns *proc
	natsAddr := ""
	if e.caps[capNATS] && len(natsURLs) == 0 {
		natsAddr = addrs[2]
		store := filepath.Join(dir, "nats")
		var err error
		if ns, err = e.startProc(ctx, name+"-nats", natsAddr, 0, e.bin.natssrv, "-listen", natsAddr, "-store", store); err != nil {
			return nil, err
		}
		natsURLs = []string{"nats://" + natsAddr}
	}
	cfgPath := filepath.Join(dir, "gatehouse.yaml")
	cfg := sidecarConfig(sidecarSpec{
		listen: addrs[0], admin: addrs[1], upstream: e.up.addr, dataDir: filepath.Join(dir, "data"), snapshots: snapPath,
		natsURLs: natsURLs, usageOff: !usage && e.caps[capUsage],
	})
	if e.o.SidecarExtra != "" {
		cfg += "# -sidecar-extra\n" + e.o.SidecarExtra + "\n"
	}
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	started := time.Now()
	p, err := e.startProc(ctx, name, addrs[0], e.o.ProxyProcs, e.bin.gatehouse, "serve", "-config", cfgPath)
	if err != nil {
		e.stopProc(ns)
		return nil, err
	}
	p.admin, p.config, p.nats, p.natsProc, p.usageOff = addrs[1], cfgPath, natsAddr, ns, !usage
	if err := waitHTTP(ctx, p, "http://"+p.admin+"/readyz", time.Minute); err != nil {
		e.stopProc(p)
		return nil, err
	}
	how := fmt.Sprintf("%d customers", len(snaps))
	if len(snaps) == 0 {
		how = "customers from the bucket"
	}
	if len(natsURLs) > 0 {
		how += ", NATS at " + strings.Join(natsURLs, ",")
	}
	if !usage {
		how += ", usage accounting off"
	}
	e.logf("%s: ready in %s (%s)", name, time.Since(started).Round(10*time.Millisecond), how)
	return p, nil
}

// waitHTTP polls url until it answers 200.
func waitHTTP(ctx context.Context, p *proc, url string, limit time.Duration) error {
	c := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(limit)
	last := ""
	for time.Now().Before(deadline) {
		resp, err := c.Get(url)
		if err == nil {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, strings.TrimSpace(string(b)))
		} else {
			last = err.Error()
		}
		if !p.alive() {
			return fmt.Errorf("%s exited before it was ready; log %s:\n%s", p.name, p.log, tail(p.log))
		}
		sleepCtx(ctx, 50*time.Millisecond)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return fmt.Errorf("%s not ready after %s (%s); log %s", p.name, limit, last, p.log)
}

// startBare starts a bare fasthttp reverse proxy in front of the upstream.
func (e *env) startBare(ctx context.Context, name string) (*proc, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	return e.startProc(ctx, name, addr, e.o.ProxyProcs, e.bin.benchsrv, "-role", "bare", "-listen", addr, "-upstream", e.up.addr)
}

func (e *env) close() {
	if e.slow != nil {
		if err := e.slow.close(); err != nil {
			e.logf("-slow-log: %v", err)
		}
	}
	e.procsMu.Lock()
	defer e.procsMu.Unlock()
	for i := len(e.procs) - 1; i >= 0; i-- {
		e.procs[i].stop()
	}
	if e.tmp != "" {
		os.RemoveAll(e.tmp)
	}
}

// waitQuiet waits until other processes leave the machine alone (less than -max-noise
// over a 300 ms probe), for at most -quiet-wait over the whole run, so that a pair is
// not measured while, say, a compiler runs next to it.
func (e *env) waitQuiet(ctx context.Context, label string) {
	const probe = 300 * time.Millisecond
	for first := true; e.waited < e.o.QuietWait && ctx.Err() == nil && e.spend(probe); first = false {
		a := e.mon.sample()
		sleepCtx(ctx, probe)
		u := usage(a, e.mon.sample(), "")
		e.waited += probe
		if u.noise() <= e.o.MaxNoise {
			return
		}
		if first {
			e.logf("%s: other processes are using %.0f%% of the machine; waiting for quiet (up to %s left)",
				label, 100*u.noise(), (e.o.QuietWait - e.waited).Round(time.Second))
		}
	}
}

// spend takes d from the slack for a redo or a wait, if there is that much left.
func (e *env) spend(d time.Duration) bool {
	if e.slack < d {
		return false
	}
	e.slack -= d
	return true
}

// logf prints a progress line with the time since start.
func (e *env) logf(format string, args ...any) {
	if e.o.Quiet {
		return
	}
	el := time.Since(e.start).Round(time.Second)
	fmt.Fprintf(e.w, "[%6s] %s\n", el, fmt.Sprintf(format, args...))
}

func describeMachine(e *env) machineInfo {
	m := e.machine
	m.Cores = runtime.NumCPU()
	m.OSArch = runtime.GOOS + "/" + runtime.GOARCH
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if l, _, ok := strings.Cut(string(b), "\n"); ok {
			m.MemTotal = strings.Join(strings.Fields(l)[1:], " ")
		}
	}
	m.Hostname, _ = os.Hostname()
	if out, err := exec.Command("go", "env", "GOVERSION").Output(); err == nil {
		m.GoVersion = strings.TrimSpace(string(out))
	}
	if out, err := exec.Command("git", "-C", e.root, "describe", "--always", "--dirty").Output(); err == nil {
		m.Commit = strings.TrimSpace(string(out))
	}
	// Others work in the same tree: say which changes the measured binary had.
	if st, err := exec.Command("git", "-C", e.root, "status", "--porcelain").Output(); err == nil && len(st) > 0 {
		diff, _ := exec.Command("git", "-C", e.root, "diff", "HEAD").Output()
		sum := sha256.Sum256(diff)
		m.Tree = fmt.Sprintf("%d paths changed or untracked; sha256 of git diff HEAD %x", len(strings.Split(strings.TrimSpace(string(st)), "\n")), sum[:6])
	}
	if e.nginx != "" {
		if out, err := exec.Command(e.nginx, "-v").CombinedOutput(); err == nil {
			m.Nginx = strings.TrimSpace(string(out))
		}
	}
	m.Generator = strconv.Itoa(e.o.GenProcs)
	m.ProxyProcs = "default (" + strconv.Itoa(m.Cores) + ")"
	if e.o.ProxyProcs > 0 {
		m.ProxyProcs = strconv.Itoa(e.o.ProxyProcs)
	}
	return m
}
