package quota

import (
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// benchLeases is how many leases the maintenance benchmarks hold: the bench harness's
// steady scenario has 10,000 customers.
const benchLeases = 10_000

// newBenchManager returns a manager that is not started (no loops: the benchmark calls
// maintain itself) and holds n leases of open windows, with their counters.
func newBenchManager(b *testing.B, n int) (*Manager, []*limiter.Counter) {
	b.Helper()
	nt := testutil.StartNATS(b)
	st, err := store.Open(store.Options{Dir: b.TempDir(), GCInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { st.Close() })
	nc, err := nats.Connect(nt.URL())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		b.Fatal(err)
	}
	m, err := New(Options{JS: js, Store: st})
	if err != nil {
		b.Fatal(err)
	}
	lim := limiter.New()
	end := time.Now().Add(time.Hour).UnixNano()
	cs := make([]*limiter.Counter, n)
	m.mu.Lock()
	for i := range cs {
		cs[i] = lim.Counter(limiter.CounterKey{Customer: fmt.Sprintf("cust_%05d", i), Feature: "calls"}, end)
		m.leaseLocked(cs[i]).limit.Store(1_000_000)
		cs[i].GrantLease(100_000, 25_000, 1_000_000)
	}
	m.mu.Unlock()
	return m, cs
}

// BenchmarkMaintain is the maintenance loop over 10,000 leases that need nothing: walk
// is one walk of every lease (every walkEvery-th tick), tick an average tick as the
// loop runs them (walks included).
func BenchmarkMaintain(b *testing.B) {
	for _, walkEvery := range []int{1, 0} {
		name := "walk"
		if walkEvery == 0 {
			name = "tick"
		}
		b.Run(name, func(b *testing.B) {
			m, _ := newBenchManager(b, benchLeases)
			if walkEvery > 0 {
				m.walkEvery = walkEvery
			}
			b.ReportAllocs()
			for b.Loop() {
				m.maintain()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchLeases, "ns/lease")
		})
	}
}

// BenchmarkAcquireLock is what Acquire does under Manager.mu (find the lease, note the
// limit) on 10,000 leases, with and without a maintenance walk running all the time on
// the other core; p99-wait-µs and p999-wait-µs are quantiles of how long it waited for
// the lock.
func BenchmarkAcquireLock(b *testing.B) {
	for _, maintaining := range []bool{false, true} {
		b.Run(fmt.Sprintf("maintaining=%v", maintaining), func(b *testing.B) {
			m, cs := newBenchManager(b, benchLeases)
			m.walkEvery = 1 // every maintain walks, as every tick did before cfb809e
			s := &limiter.Snapshot{Revision: 1}
			f := &limiter.Feature{Limit: 1_000_000}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			if maintaining {
				wg.Go(func() {
					for {
						select {
						case <-stop:
							return
						default:
							m.maintain()
						}
					}
				})
			}
			// waits[i] counts the waits of up to 2^i ns.
			var waits [40]uint64
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				c := cs[i%len(cs)]
				i++
				t := time.Now()
				m.mu.Lock()
				w := time.Since(t)
				m.leaseLocked(c).noteLimit(s, f)
				m.mu.Unlock()
				waits[min(bits.Len64(uint64(w)), len(waits)-1)]++
			}
			close(stop)
			wg.Wait()
			b.ReportMetric(waitQuantile(waits[:], 0.99), "p99-wait-µs")
			b.ReportMetric(waitQuantile(waits[:], 0.999), "p999-wait-µs")
		})
	}
}

// waitQuantile is the upper bound, in µs, of the bucket of waits that holds quantile q.
func waitQuantile(waits []uint64, q float64) float64 {
	var n uint64
	for _, c := range waits {
		n += c
	}
	rank, seen := uint64(float64(n)*q), uint64(0)
	for i, c := range waits {
		if seen += c; seen > rank {
			return float64(uint64(1)<<i) / 1e3
		}
	}
	return 0
}

// BenchmarkFirstLeases is a sidecar new to its customers: 500 goroutines each make the
// first request of its share of 5,000 customers, each of which takes a lease (a KV
// compare-and-set) on the request path. leases/s is how fast the manager takes them
// against an in-process NATS server; refused counts requests that waited past
// Options.Wait.
func BenchmarkFirstLeases(b *testing.B) {
	const customers, workers = 5000, 500
	nats := testutil.StartNATS(b)
	for b.Loop() {
		b.StopTimer()
		a := newMember(b, nats, nil)
		snaps := make([]*limiter.Snapshot, customers)
		for i := range snaps {
			snaps[i] = snap(b, fmt.Sprintf("first_%05d", i), 1_000_000, 1)
		}
		var refused atomic.Int64
		var wg sync.WaitGroup
		b.StartTimer()
		start := time.Now()
		for w := range workers {
			wg.Go(func() {
				for i := w; i < customers; i += workers {
					if d := a.do(snaps[i], 1, false); d.Reason != limiter.OK {
						refused.Add(1)
					}
				}
			})
		}
		wg.Wait()
		took := time.Since(start)
		b.StopTimer()
		if got := a.m.Stats().Leases; got != customers {
			b.Fatalf("%d leases, want %d", got, customers)
		}
		b.ReportMetric(float64(customers-refused.Load())/took.Seconds(), "leases/s")
		b.ReportMetric(float64(refused.Load()), "refused")
		a.stop()
		b.StartTimer()
	}
}
