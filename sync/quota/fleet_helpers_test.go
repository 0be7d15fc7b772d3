package quota_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/sidecar"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/quota"
	"github.com/gatehouse-dev/gatehouse/sync/replica"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/valyala/fasthttp"
	"go.uber.org/zap"
)

const fleetCustomer = "cust_fleet"

// fleet is n sidecars in this process, each with its own data directory, on the NATS
// servers at urls, in front of one counting upstream.
type fleet struct {
	t    testing.TB
	urls []string
	js   jetstream.JetStream // the test's own client, as a control plane's
	up   *upstream
	cfgs []*config.Config
	scs  []*sidecar.Sidecar
	dead []atomic.Bool
	seed []*limiter.Snapshot // for an embedded NATS
}

// connect connects the test's own client.
func (f *fleet) connect(urls []string) {
	nc, err := nats.Connect(joinURLs(urls), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(nc.Close)
	if f.js, err = jetstream.New(nc); err != nil {
		f.t.Fatal(err)
	}
}

// newFleet starts n sidecars after pushing snaps. tweak adjusts every configuration.
// Without urls, one sidecar runs its embedded NATS and is seeded with snaps.
func newFleet(t testing.TB, urls []string, n int, snaps []*limiter.Snapshot, tweak func(*config.Config)) *fleet {
	t.Helper()
	f := &fleet{t: t, urls: urls, up: startUpstream(t), dead: make([]atomic.Bool, n)}
	if len(urls) > 0 {
		f.connect(urls)
		f.push(snaps...)
	} else {
		f.seed = snaps
	}
	for i := range n {
		cfg := config.Default()
		cfg.Listen, cfg.AdminListen = "127.0.0.1:0", ""
		cfg.Upstream.URL = "http://" + f.up.addr
		cfg.DataDir = t.TempDir()
		cfg.NATS.URLs = urls
		cfg.NATS.EmbeddedListen = "127.0.0.1:0"
		cfg.NATS.PingInterval = 500 * time.Millisecond
		cfg.Usage.FlushInterval = 100 * time.Millisecond
		cfg.Quota.IdleReturn = 0 // a killed sidecar keeps what it held
		one := int64(1)
		cfg.Routes = []config.Route{
			{Name: "calls", Path: "/v1/**", Features: []config.RouteFeature{{Feature: "calls", Cost: &one}}},
			{Name: "open", Path: "/open/**", Features: []config.RouteFeature{{Feature: "calls", Cost: &one}}, OnUnavailable: "allow"},
		}
		if tweak != nil {
			tweak(cfg)
		}
		cfg.SetDefaults()
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		f.cfgs = append(f.cfgs, cfg)
		f.scs = append(f.scs, nil)
		f.start(i)
	}
	return f
}

// start starts sidecar i on its configuration (and data directory).
func (f *fleet) start(i int) {
	t := f.t
	t.Helper()
	log := testutil.Logger(t).With(zap.Int("sidecar", i))
	sc, err := sidecar.New(sidecar.Options{Config: f.cfgs[i], Log: log, Snapshots: f.seed})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := sc.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := sc.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	f.scs[i] = sc
	f.dead[i].Store(false)
	if f.js == nil {
		f.connect([]string{sc.NATS.ClientURL()})
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		sc.Close(ctx)
	})
}

// push writes snapshots into the entitlement bucket.
func (f *fleet) push(snaps ...*limiter.Snapshot) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := replica.EnsureBucket(ctx, f.js)
	if err != nil {
		f.t.Fatal(err)
	}
	if _, err := replica.PushSnapshots(ctx, kv, snaps, zap.NewNop()); err != nil {
		f.t.Fatal(err)
	}
}

// kill stops sidecar i as SIGKILL would: its link to NATS drops, so it returns no lease,
// and its listener and connections close. It reports what the sidecar held unused at
// its death: its grant in the bucket less the usage it admitted.
func (f *fleet) kill(i int) (lease, grant, used int64) {
	sc := f.scs[i]
	f.dead[i].Store(true)
	sc.NATS.NC().Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	sc.Proxy.Shutdown(ctx)
	sc.Limiter.Counters(fleetCustomer, func(c *limiter.Counter) { used += c.Held() })
	k := f.counterKey(i)
	grant = f.value(k).Sidecars[sc.Quota.SidecarID()]
	return grant - used, grant, used
}

// counterKey is the key of the customer's "calls" counter that sidecar i uses now.
func (f *fleet) counterKey(i int) limiter.CounterKey {
	var k limiter.CounterKey
	f.scs[i].Limiter.Counters(fleetCustomer, func(c *limiter.Counter) { k = c.Key })
	return k
}

// value reads a counter's value from the quota bucket.
func (f *fleet) value(k limiter.CounterKey) *quota.Value {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := f.js.KeyValue(ctx, quota.DefaultBucket)
	if err != nil {
		f.t.Fatal(err)
	}
	e, err := kv.Get(ctx, quota.Key(k))
	if err != nil {
		f.t.Fatalf("read %s: %v", quota.Key(k), err)
	}
	v := &quota.Value{}
	if err := json.Unmarshal(e.Value(), v); err != nil {
		f.t.Fatal(err)
	}
	return v
}

// result counts the answers of a run.
type result struct {
	ok, limited, unavailable, other atomic.Int64
	perSidecar                      []atomic.Int64
	latencies                       [][]time.Duration // per client
	samples                         [][]sample        // per client
	elapsed                         time.Duration
}

// sample is one answer: how long it took, whether it was admitted, and how many
// requests the upstream had served when it came back.
type sample struct {
	lat    time.Duration
	ok     bool
	served int64
}

func (r *result) String() string {
	per := make([]int64, len(r.perSidecar))
	for i := range per {
		per[i] = r.perSidecar[i].Load()
	}
	return fmt.Sprintf("200: %d %v, 429: %d, 503: %d, other: %d in %v (latency p50 %v p99 %v max %v)", r.ok.Load(), per,
		r.limited.Load(), r.unavailable.Load(), r.other.Load(), r.elapsed.Round(time.Millisecond),
		percentile(r.latencies, 0.5), percentile(r.latencies, 0.99), percentile(r.latencies, 1))
}

// run has clients clients make attempts requests to path between them, each client on
// one sidecar (client i on sidecar i mod n) and moving to the next live one when its
// sidecar stops answering. after, when set, is called after each answer with the number
// of answers so far.
func (f *fleet) run(path string, clients, attempts int, after func(answered int64)) *result {
	r := &result{perSidecar: make([]atomic.Int64, len(f.scs)), latencies: make([][]time.Duration, clients),
		samples: make([][]sample, clients)}
	var next, answered atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cur := c % len(f.scs)
			req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
			defer fasthttp.ReleaseRequest(req)
			defer fasthttp.ReleaseResponse(resp)
			lat := make([]time.Duration, 0, attempts/clients+1)
			samples := make([]sample, 0, attempts/clients+1)
			for next.Add(1) <= int64(attempts) {
				for tries := 0; ; tries++ {
					for f.dead[cur].Load() {
						cur = (cur + 1) % len(f.scs)
					}
					req.Reset()
					req.SetRequestURI("http://" + f.scs[cur].Addr().String() + path)
					req.Header.Set("X-Customer-Id", fleetCustomer)
					t0 := time.Now()
					err := client.DoTimeout(req, resp, 10*time.Second)
					if err != nil {
						if tries > 100 {
							f.t.Errorf("client %d: %v", c, err)
							return
						}
						cur = (cur + 1) % len(f.scs) // its sidecar died: the next one
						continue
					}
					lat = append(lat, time.Since(t0))
					break
				}
				samples = append(samples, sample{lat: lat[len(lat)-1], ok: resp.StatusCode() == fasthttp.StatusOK, served: f.up.served.Load()})
				switch resp.StatusCode() {
				case fasthttp.StatusOK:
					r.ok.Add(1)
					r.perSidecar[cur].Add(1)
				case fasthttp.StatusTooManyRequests:
					r.limited.Add(1)
				case fasthttp.StatusServiceUnavailable:
					r.unavailable.Add(1)
					if len(resp.Header.Peek("Retry-After")) == 0 {
						f.t.Errorf("503 without Retry-After: %s", resp.Body())
					}
				default:
					r.other.Add(1)
					f.t.Errorf("status %d: %s", resp.StatusCode(), resp.Body())
				}
				if n := answered.Add(1); after != nil {
					after(n)
				}
			}
			r.latencies[c], r.samples[c] = lat, samples
		}()
	}
	wg.Wait()
	r.elapsed = time.Since(start)
	return r
}

var client = &fasthttp.Client{MaxConnsPerHost: 256, ReadTimeout: 10 * time.Second}

// upstream is a real HTTP upstream that counts what reaches it.
type upstream struct {
	addr   string
	served atomic.Int64
}

func startUpstream(t testing.TB) *upstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &upstream{addr: ln.Addr().String()}
	srv := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		u.served.Add(1)
		ctx.SetBodyString("ok")
	}}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown() })
	return u
}

// fleetSnap is the test customer with a monthly hard limit on "calls", billed from
// yesterday.
func fleetSnap(t testing.TB, limit int64) *limiter.Snapshot {
	t.Helper()
	start := time.Now().UTC().Add(-24 * time.Hour).Truncate(time.Hour).Format(time.RFC3339)
	s, err := limiter.ParseSnapshot(fmt.Appendf(nil, `{"customer_id":%q,"updated_at":%q,
		"billing":{"period_start":%q,"interval":"MONTHLY","timezone":"UTC"},
		"features":{"calls":{"type":"metered","usage_limit":%d}}}`,
		fleetCustomer, time.Now().UTC().Format(time.RFC3339Nano), start, limit))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// percentile returns the p-th percentile of the latencies of every client.
func percentile(lat [][]time.Duration, p float64) time.Duration {
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	if len(all) == 0 {
		return 0
	}
	slices.Sort(all)
	return all[min(int(float64(len(all))*p), len(all)-1)]
}

func joinURLs(urls []string) string {
	s := ""
	for i, u := range urls {
		if i > 0 {
			s += ","
		}
		s += u
	}
	return s
}
