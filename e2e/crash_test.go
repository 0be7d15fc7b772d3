package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/sync/usage"
)

// buildGatehouse builds ./cmd/gatehouse into a temporary directory, once per test run,
// with the race detector when the tests run with it (the build then reuses the test
// binary's compiled packages, and the sidecar's own races are caught).
func buildGatehouse(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "gatehouse-e2e-")
		if err != nil {
			buildErr = err
			return
		}
		buildBin = filepath.Join(dir, "gatehouse")
		args := []string{"build", "-o", buildBin}
		if raceEnabled {
			args = append(args, "-race")
		}
		args = append(args, "github.com/gatehouse-dev/gatehouse/cmd/gatehouse")
		out, err := exec.Command("go", args...).CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildBin
}

var (
	buildOnce sync.Once
	buildBin  string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildBin != "" {
		os.RemoveAll(filepath.Dir(buildBin))
	}
	os.Exit(code)
}

// gatehouseProc is a `gatehouse serve` process, started again on the same
// configuration (and so the same data directory and ports) after each kill.
type gatehouseProc struct {
	bin, config, admin string
	logs               *os.File // stderr of every run, appended
	cmd                *exec.Cmd
	exited             chan struct{}
	runs               int
}

func (p *gatehouseProc) start(t *testing.T) {
	t.Helper()
	p.runs++
	fmt.Fprintf(p.logs, "=== run %d\n", p.runs)
	cmd := exec.Command(p.bin, "serve", "-config", p.config)
	cmd.Stdout, cmd.Stderr = p.logs, p.logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start gatehouse: %v", err)
	}
	p.cmd, p.exited = cmd, make(chan struct{})
	go func() {
		cmd.Wait()
		close(p.exited)
	}()
}

// waitReady waits until the admin listener answers /readyz with 200: the proxy serves
// and the replica holds the entitlements.
func (p *gatehouseProc) waitReady(t *testing.T) {
	t.Helper()
	hc := &http.Client{Timeout: 2 * time.Second}
	eventually(t, 60*time.Second, fmt.Sprintf("gatehouse run %d ready", p.runs), func() bool {
		select {
		case <-p.exited:
			t.Fatalf("gatehouse run %d exited early: %v\n%s", p.runs, p.cmd.ProcessState, p.logTail())
		default:
		}
		resp, err := hc.Get("http://" + p.admin + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

// stop sends sig to the process and waits for it to exit.
func (p *gatehouseProc) stop(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v to gatehouse run %d: %v\n%s", sig, p.runs, err, p.logTail())
	}
	select {
	case <-p.exited:
	case <-time.After(60 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
		t.Fatalf("gatehouse did not exit within 60s of %v\n%s", sig, p.logTail())
	}
}

func (p *gatehouseProc) logText() string {
	data, _ := os.ReadFile(p.logs.Name())
	return string(data)
}

func (p *gatehouseProc) logTail() string {
	s := p.logText()
	if len(s) > 20000 {
		s = "…" + s[len(s)-20000:]
	}
	return s
}

// crashLoad is the clients of the crash test. Each counts per (customer, feature) the
// units of the requests it saw answered 2xx, and apart those of requests that were sent
// (a connection was obtained) but got no answer: cut off by a kill, they may or may not
// have been counted. A request that got no connection (the sidecar was down) reached no
// sidecar and is retried without being counted.
//
// Hard limits take fleet leases from NATS (DESIGN.md section 6); a request whose
// sidecar's lease is spent and whose refill does not come in time is refused with 503
// quota_unavailable, counted apart (not an error, and not usage).
//
// Customers whose hard limit binds (hard) may be refused with 429; each such refusal is
// tagged with the run that was current when its request was sent: a request sent after
// run r started reached no earlier run, whose process was dead by then.
type crashLoad struct {
	stopCh  chan struct{}
	wg      sync.WaitGroup
	seenReq atomic.Int64 // requests answered 2xx
	run     atomic.Int64 // the gatehouse run that the clients send to now

	mu         sync.Mutex // protects the maps
	seen       ledger
	unknown    ledger
	unexpected map[string]int // other answers: status and reason
	cut        int            // requests cut off
	unsent     int            // requests that found no sidecar listening
	refused    int            // 429s of hard customers
	refusedRun map[string]int64
	quota      int // 503 quota_unavailable: a hard limit's lease spent and its refill late
}

func startCrashLoad(base string, cs []customer, hard map[string]bool, clients int) *crashLoad {
	l := &crashLoad{stopCh: make(chan struct{}), seen: ledger{}, unknown: ledger{}, unexpected: map[string]int{},
		refusedRun: map[string]int64{}}
	tr := &http.Transport{MaxIdleConnsPerHost: clients, DisableCompression: true}
	hc := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	for i := range clients {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), uint64(time.Now().UnixNano())))
			for {
				select {
				case <-l.stopCh:
					return
				default:
				}
				r := randomReq(rng, cs)
				run := l.run.Load()
				res := do(hc, base, r)
				l.mu.Lock()
				switch {
				case res.err == nil && res.status/100 == 2:
					l.seen.add(r)
				case res.err == nil && res.status == 429 && res.reason == "usage_limit_exceeded" &&
					hard[r.customer] && r.costs[0].feature == fCalls:
					l.refused++
					l.refusedRun[r.customer] = max(l.refusedRun[r.customer], run)
				case quotaRefusal(cs, r, res):
					l.quota++
				case res.err == nil:
					l.unexpected[fmt.Sprintf("%d %s", res.status, res.reason)]++
				case res.sent:
					l.unknown.add(r)
					l.cut++
				default:
					l.unsent++
				}
				l.mu.Unlock()
				if res.err == nil && res.status/100 == 2 {
					l.seenReq.Add(1)
				} else if res.err != nil && !res.sent {
					time.Sleep(5 * time.Millisecond) // nobody listens: wait for the restart
				}
			}
		}()
	}
	return l
}

func (l *crashLoad) stop() {
	close(l.stopCh)
	l.wg.Wait()
}

// seenOf returns the units seen for a (customer, feature).
func (l *crashLoad) seenOf(k ckey) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seen[k]
}

// TestUsageSurvivesSIGKILL runs the gatehouse binary under steady load from concurrent
// clients, kills it with SIGKILL at random moments and starts it again on the same data
// directory, then stops it gracefully and compares the usage published to
// GATEHOUSE_USAGE with what the clients saw: for every (customer, feature, window),
// seen <= published <= seen + unknown, where unknown is the usage of the requests cut
// off by a kill (DESIGN.md section 7: a client that saw a response was counted, a
// request cut off by a crash may go either way, and nothing is counted twice).
func TestUsageSurvivesSIGKILL(t *testing.T) {
	const (
		kills     = 8
		clients   = 16
		hardLimit = 300
	)
	bin := buildGatehouse(t)
	n := testutil.StartNATS(t)
	upstream := testutil.Echo(t)
	dir := t.TempDir()
	w := newWindows(time.Now())
	cs := []customer{
		{id: "cust_a", callsLimit: 1 << 40, softLimit: 40, beta: true},
		{id: "cust_b", callsLimit: 1 << 40, softLimit: 60, beta: true},
		{id: "cust_c", callsLimit: 1 << 40, softLimit: 80, beta: true},
		// A hard limit that binds during the kills: never over-admitted across them.
		{id: "cust_h", callsLimit: hardLimit, softLimit: 1 << 20, beta: true},
	}
	hard := map[string]bool{"cust_h": true}
	var docs []json.RawMessage
	for _, c := range cs {
		d, err := json.Marshal(w.doc(c))
		if err != nil {
			t.Fatal(err)
		}
		docs = append(docs, d)
	}
	snapFile, _ := json.MarshalIndent(docs, "", "  ")
	listen, admin := testutil.FreeAddr(t), testutil.FreeAddr(t)
	// A 10ms flush interval keeps a publish in flight much of the time, so that some
	// kills fall between JetStream storing a message and the sidecar recording its
	// acknowledgement (the run after finds it stored: counted in the report).
	cfg := fmt.Sprintf(`
listen: %s
admin_listen: %s
upstream: {url: "http://%s", timeout: 10s}
data_dir: %q
nats: {urls: [%q], ping_interval: 500ms}
entitlements: {file: %q}
usage: {flush_interval: 10ms}
server: {shutdown_timeout: 30s}
log: {level: info}
%s`, listen, admin, upstream, filepath.Join(dir, "data"), n.URL(),
		writeFile(t, dir, "entitlements.json", snapFile), routesYAML)
	cfgPath := writeFile(t, dir, "gatehouse.yaml", []byte(cfg))
	logs, err := os.Create(filepath.Join(dir, "gatehouse.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logs.Close()
	p := &gatehouseProc{bin: bin, config: cfgPath, admin: admin, logs: logs}
	t.Cleanup(func() {
		if p.cmd != nil {
			p.cmd.Process.Kill() // an error only says it has exited already
			<-p.exited
		}
		if t.Failed() {
			t.Logf("gatehouse logs:\n%s", p.logTail())
		}
	})

	p.start(t)
	p.waitReady(t)
	load := startCrashLoad("http://"+listen, cs, hard, clients)
	load.run.Store(int64(p.runs))
	defer func() {
		select {
		case <-load.stopCh:
		default:
			load.stop()
		}
	}()

	// Let every soft limit be crossed before the first kill. Overage is computed per
	// request when it commits, from the in-memory counter, which may already hold
	// commits of concurrent requests that a kill then loses before they reach the usage
	// log: a kill at the very crossing could leave published overage != quantity - limit.
	eventually(t, 60*time.Second, "every soft limit crossed", func() bool {
		for _, c := range cs {
			if !hard[c.id] && load.seenOf(ckey{c.id, fExports}) < c.softLimit+20 {
				return false
			}
		}
		return true
	})
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 42))
	earlyKills := 0
	for k := range kills {
		// Random-ish moments: after some progress of this run, then a random pause, so
		// that kills fall in appends, cuts, publishes and acknowledgements.
		target := load.seenReq.Load() + 20 + rng.Int64N(400)
		eventually(t, 60*time.Second, fmt.Sprintf("progress before kill %d", k+1), func() bool {
			return load.seenReq.Load() >= target
		})
		time.Sleep(time.Duration(rng.Int64N(int64(150 * time.Millisecond))))
		p.stop(t, syscall.SIGKILL)
		p.start(t)
		load.run.Store(int64(p.runs))
		if k%3 == 1 {
			// Also kill a run while it starts: opening Badger, restoring the
			// counters, loading the outbox, pushing the seed.
			time.Sleep(time.Duration(rng.Int64N(int64(300 * time.Millisecond))))
			p.stop(t, syscall.SIGKILL)
			earlyKills++
			p.start(t)
			load.run.Store(int64(p.runs))
		}
		p.waitReady(t)
	}
	target := load.seenReq.Load() + 200
	eventually(t, 60*time.Second, "progress after the last restart", func() bool { return load.seenReq.Load() >= target })
	// A graceful stop under load: requests in flight finish, the outbox drains.
	p.stop(t, syscall.SIGTERM)
	load.stop()
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("gatehouse exited with %d after SIGTERM\n%s", code, p.logTail())
	}

	got := published(t, connectJS(t, n.URL()))
	// `gatehouse usage -json` must report the same totals.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "usage", "-config", cfgPath, "-json")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("gatehouse usage: %v\n%s", err, stderr.String())
	}
	var cli []usage.Total
	if err := json.Unmarshal(stdout.Bytes(), &cli); err != nil {
		t.Fatalf("gatehouse usage -json: %v\n%s", err, stdout.String())
	}
	if fromCLI := totalsByKey(t, cli); !totalsEqual(fromCLI, got) {
		t.Errorf("gatehouse usage -json disagrees with the stream:\n%v\n%v", fromCLI, got)
	}

	load.mu.Lock()
	defer load.mu.Unlock()
	if len(load.unexpected) > 0 {
		t.Errorf("answers other than 2xx: %v", load.unexpected)
	}
	keys := map[ckey]bool{}
	for k := range load.seen {
		keys[k] = true
	}
	// The hard limit: never over-admitted; and once the last run refused, the limit was
	// used in full: every request in flight then finished before the graceful stop, and
	// a sidecar restarted on its data directory keeps its fleet lease (sync/quota: it
	// restores its saved grant and reconciles with its entry in the bucket), so the
	// kills lose no quota.
	hk := ckey{"cust_h", fCalls}
	if q := got[tkey{hk.customer, hk.feature, w.of(fCalls)}].Quantity; q > hardLimit || load.seen[hk] > hardLimit {
		t.Errorf("%s: seen %d, published %d, over the hard limit %d", hk, load.seen[hk], q, hardLimit)
	} else if load.refusedRun[hk.customer] == int64(p.runs) && q != hardLimit {
		t.Errorf("%s: the last run refused at the hard limit %d, yet %d was published", hk, hardLimit, q)
	}
	for k := range load.unknown {
		keys[k] = true
	}
	sorted := make([]ckey, 0, len(keys))
	for k := range keys {
		sorted = append(sorted, k)
	}
	slices.SortFunc(sorted, func(a, b ckey) int { return strings.Compare(a.String(), b.String()) })
	var seenAll, unknownAll, pubAll int64
	report := &strings.Builder{}
	fmt.Fprintf(report, "%d SIGKILLs (%d under load, %d while starting), %d runs, %d requests cut off, %d attempts found no sidecar listening, %d refused at cust_h's hard limit %d (last in run %d), %d refused quota_unavailable\n",
		kills+earlyKills, kills, earlyKills, p.runs, load.cut, load.unsent, load.refused, hardLimit, load.refusedRun["cust_h"], load.quota)
	fmt.Fprintf(report, "%-8s %-10s %-20s %8s %8s %9s %8s\n", "customer", "feature", "window", "seen", "unknown", "published", "overage")
	matched := map[tkey]bool{}
	for _, k := range sorted {
		tk := tkey{k.customer, k.feature, w.of(k.feature)}
		matched[tk] = true
		seen, unknown := load.seen[k], load.unknown[k]
		tot := got[tk]
		seenAll, unknownAll, pubAll = seenAll+seen, unknownAll+unknown, pubAll+tot.Quantity
		fmt.Fprintf(report, "%-8s %-10s %-20s %8d %8d %9d %8d\n", k.customer, k.feature,
			tk.window.Format(time.RFC3339), seen, unknown, tot.Quantity, tot.Overage)
		if tot.Quantity < seen || tot.Quantity > seen+unknown {
			t.Errorf("%s: published %d, want seen %d <= published <= seen + unknown %d", k, tot.Quantity, seen, seen+unknown)
		}
		checkOverage(t, k, tot, cs)
	}
	fmt.Fprintf(report, "%-8s %-10s %-20s %8d %8d %9d\n", "all", "", "", seenAll, unknownAll, pubAll)
	logText := p.logText()
	fmt.Fprintf(report, "restarted runs that found their last message stored but unacknowledged: %d\n",
		strings.Count(logText, "usage message was already stored"))
	t.Logf("usage across crashes:\n%s", report)
	for tk, tot := range got {
		if !matched[tk] {
			t.Errorf("published %+v, which no client sent (wrong window?)", tot)
		}
	}
	if seenAll == 0 {
		t.Fatal("no request was admitted")
	}

	for _, bad := range []string{"DATA RACE", "USAGE CONFLICT", "usage stream lost messages", "usage not durable", "panic:"} {
		if strings.Contains(logText, bad) {
			t.Errorf("gatehouse logged %q", bad)
		}
	}
}

func totalsEqual(a, b map[tkey]usage.Total) bool {
	if len(a) != len(b) {
		return false
	}
	for k, x := range a {
		y, ok := b[k]
		if !ok || x.Quantity != y.Quantity || x.Overage != y.Overage {
			return false
		}
	}
	return true
}
