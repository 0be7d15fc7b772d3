package quota_test

import (
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/quota"
)

// TestFigures measures the fleet quota in process, on one embedded nats-server:
//
//	GATEHOUSE_QUOTA_FIGURES=1 go test -run TestFigures -v ./sync/quota
//
// It logs lease refills per 1,000 admitted requests far from the limit, the latency of
// admitted requests near the limit (where leases are small and refills frequent)
// against far from it and against a fleet without leases, how many of the requests
// answered near the limit waited for a refill (and how many of those were then granted
// quota rather than told that none was left), and the throughput of 4
// sidecars against 1. Every sidecar, the upstream and the 64 clients share this
// machine's CPUs, so a fleet cannot be faster than one sidecar here: the throughput
// figure is the cost of the fleet, not its capacity. It asserts nothing about time.
func TestFigures(t *testing.T) {
	if os.Getenv("GATEHOUSE_QUOTA_FIGURES") == "" {
		t.Skip("set GATEHOUSE_QUOTA_FIGURES=1 to measure")
	}
	attempts := envInt("GATEHOUSE_QUOTA_ATTEMPTS", 40000)
	quiet := func(c *config.Config) { c.Log.Level = "warn" }

	// Far from the limit: refills per 1,000 admitted, and throughput, 1 and 4 sidecars.
	var rates []float64
	for _, n := range []int{1, 4} {
		nats := testutil.StartNATS(t)
		f := newFleet(t, []string{nats.URL()}, n, []*limiter.Snapshot{fleetSnap(t, 1_000_000_000)}, quiet)
		f.run("/v1/calls", fleetClients, attempts/10, nil) // warm up: connections, leases
		before := sumU(f.refills())
		r := f.run("/v1/calls", fleetClients, attempts, nil)
		refills := sumU(f.refills()) - before
		rate := float64(r.ok.Load()) / r.elapsed.Seconds()
		rates = append(rates, rate)
		t.Logf("%d sidecar(s), far from the limit: %d admitted in %v = %.0f req/s; %d refills = %.2f per 1,000 admitted; p50 %v p99 %v",
			n, r.ok.Load(), r.elapsed.Round(time.Millisecond), rate, refills, 1000*float64(refills)/float64(r.ok.Load()),
			percentile(r.latencies, 0.5), percentile(r.latencies, 0.99))
	}
	t.Logf("throughput, 4 sidecars / 1 sidecar: %.2f", rates[1]/rates[0])

	// Near the limit: 4 sidecars, limit 20,000, 64 clients making 40,000 attempts.
	// Admitted requests that came back while the fleet had used the last 5% of the limit
	// against those between 10% and 50%; then the same fleet without leases, the limit
	// split statically (5,000 per sidecar).
	const limit = 20_000
	for _, leases := range []bool{true, false} {
		nats := testutil.StartNATS(t)
		each := int64(limit)
		if !leases {
			each = limit / 4
		}
		f := newFleet(t, []string{nats.URL()}, 4, []*limiter.Snapshot{fleetSnap(t, each)}, func(c *config.Config) {
			quiet(c)
			c.Quota.Enabled = leases
		})
		f.run("/warm", fleetClients, 2000, nil) // no route: forwarded unchecked, to open connections
		f.up.served.Store(0)
		// The waits for refills of the requests answered while the fleet used the last 5%
		// of the limit.
		var waits0, waits, granted0, granted []uint64
		var answered0, answered int64
		var from, to sync.Once
		r := f.run("/v1/calls", fleetClients, 2*limit, func(n int64) {
			switch served := f.up.served.Load(); {
			case served >= limit:
				to.Do(func() { waits, granted, answered = f.waits(), f.grantedWaits(), n })
			case served > limit*95/100:
				from.Do(func() { waits0, granted0, answered0 = f.waits(), f.grantedWaits(), n })
			}
		})
		for i := range waits {
			waits[i] -= waits0[i]
			granted[i] -= granted0[i]
		}
		answered -= answered0
		var far, near []time.Duration
		for _, ss := range r.samples {
			for _, s := range ss {
				switch {
				case !s.ok:
				case s.served > limit/10 && s.served <= limit/2:
					far = append(far, s.lat)
				case s.served > limit*95/100:
					near = append(near, s.lat)
				}
			}
		}
		refills := sumU(f.refills())
		t.Logf("leases %v: %v; refills %d; admitted far from the limit p50 %v p99 %v (%d); in the last 5%% p50 %v p99 %v (%d)",
			leases, r, refills, pct(far, 0.5), pct(far, 0.99), len(far), pct(near, 0.5), pct(near, 0.99), len(near))
		if leases {
			for i, sc := range f.scs {
				t.Logf("sidecar %d: %+v", i, sc.Quota.Stats())
			}
			t.Logf("while the fleet used the last 5%% of the limit, %d requests were answered, %d waited for a refill: waits %v over buckets %v; "+
				"added p99 (0 for requests that did not wait) <= %v; of those waits, %d ended with quota granted: %v, added p99 <= %v "+
				"(the others learnt that the fleet had nothing left)", answered, sumU(waits), waits, quota.WaitBuckets, waitQuantile(waits, answered, 0.99),
				sumU(granted), granted, waitQuantile(granted, answered, 0.99))
		}
	}
}

// waitQuantile is the upper bound of the bucket that holds the p-quantile of the wait
// of answered requests, those that did not wait counting as 0.
func waitQuantile(waits []uint64, answered int64, p float64) time.Duration {
	rank := uint64(float64(answered) * p)
	waited := sumU(waits)
	if uint64(answered) < waited || uint64(answered)-waited > rank {
		return 0
	}
	seen := uint64(answered) - waited
	for i, n := range waits {
		if seen += n; seen > rank {
			if i == len(quota.WaitBuckets) {
				return time.Hour
			}
			return quota.WaitBuckets[i]
		}
	}
	return time.Hour
}

func (f *fleet) waits() []uint64 {
	return f.sumWaits((*quota.Manager).Waits)
}

func (f *fleet) grantedWaits() []uint64 {
	return f.sumWaits((*quota.Manager).GrantedWaits)
}

func (f *fleet) sumWaits(of func(*quota.Manager) []uint64) []uint64 {
	out := make([]uint64, len(quota.WaitBuckets)+1)
	for _, sc := range f.scs {
		if sc.Quota != nil {
			for i, n := range of(sc.Quota) {
				out[i] += n
			}
		}
	}
	return out
}

func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	return d[min(int(float64(len(d))*p), len(d)-1)]
}

func sumU(xs []uint64) uint64 {
	var s uint64
	for _, x := range xs {
		s += x
	}
	return s
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}
