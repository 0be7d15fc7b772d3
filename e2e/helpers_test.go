package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
	_ "time/tzdata" // the snapshots' Etc/GMT zones must resolve wherever the tests run

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/sidecar"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/replica"
	"github.com/gatehouse-dev/gatehouse/sync/usage"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Features of the tests' snapshots and routes.
const (
	fCalls   = "api_calls" // metered, hard limit, MONTHLY
	fExports = "exports"   // metered, soft limit, NEVER
	fTokens  = "tokens"    // metered, unlimited, DAILY
	fBeta    = "beta"      // boolean
)

// routesYAML are the routes every sidecar of these tests serves. The chat route costs
// one api_call and X-Tokens tokens, so that one request moves two counters.
const routesYAML = `
unmatched: deny
routes:
  - {name: calls, method: POST, path: /v1/calls, features: [{feature: api_calls, cost: 1}]}
  - {name: exports, method: POST, path: /v1/exports, features: [{feature: exports, cost: 1}]}
  - {name: chat, method: POST, path: /v1/chat, features: [{feature: api_calls, cost: 1}, {feature: tokens, cost_request_header: X-Tokens}]}
  - {name: beta, method: GET, path: /v1/beta, features: [{feature: beta}]}
`

// windows are the billing section of the tests' snapshots and the window each reset
// period gives now. The billing time zone is the Etc/GMT zone in which it is about noon,
// so that no daily or monthly window boundary falls within a test run, and each
// (customer, feature) has exactly one window, known in advance.
type windows struct {
	tz          string
	periodStart time.Time // local midnight yesterday
	daily       time.Time // local midnight today
}

func newWindows(now time.Time) windows {
	offset := 12 - now.UTC().Hour() // hours east of UTC where it is about 12:00
	tz := "UTC"
	if offset != 0 {
		tz = fmt.Sprintf("Etc/GMT%+d", -offset) // POSIX sign: Etc/GMT-3 is UTC+3
	}
	loc, err := time.LoadLocation(tz)
	if err != nil {
		panic(err)
	}
	local := now.In(loc)
	today := time.Date(local.Year(), local.Month(), local.Day(), 0, 0, 0, 0, loc)
	return windows{tz: tz, periodStart: today.AddDate(0, 0, -1).UTC(), daily: today.UTC()}
}

// of is the start of the current window of a feature of the tests' snapshots.
func (w windows) of(feature string) time.Time {
	if feature == fTokens {
		return w.daily
	}
	return w.periodStart // MONTHLY from period_start, and NEVER
}

// customer is one customer of the tests' snapshots.
type customer struct {
	id         string
	callsLimit int64 // hard; negative: unlimited
	softLimit  int64 // exports
	beta       bool
}

// unlimitedCalls is a callsLimit that makes api_calls unlimited.
const unlimitedCalls = -1

// hardCalls reports whether r uses api_calls of a customer of cs whose limit is hard.
// Hard limits take fleet leases (DESIGN.md section 6): while NATS is away, a sidecar
// whose lease is spent refuses them with 503 quota_unavailable.
func hardCalls(cs []customer, r request) bool {
	for _, c := range cs {
		if c.id == r.customer && c.callsLimit >= 0 {
			for _, k := range r.costs {
				if k.feature == fCalls {
					return true
				}
			}
		}
	}
	return false
}

// quotaRefusal reports whether res is the refusal of a hard-limited request whose
// fleet quota could not be reached.
func quotaRefusal(cs []customer, r request, res result) bool {
	return res.err == nil && res.status == 503 && res.reason == "quota_unavailable" && hardCalls(cs, r)
}

func (w windows) doc(c customer) limiter.SnapshotDoc {
	updated := time.Now().UTC().Truncate(time.Second)
	beta := c.beta
	var calls *int64
	if c.callsLimit >= 0 {
		calls = &c.callsLimit
	}
	return limiter.SnapshotDoc{
		CustomerID: c.id,
		UpdatedAt:  &updated,
		Billing:    &limiter.BillingDoc{PeriodStart: w.periodStart, Interval: "MONTHLY", Timezone: w.tz},
		Features: map[string]limiter.FeatureDoc{
			fCalls:   {Type: "metered", UsageLimit: calls, UsageResetPeriod: "MONTHLY"},
			fExports: {Type: "metered", UsageLimit: &c.softLimit, IsSoftLimit: true, UsageResetPeriod: "NEVER"},
			fTokens:  {Type: "metered", UsageResetPeriod: "DAILY"},
			fBeta:    {Type: "boolean", IsEnabled: &beta},
		},
	}
}

func (w windows) snapshots(t testing.TB, cs ...customer) []*limiter.Snapshot {
	t.Helper()
	out := make([]*limiter.Snapshot, 0, len(cs))
	for _, c := range cs {
		d := w.doc(c)
		s, err := d.Snapshot()
		if err != nil {
			t.Fatalf("snapshot of %s: %v", c.id, err)
		}
		out = append(out, s)
	}
	return out
}

// softLimit returns the soft limit of a customer's exports.
func softLimit(cs []customer, id string) int64 {
	for _, c := range cs {
		if c.id == id {
			return c.softLimit
		}
	}
	panic("no customer " + id)
}

// ckey is a (customer, feature) pair.
type ckey struct{ customer, feature string }

func (k ckey) String() string { return k.customer + "/" + k.feature }

// eventually polls cond every few milliseconds until it holds, and fails the test when
// it does not within d. It is for waiting, never for asserting a duration.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// testLogger returns a logger into a buffer that the test prints (its tail) only when it
// fails: a sidecar's goroutines may still log while a test ends, which t.Log forbids.
func testLogger(t testing.TB) (*zap.Logger, *testutil.Buffer) {
	buf := &testutil.Buffer{}
	enc := zap.NewDevelopmentEncoderConfig()
	log := zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(enc), buf, zap.InfoLevel))
	t.Cleanup(func() {
		if t.Failed() {
			s := buf.String()
			if len(s) > 30000 {
				s = "…" + s[len(s)-30000:]
			}
			t.Logf("log:\n%s", s)
		}
	})
	return log, buf
}

// sidecarConfig is a sidecar on loopback ports in front of upstream, with its data in
// dataDir and NATS at natsURL (the embedded server when empty), serving routesYAML.
func sidecarConfig(t testing.TB, upstream, dataDir, natsURL, extra string) *config.Config {
	t.Helper()
	nats := `nats: {embedded_listen: "127.0.0.1:0"}`
	if natsURL != "" {
		nats = fmt.Sprintf(`nats: {urls: [%q], ping_interval: 250ms}`, natsURL)
	}
	y := fmt.Sprintf(`
listen: 127.0.0.1:0
admin_listen: ""
upstream: {url: "http://%s", timeout: 10s}
data_dir: %q
%s
usage: {flush_interval: 100ms}
server: {shutdown_timeout: 10s}
%s
%s`, upstream, dataDir, nats, routesYAML, extra)
	cfg, err := config.Parse(strings.NewReader(y))
	if err != nil {
		t.Fatalf("config: %v\n%s", err, y)
	}
	return cfg
}

// runningSidecar is a sidecar started in process.
type runningSidecar struct {
	*sidecar.Sidecar
	base string
	hc   *http.Client
}

// startSidecar starts a sidecar in process; seed, when set, is pushed into the bucket at
// start. It is closed when the test ends, if the test did not close it.
func startSidecar(t testing.TB, cfg *config.Config, log *zap.Logger, seed []*limiter.Snapshot) *runningSidecar {
	t.Helper()
	sc, err := sidecar.New(sidecar.Options{Config: cfg, Log: log, Snapshots: seed})
	if err != nil {
		t.Fatalf("sidecar.New: %v", err)
	}
	if err := sc.Start(context.Background()); err != nil {
		sc.Close(context.Background())
		t.Fatalf("sidecar.Start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		sc.Close(ctx)
	})
	tr := &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &runningSidecar{Sidecar: sc, base: "http://" + sc.Addr().String(),
		hc: &http.Client{Transport: tr, Timeout: 20 * time.Second}}
}

// waitReady waits until the sidecar's replica has caught up with the bucket.
func (s *runningSidecar) waitReady(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.WaitReady(ctx); err != nil {
		t.Fatalf("sidecar not ready: %v", err)
	}
}

// flush publishes everything the sidecar committed and waits for JetStream's
// acknowledgement.
func (s *runningSidecar) flush(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := s.Usage.Flush(ctx); err != nil {
		t.Fatalf("usage flush: %v (stats %+v)", err, s.Usage.Stats())
	}
}

// close shuts the sidecar down gracefully within d.
func (s *runningSidecar) close(t testing.TB, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Fatalf("sidecar close: %v", err)
	}
}

// closeUnreachable shuts the sidecar down gracefully within d while NATS is away. What
// cannot reach NATS stays for the next start (the usage outbox, unreturned fleet
// leases); Close may report the leases as an error, which is logged here: the restart
// that follows checks that nothing was lost.
func (s *runningSidecar) closeUnreachable(t testing.TB, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if err := s.Close(ctx); err != nil {
		t.Logf("sidecar close while NATS is away: %v", err)
	}
}

// connectJS connects a client of the tests' own to NATS; it reconnects forever.
func connectJS(t testing.TB, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond),
		nats.RetryOnFailedConnect(true))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// tkey names a published total.
type tkey struct {
	customer, feature string
	window            time.Time
}

// published reads the usage stream's totals, keyed by (customer, feature, window).
func published(t testing.TB, js jetstream.JetStream) map[tkey]usage.Total {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ts, err := usage.Totals(ctx, js)
	if err != nil {
		t.Fatalf("usage totals: %v", err)
	}
	return totalsByKey(t, ts)
}

func totalsByKey(t testing.TB, ts []usage.Total) map[tkey]usage.Total {
	t.Helper()
	out := make(map[tkey]usage.Total, len(ts))
	for _, tot := range ts {
		k := tkey{tot.CustomerID, tot.Feature, tot.WindowStart.UTC()}
		if _, dup := out[k]; dup {
			t.Fatalf("usage totals list %v twice", k)
		}
		out[k] = tot
	}
	return out
}

// assertPublishedExactly fails unless the published totals are exactly want, each in
// the window its feature has now, with the overage of soft limits consistent.
func assertPublishedExactly(t testing.TB, got map[tkey]usage.Total, want ledger, w windows, cs []customer) {
	t.Helper()
	keys := make([]ckey, 0, len(want))
	for k := range want {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b ckey) int { return strings.Compare(a.String(), b.String()) })
	seen := map[tkey]bool{}
	for _, k := range keys {
		tk := tkey{k.customer, k.feature, w.of(k.feature)}
		seen[tk] = true
		tot, ok := got[tk]
		if !ok {
			t.Errorf("%s: admitted %d, nothing published for window %s", k, want[k], tk.window.Format(time.RFC3339))
			continue
		}
		if tot.Quantity != want[k] {
			t.Errorf("%s: admitted %d, published %d", k, want[k], tot.Quantity)
		}
		checkOverage(t, k, tot, cs)
	}
	for tk, tot := range got {
		if !seen[tk] {
			t.Errorf("published %+v, which nobody admitted", tot)
		}
	}
}

// checkOverage checks that a total's overage is what its limit implies: the quantity
// over a soft limit, and nothing for hard and unlimited features.
func checkOverage(t testing.TB, k ckey, tot usage.Total, cs []customer) {
	t.Helper()
	want := int64(0)
	if k.feature == fExports {
		want = max(0, tot.Quantity-softLimit(cs, k.customer))
	}
	if tot.Overage != want {
		t.Errorf("%s: published quantity %d with overage %d, want overage %d", k, tot.Quantity, tot.Overage, want)
	}
}

// pushSnapshots writes snapshots into the entitlement bucket, as a control plane does.
func pushSnapshots(t testing.TB, js jetstream.JetStream, snaps []*limiter.Snapshot) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kv, err := replica.EnsureBucket(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	res, err := replica.PushSnapshots(ctx, kv, snaps, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Written != len(snaps) {
		t.Fatalf("push wrote %d of %d snapshots", res.Written, len(snaps))
	}
}

func writeFile(t testing.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}
