package usage

import (
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

// BenchmarkRecord measures Record, from one caller and from many (as many as a busy
// proxy has requests in flight), and how many Badger writes the recorder makes per 1000
// records (all of them the publisher's). allocs/op includes the publisher's.
func BenchmarkRecord(b *testing.B) {
	b.Run("serial", func(b *testing.B) {
		e := newEnv(b)
		r := e.recorder(hourly, func(o *Options) { o.MaxOutboxBytes = 1 << 40 })
		u := []limiter.Usage{use("cust_a", "api_calls", -1, 1, 0)}
		b.ReportAllocs()
		cpu := cpuTime()
		b.ResetTimer()
		for b.Loop() {
			if err := r.Record(u); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		reportWrites(b, r, cpu)
	})
	b.Run("parallel", func(b *testing.B) {
		e := newEnv(b)
		r := e.recorder(hourly, func(o *Options) { o.MaxOutboxBytes = 1 << 40 })
		var next atomic.Int64
		b.SetParallelism(64) // 64 × GOMAXPROCS callers
		b.ReportAllocs()
		cpu := cpuTime()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			c := fmt.Sprintf("cust_%d", next.Add(1)%100)
			u := []limiter.Usage{use(c, "api_calls", -1, 1, 0), use(c, "tokens", 0, 42, 0)}
			for pb.Next() {
				if err := r.Record(u); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.StopTimer()
		reportWrites(b, r, cpu)
	})
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportWrites reports Badger writes per 1000 records and the CPU time of the whole
// process (callers, publisher, Badger) per record.
func reportWrites(b *testing.B, r *Recorder, cpu0 time.Duration) {
	s := r.Stats()
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(s.Records), "cpu-ns/rec")
	b.ReportMetric(float64(s.BadgerWrites)*1000/float64(s.Records), "writes/1000rec")
}

// BenchmarkDrainAfterOutage fills the outbox as 60 s of busy traffic would while NATS is
// away (1,200,000 requests, 20,000 a second, each with two usages, from 64 concurrent
// callers over 1000 customers), then measures how fast it is published once NATS is back
// and the client has reconnected. Run it with -benchtime=1x.
func BenchmarkDrainAfterOutage(b *testing.B) {
	const appends = 1_200_000
	for b.Loop() {
		b.StopTimer()
		e := newEnv(b)
		r := e.recorder(hourly)
		e.nats.Shutdown()
		var next atomic.Int64
		var wg sync.WaitGroup
		for g := range 64 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for r.Stats().Appends < appends {
					c := fmt.Sprintf("cust_%d", next.Add(1)%1000)
					u := []limiter.Usage{use(c, "api_calls", -1, 1, 0), use(c, "tokens", g%2, 42, 0)}
					if err := r.Record(u); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		filled := r.Stats()
		e.nats.Restart()
		eventually(b, "the client reconnected", e.js.Conn().IsConnected)
		r.kickPublisher()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		start := time.Now()
		b.StartTimer()
		err := r.Flush(ctx)
		b.StopTimer()
		elapsed := time.Since(start)
		cancel()
		if err != nil {
			b.Fatal(err)
		}
		s := r.Stats()
		b.ReportMetric(float64(s.PublishedRecords)/elapsed.Seconds(), "records/s")
		b.ReportMetric(float64(s.Published), "msgs")
		b.ReportMetric(float64(filled.OutboxBytes)/(1<<20), "outbox-MiB")
		b.Logf("outbox of %d records in %d appends (%d bytes) published in %v as %d messages of %d deltas",
			filled.Records, filled.Appends, filled.OutboxBytes, elapsed, s.Published, s.PublishedDeltas)
		r.Close(context.Background())
		b.StartTimer()
	}
}

// BenchmarkRecordOpenLoop measures Record's latency at a fixed rate of calls (each a
// request with two features, over 10,000 customers) for 6 s, with the publisher idle
// (flush interval 1 h) and publishing every second, so that the publisher's cost to the
// request path shows as the difference in one run; and the messages it publishes per
// second. Run it with -benchtime=1x.
func BenchmarkRecordOpenLoop(b *testing.B) {
	const dur = 6 * time.Second
	us := make([][]limiter.Usage, 10000)
	for i := range us {
		c := fmt.Sprintf("cust_%05d", i)
		us[i] = []limiter.Usage{use(c, "api_calls", -1, 1, 0), use(c, "tokens", 0, 42, 0)}
	}
	for _, bc := range []struct {
		name  string
		rate  int
		flush time.Duration
	}{{"5000/s/publisher-idle", 5000, time.Hour}, {"5000/s/publisher-1s", 5000, time.Second}, {"20000/s/publisher-1s", 20000, time.Second}} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				e := newEnv(b)
				r := e.recorder(func(o *Options) { o.FlushInterval = bc.flush; o.MaxOutboxBytes = 1 << 40 })
				n := int(float64(bc.rate) * dur.Seconds())
				lat := make([]time.Duration, n)
				var wg sync.WaitGroup
				start := time.Now()
				b.StartTimer()
				for k := range n {
					if d := time.Until(start.Add(time.Duration(k) * time.Second / time.Duration(bc.rate))); d > 0 {
						time.Sleep(d)
					}
					wg.Add(1)
					go func() {
						defer wg.Done()
						t0 := time.Now()
						if err := r.Record(us[k*7919%len(us)]); err != nil {
							b.Error(err)
						}
						lat[k] = time.Since(t0)
					}()
				}
				wg.Wait()
				elapsed := time.Since(start)
				b.StopTimer()
				slices.Sort(lat)
				q := func(f float64) float64 { return float64(lat[int(f*float64(n-1))].Microseconds()) }
				s := r.Stats()
				b.ReportMetric(q(.5), "p50-µs")
				b.ReportMetric(q(.99), "p99-µs")
				b.ReportMetric(q(.999), "p999-µs")
				b.ReportMetric(float64(s.Published)/elapsed.Seconds(), "msgs/s")
				b.ReportMetric(float64(s.BadgerWrites)*1000/float64(s.Records), "writes/1000rec")
				r.Close(context.Background())
				b.StartTimer()
			}
		})
	}
}

// BenchmarkPublisherCost measures what the publisher costs per request, as the steady
// bench scenario loads it: 300,000 requests over 10,000 customers (two usages each, one
// hard-limited) at 30,000 requests a second, cut into rounds of one flush interval's
// worth, each followed by the flush that publishes it; at the end everything
// acknowledged is settled into the counters. The sub-benchmarks are flush intervals of
// 1 s and 5 s (the default): a message holds one delta per key that had usage, so the
// longer interval publishes, stores and settles a fifth of the deltas. cpu-ns/rec is the
// whole process's CPU (the Record calls, the publisher, Badger and the embedded NATS
// server) per request. Run it with -benchtime=1x; -count for spread.
func BenchmarkPublisherCost(b *testing.B) {
	for _, interval := range []time.Duration{time.Second, 5 * time.Second} {
		b.Run("flush="+interval.String(), func(b *testing.B) { benchPublisherCost(b, interval) })
	}
}

func benchPublisherCost(b *testing.B, interval time.Duration) {
	const customers, perSecond, total = 10000, 30000, 300000
	perRound := int(perSecond * interval / time.Second)
	us := make([][]limiter.Usage, customers)
	for i := range us {
		c := fmt.Sprintf("cust_%05d", i)
		calls := use(c, "api_calls", -1, 1, 0)
		calls.Limited, calls.Limit = true, 1<<40
		us[i] = []limiter.Usage{calls, use(c, "searches", -1, 1, 0)}
	}
	for b.Loop() {
		b.StopTimer()
		e := newEnv(b)
		r := e.recorder(func(o *Options) { o.FlushInterval = interval; o.MaxOutboxBytes = 1 << 40 })
		runtime.GC()
		cpu := cpuTime()
		b.StartTimer()
		for k := 0; k < total; {
			for range perRound {
				if err := r.Record(us[k*7919%customers]); err != nil {
					b.Fatal(err)
				}
				k++
			}
			flush(b, r)
		}
		eventually(b, "settling", func() bool { return r.Stats().Unsettled == 0 })
		b.StopTimer()
		reportWrites(b, r, cpu)
		s := r.Stats()
		b.ReportMetric(float64(s.PublishedDeltas)/float64(s.Published), "deltas/msg")
		r.Close(context.Background())
		b.StartTimer()
	}
}

// BenchmarkSortDeltas sorts a cut of 13,000 deltas (10,000 customers, two features) into
// key order, as a cut at saturation does: by comparing the keys' strings (sortEntries)
// and by the keys' ranks in the publisher's key table (sortByRank). Each op sorts a fresh
// copy.
func BenchmarkSortDeltas(b *testing.B) {
	var kt keyTable
	kt.newSet()
	var es []batchEntry
	for i := range 13000 {
		k := limiter.CounterKey{Customer: fmt.Sprintf("cust-%05d", (i*7919)%10000), Feature: []string{"api_calls", "searches"}[i%2], WindowStart: 1}
		d := decoder{b: appendCK(nil, &k)}
		es = append(es, batchEntry{k: k, slot: kt.slot(&d)})
	}
	kt.rank(nil)
	b.Run("strings", func(b *testing.B) {
		for b.Loop() {
			sortEntries(slices.Clone(es), nil)
		}
	})
	b.Run("rank", func(b *testing.B) {
		for b.Loop() {
			if !sortByRank(&kt, slices.Clone(es), nil) {
				b.Fatal("declined")
			}
		}
	})
}

// BenchmarkMergeEntries merges 12 messages of 20,000 deltas (10,000 customers, two
// features, a tenth of them missing from each message), as a settling pass at 5,000
// requests a second does once a minute.
func BenchmarkMergeEntries(b *testing.B) {
	rng := rand.New(rand.NewPCG(3, 5))
	parts := make([][]batchEntry, 12)
	for i := range parts {
		for c := range 10000 {
			for _, f := range []string{"api_calls", "searches"} {
				if rng.IntN(10) == 0 {
					continue
				}
				parts[i] = append(parts[i], batchEntry{k: limiter.CounterKey{Customer: fmt.Sprintf("cust_%05d", c), Feature: f}, d: delta{records: 1, quantity: 1}})
			}
		}
		slices.SortFunc(parts[i], func(a, b batchEntry) int { return compareKeys(&a.k, &b.k) })
	}
	b.ReportAllocs()
	for b.Loop() {
		mergeEntries(slices.Clone(parts), nil)
	}
}

// BenchmarkFoldLog is the publisher's fold of the usage log into a cut's deltas, the
// work that follows every request: decoding each record and adding each usage to its
// key's delta. 150,000 records (a 5 s cut at 30,000 requests a second) of two usages
// each over 10,000 customers, in a random order, with every key's durable total known,
// as in a sidecar that has run a while. ns/op is per record.
func BenchmarkFoldLog(b *testing.B) {
	const customers, records = 10000, 150000
	rng := rand.New(rand.NewPCG(3, 5))
	durable := map[limiter.CounterKey]*durableTotal{}
	var log [][]byte
	for range records {
		c := fmt.Sprintf("cust_%05d", rng.IntN(customers))
		calls := use(c, "api_calls", -1, 1, 0)
		calls.Limited, calls.Limit = true, 1<<40
		us := []limiter.Usage{calls, use(c, "searches", -1, 1+int64(rng.IntN(3)), 0)}
		for _, u := range us {
			if durable[u.Key] == nil {
				durable[u.Key] = &durableTotal{end: u.End, quantity: 1000}
			}
		}
		log = append(log, appendRecord(nil, time.Now().UnixNano(), us))
	}
	var r Recorder
	r.p.durable = durable
	r.p.keys.forget()
	fold := func() *deltaSet {
		s := &deltaSet{idx: map[limiter.CounterKey]int{}, gen: r.p.keys.newSet(), durable: durable, durGen: r.p.durableGen}
		add := func(at int64, e *logEntry) { r.addLogged(s, at, e) }
		for _, v := range log {
			if err := decodeRecord(v, &r.p.keys, add); err != nil {
				b.Fatal(err)
			}
		}
		return s
	}
	fold() // the keys are known, as after the first cut
	b.ResetTimer()
	for b.Loop() {
		if s := fold(); s.records != 2*records {
			b.Fatalf("%d usages folded, want %d", s.records, 2*records)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*records), "ns/record")
}
