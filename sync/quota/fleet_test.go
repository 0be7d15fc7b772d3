package quota_test

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/usage"
	"github.com/nats-io/nats.go"
	"github.com/valyala/fasthttp"
)

const (
	fleetLimit    = 10_000
	fleetAttempts = 20_000
	fleetClients  = 64
)

// TestFleet: four sidecars on one NATS share a hard limit of 10,000; 64 clients make
// 20,000 attempts. All up, exactly 10,000 reach the upstream. With one sidecar killed
// midway, never more than 10,000, and the shortfall is no more than what the killed
// sidecar held unused when it died. (Usage accounting is off, to keep the test short
// under -race: admission does not depend on it; TestFailPolicy runs with it.)
func TestFleet(t *testing.T) {
	t.Run("all up", func(t *testing.T) {
		n := testutil.StartNATS(t)
		f := newFleet(t, []string{n.URL()}, 4, []*limiter.Snapshot{fleetSnap(t, fleetLimit)}, noUsage)
		r := f.run("/v1/calls", fleetClients, fleetAttempts, nil)
		t.Logf("%v; refills %v", r, f.refills())
		if served := f.up.served.Load(); served != fleetLimit || r.ok.Load() != fleetLimit {
			t.Errorf("upstream served %d, clients saw %d admitted: want exactly %d", served, r.ok.Load(), fleetLimit)
		}
		if r.unavailable.Load() != 0 {
			t.Errorf("%d answers of 503 with every sidecar and NATS up", r.unavailable.Load())
		}
		if v := f.value(f.counterKey(0)); v.Granted != fleetLimit || v.Limit != fleetLimit {
			t.Errorf("bucket %+v", v)
		}
	})
	t.Run("one killed midway", func(t *testing.T) {
		n := testutil.StartNATS(t)
		f := newFleet(t, []string{n.URL()}, 4, []*limiter.Snapshot{fleetSnap(t, fleetLimit)}, noUsage)
		var once sync.Once
		var lease, grant, used int64
		r := f.run("/v1/calls", fleetClients, fleetAttempts, func(int64) {
			if f.up.served.Load() >= fleetLimit/2 {
				once.Do(func() { lease, grant, used = f.kill(3) })
			}
		})
		served := f.up.served.Load()
		short := fleetLimit - served
		t.Logf("%v; killed sidecar 3 holding a grant of %d with %d used: lease lost %d; upstream served %d, shortfall %d",
			r, grant, used, lease, served, short)
		if served > fleetLimit {
			t.Errorf("upstream served %d, over the limit of %d", served, fleetLimit)
		}
		if short > lease {
			t.Errorf("shortfall %d is more than the %d the killed sidecar held", short, lease)
		}
	})
}

// TestFleetLowered: a limit lowered mid-window below what the fleet already admitted
// stops every admission on every sidecar, and the sidecars return what they held.
func TestFleetLowered(t *testing.T) {
	n := testutil.StartNATS(t)
	f := newFleet(t, []string{n.URL()}, 4, []*limiter.Snapshot{fleetSnap(t, fleetLimit)}, nil)
	if r := f.run("/v1/calls", 16, 2000, nil); r.ok.Load() != 2000 {
		t.Fatalf("before lowering: %v", r)
	}
	k := f.counterKey(0)
	if v := f.value(k); v.Granted <= 2000 {
		t.Logf("the fleet holds no unused quota (%+v)", v)
	}
	f.push(fleetSnap(t, 1000))
	eventually(t, "every sidecar to see the lowered limit", func() bool {
		for _, sc := range f.scs {
			if s := sc.Source.Customer([]byte(fleetCustomer)); s == nil || s.Feature("calls").Limit != 1000 {
				return false
			}
		}
		return true
	})
	served := f.up.served.Load()
	r := f.run("/v1/calls", 16, 1000, nil)
	if r.ok.Load() != 0 || f.up.served.Load() != served {
		t.Errorf("after lowering the limit below the usage: %v", r)
	}
	eventually(t, "the unused leases to go back", func() bool {
		v := f.value(k)
		return v.Granted == 2000 && v.Limit == 1000
	})
}

// TestFailPolicy: with NATS away, a sidecar spends the lease in hand; then a route that
// denies answers 503 quota_unavailable with Retry-After, and one that allows forwards
// the request and counts it, and the usage is published once NATS is back.
func TestFailPolicy(t *testing.T) {
	n := testutil.StartNATS(t)
	f := newFleet(t, []string{n.URL()}, 1, []*limiter.Snapshot{fleetSnap(t, 1000)}, func(c *config.Config) {
		c.Quota.MinLease, c.Quota.MaxLease, c.Quota.Wait = 20, 20, 300*time.Millisecond
	})
	sc := f.scs[0]
	get := func(path string) (int, *fasthttp.Response) {
		req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
		defer fasthttp.ReleaseRequest(req)
		req.SetRequestURI("http://" + sc.Addr().String() + path)
		req.Header.Set("X-Customer-Id", fleetCustomer)
		if err := client.DoTimeout(req, resp, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode(), resp
	}
	admitted := 0
	for range 5 {
		if code, _ := get("/v1/calls"); code == 200 {
			admitted++
		}
	}
	n.Shutdown()
	eventually(t, "the sidecar to notice", func() bool { return sc.NATS.NC().Status() != nats.CONNECTED })
	var last *fasthttp.Response
	for i := 0; ; i++ {
		code, resp := get("/v1/calls")
		if code != 200 {
			if code != 503 || string(resp.Header.Peek("Retry-After")) != "1" {
				t.Errorf("lease spent, NATS away: %d Retry-After %q %s", code, resp.Header.Peek("Retry-After"), resp.Body())
			}
			last = resp
			break
		}
		if admitted++; i > 100 {
			t.Fatal("no refusal after 100 requests without NATS")
		}
	}
	var p struct{ Reason, Feature string }
	if err := json.Unmarshal(last.Body(), &p); err != nil || p.Reason != "quota_unavailable" || p.Feature != "calls" {
		t.Errorf("problem %s (%v)", last.Body(), err)
	}
	fasthttp.ReleaseResponse(last)
	for range 3 {
		if code, resp := get("/open/calls"); code != 200 {
			t.Errorf("fail open: %d %s", code, resp.Body())
		} else {
			admitted++
		}
	}
	t.Logf("admitted %d, 20 of them from the lease in hand while NATS was away, 3 failing open", admitted)
	n.Restart()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	eventually(t, "the sidecar to reconnect", func() bool { return sc.NATS.NC().Status() == nats.CONNECTED })
	if err := sc.Usage.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	totals, err := usage.Totals(ctx, f.js)
	if err != nil {
		t.Fatal(err)
	}
	if len(totals) != 1 || totals[0].Quantity != int64(admitted) || int64(admitted) != f.up.served.Load() {
		t.Errorf("published %+v, upstream served %d, want %d", totals, f.up.served.Load(), admitted)
	}
}

// TestEmbedded: one sidecar on its embedded NATS runs the same leases.
func TestEmbedded(t *testing.T) {
	f := newFleet(t, nil, 1, []*limiter.Snapshot{fleetSnap(t, 1000)}, nil)
	r := f.run("/v1/calls", 16, 3000, nil)
	if r.ok.Load() != 1000 || f.up.served.Load() != 1000 {
		t.Errorf("%v, upstream %d: want exactly 1000", r, f.up.served.Load())
	}
	if v := f.value(f.counterKey(0)); v.Granted != 1000 || len(v.Sidecars) != 1 {
		t.Errorf("bucket %+v", v)
	}
}

// noUsage switches usage accounting off.
func noUsage(c *config.Config) { c.Usage.Enabled = false }

// refills is each sidecar's number of lease refills.
func (f *fleet) refills() []uint64 {
	out := make([]uint64, len(f.scs))
	for i, sc := range f.scs {
		if sc.Quota != nil {
			out[i] = sc.Quota.Stats().Refills
		}
	}
	return out
}

// eventually polls cond until it holds or 20s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
