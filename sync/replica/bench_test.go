package replica

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

func BenchmarkCustomerHit(b *testing.B) {
	e := newEnv(b)
	e.put("cust_acme", doc("cust_acme", 10, "key-1"))
	r := e.start()
	e.waitCaughtUp()
	id, sum := []byte("cust_acme"), keySum("key-1")
	r.Customer(id)
	r.CustomerByKey(sum)
	b.Run("id", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if r.Customer(id) == nil {
				b.Fatal("miss")
			}
		}
	})
	b.Run("id-parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if r.Customer(id) == nil {
					b.Fatal("miss")
				}
			}
		})
	})
	b.Run("api-key", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if r.CustomerByKey(sum) == nil {
				b.Fatal("miss")
			}
		}
	})
}

// BenchmarkCustomerMiss reads customers that are not in memory: a Badger read and a
// snapshot decode each.
func BenchmarkCustomerMiss(b *testing.B) {
	const n = 20_000
	e := newEnv(b)
	e.cacheSize = 1000
	r := e.start()
	e.waitReady()
	keys, vals := make([]string, n), make([][]byte, n)
	ids := make([][]byte, n)
	for i := range n {
		id := fmt.Sprintf("cust_%06d", i)
		keys[i], vals[i], ids[i] = KeyFor(id), []byte(doc(id, i)), []byte(id)
	}
	e.putMany(keys, vals)
	e.waitCaughtUp()
	loads := r.Stats().Loads
	b.ReportAllocs()
	b.ResetTimer()
	i := 0
	for b.Loop() {
		if r.Customer(ids[i%n]) == nil {
			b.Fatal("unknown")
		}
		i += 7919 // a prime: a different customer, far away, every time
	}
	b.StopTimer()
	b.ReportMetric(float64(r.Stats().Loads-loads)/float64(b.N), "badger-reads/op")
}

// BenchmarkPropagation measures the time from the start of a KV put (a request to the
// server and its acknowledgement) to Customer() serving the new value, and reports its
// percentiles.
func BenchmarkPropagation(b *testing.B) {
	e := newEnv(b)
	e.prodTimings = true
	e.put("cust_acme", doc("cust_acme", 0))
	r := e.start()
	e.waitCaughtUp()
	id := []byte("cust_acme")
	var lat []time.Duration
	limit := 0
	for b.Loop() {
		limit++
		v := []byte(doc("cust_acme", limit))
		t0 := time.Now()
		if _, err := e.kv.Put(context.Background(), KeyFor("cust_acme"), v); err != nil {
			b.Fatal(err)
		}
		for r.Customer(id).Feature("api_calls").Limit != int64(limit) {
			if time.Since(t0) > 10*time.Second {
				b.Fatal("update not seen")
			}
			runtime.Gosched() // leave the CPU to the watch on a small machine
		}
		lat = append(lat, time.Since(t0))
	}
	slices.Sort(lat)
	pct := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Nanoseconds()) / 1e3 }
	b.ReportMetric(pct(0.5), "p50-µs")
	b.ReportMetric(pct(0.99), "p99-µs")
	b.ReportMetric(pct(1), "max-µs")
}

// BenchmarkTableGet is the request path's lookup in the in-memory table: hot reads 64
// of 10,000 customers, which stay in the CPU's caches; all reads the 10,000 in an order
// that defeats the caches' prefetching; million reads 1,000,000 customers, far more than
// the caches hold, so that most lookups read the table from memory, as a sidecar's
// lookups do when its requests interleave with the kernel's and other processes' work.
func BenchmarkTableGet(b *testing.B) {
	for _, c := range []struct {
		name         string
		customers, n int
	}{{"hot", 10000, 64}, {"all", 10000, 10000}, {"million", 1000000, 1000000}} {
		b.Run(c.name, func(b *testing.B) {
			tab := newTable(2*c.customers, 1024)
			ids := make([][]byte, c.customers)
			for i := range ids {
				id := fmt.Sprintf("cust_%07d", i)
				ids[i] = []byte(id)
				if _, ok := tab.fill(id, tab.gen(id), &limiter.Snapshot{CustomerID: id}); !ok {
					b.Fatal("fill refused")
				}
			}
			order := make([][]byte, c.n)
			for i := range order {
				order[i] = ids[i*7919%c.customers]
			}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if s, hit := tab.get(order[i%c.n]); !hit || s == nil {
					b.Fatal("miss")
				}
				i++
			}
		})
	}
}
