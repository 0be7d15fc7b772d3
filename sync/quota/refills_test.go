package quota

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
)

// TestRefillsFarFromLimit: far from the limit a lease lasts. Many customers, each with a
// limit of 10^12 and each making few requests (a low rate per customer, as in the bench
// harness's steady scenario, where a lease sized by the rate alone stays near min_lease
// and refills every few requests), take one lease per sidecar each and then refill at
// most 5 times per 1,000 admitted requests; the grants stay within each limit. It
// counts refills, it times nothing.
func TestRefillsFarFromLimit(t *testing.T) {
	const (
		customers = 2000
		perCust   = 50 // requests per customer after its first lease, across the sidecars
		limit     = 1_000_000_000_000
		workers   = 16
	)
	for _, sidecars := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d sidecars", sidecars), func(t *testing.T) {
			nats := testutil.StartNATS(t)
			var ms []*member
			for range sidecars {
				ms = append(ms, newMember(t, nats, nil))
			}
			// Each member sees each customer's snapshot (its own copy, as each replica has).
			snaps := make([][]*limiter.Snapshot, sidecars)
			for i := range ms {
				for c := range customers {
					snaps[i] = append(snaps[i], snap(t, fmt.Sprintf("cust_far_%04d", c), limit, 1))
				}
			}
			refills := func() (n uint64) {
				for _, mb := range ms {
					n += mb.m.Stats().Refills
				}
				return n
			}
			// run makes rounds requests per customer, the customers interleaved so that
			// each one's rate stays low, spread over the members; it returns how many
			// were admitted.
			run := func(rounds int) int64 {
				var admitted atomic.Int64
				var next atomic.Int64
				var wg sync.WaitGroup
				total := int64(rounds * customers)
				for range workers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for n := next.Add(1) - 1; n < total; n = next.Add(1) - 1 {
							c, round := int(n%customers), int(n/customers)
							i := (c + round) % sidecars
							if d := ms[i].do(snaps[i][c], 1, false); d.Reason == limiter.OK {
								admitted.Add(1)
							} else {
								t.Errorf("member %d, customer %d: %+v", i, c, d)
							}
						}
					}()
				}
				wg.Wait()
				return admitted.Load()
			}
			// First leases: every customer once on every member. A first lease is one
			// compare-and-set per (customer, feature, window) and sidecar, whatever the
			// sizing; it is reported, not counted against the target.
			first := run(sidecars)
			eventually(t, "the first leases' refills ahead of need to settle", func() bool {
				busy := false
				for _, mb := range ms {
					mb.m.walk(nil, func(l *lease) { busy = busy || l.job.Load() != nil })
				}
				return !busy
			})
			firstRefills := refills()

			admitted := run(perCust)
			got := refills() - firstRefills
			per1000 := 1000 * float64(got) / float64(admitted)
			t.Logf("%d sidecar(s), %d customers, limit %d: first leases %d for %d requests; then %d admitted, %d refills = %.3f per 1,000 admitted",
				sidecars, customers, int64(limit), firstRefills, first, admitted, got, per1000)
			if admitted != int64(perCust*customers) {
				t.Errorf("admitted %d of %d far from the limit", admitted, perCust*customers)
			}
			if per1000 > 5 {
				t.Errorf("%d refills for %d admitted = %.2f per 1,000 far from the limit, want <= 5", got, admitted, per1000)
			}
			// Each sidecar took max_lease at once, and the grants add up to at most the limit.
			for _, c := range []int{0, customers / 2, customers - 1} {
				v := ms[0].value(ms[0].counter(snaps[0][c]).Key)
				for i, mb := range ms {
					if g := v.Sidecars[mb.m.SidecarID()]; g < mb.m.opts.MaxLease {
						t.Errorf("customer %d: member %d holds a grant of %d, want at least max_lease %d", c, i, g, mb.m.opts.MaxLease)
					}
				}
				if v.Granted > limit {
					t.Errorf("customer %d: bucket %+v over the limit", c, v)
				}
			}
		})
	}
}
