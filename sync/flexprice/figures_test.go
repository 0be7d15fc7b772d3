package flexprice

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	fpt "github.com/gatehouse-dev/gatehouse/internal/flexpricetest"
	"github.com/gatehouse-dev/gatehouse/sync/usage"
	"go.uber.org/zap"
)

// TestFigures measures throughput against the in-process test server and embedded NATS:
//
//	GATEHOUSE_FLEXPRICE_FIGURES=1 go test -run TestFigures -v ./sync/flexprice
//
// It logs customers synced per second (a first full sync that writes every snapshot, then
// one that finds nothing changed) and usage events delivered per second. It asserts
// nothing about time: figures belong in a report, not in a pass/fail test.
func TestFigures(t *testing.T) {
	if os.Getenv("GATEHOUSE_FLEXPRICE_FIGURES") == "" {
		t.Skip("set GATEHOUSE_FLEXPRICE_FIGURES=1 to measure")
	}
	customers := envInt("GATEHOUSE_FLEXPRICE_CUSTOMERS", 5000)
	messages := envInt("GATEHOUSE_FLEXPRICE_MESSAGES", 2000)

	e := newEnv(t, fpt.Options{})
	e.catalogue()
	for i := range customers {
		sub := e.customer(fmt.Sprintf("cust-%05d", i), "plan_pro")
		e.fp.AttachAddon(sub.ID, "addon_boost")
	}
	e.opts.Logger = zap.NewNop()
	start := time.Now()
	e.run(func(o *Options) {
		o.DisableUsage = true
		o.PageSize = 1000
		o.MaxConcurrency = envInt("GATEHOUSE_FLEXPRICE_CONCURRENCY", 8)
	})
	first := time.Since(start)
	start = time.Now()
	n, err := e.b.FullSync(context.Background())
	if err != nil || n != customers {
		t.Fatalf("full sync: %d, %v", n, err)
	}
	again := time.Since(start)
	t.Logf("customers: %d; first full sync (every snapshot written) %v = %.0f customers/s; "+
		"unchanged full sync %v = %.0f customers/s; %v KV writes",
		customers, first.Round(time.Millisecond), float64(customers)/first.Seconds(),
		again.Round(time.Millisecond), float64(customers)/again.Seconds(), e.metric("gatehouse_flexprice_kv_writes_total"))
	e.stop()

	// Usage: messages of two deltas each (count mode, 10 units; sum mode), all on the
	// stream before the bridge starts, then drained.
	u := &usageOut{js: e.js, ackWait: time.Minute, fetchBatch: 500, replicas: 1}
	if _, err := u.setup(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := 0
	for i := range messages {
		e.publish(usage.Message{SidecarID: "sc-bench", Epoch: "E", Seq: uint64(i + 1), From: t0, To: t0.Add(time.Second),
			Deltas: []usage.Delta{
				{CustomerID: fmt.Sprintf("cust-%05d", i%customers), Feature: "api_calls", WindowStart: t0, Quantity: 10},
				{CustomerID: fmt.Sprintf("cust-%05d", i%customers), Feature: "tokens", WindowStart: t0, Quantity: 1500},
			}})
		want += 11
	}
	start = time.Now()
	e.run(func(o *Options) { o.DisableSync = true; o.FetchBatch = 500 })
	e.drained()
	took := time.Since(start)
	if got := e.fp.DistinctEvents(); got != want {
		t.Fatalf("%d events, want %d", got, want)
	}
	calls := len(e.fp.Calls("/v1/events/bulk"))
	t.Logf("usage: %d messages, %d events in %d bulk calls, %v from start to all acknowledged = %.0f events/s",
		messages, want, calls, took.Round(time.Millisecond), float64(want)/took.Seconds())
}

func envInt(name string, def int) int {
	var n int
	if _, err := fmt.Sscan(os.Getenv(name), &n); err != nil || n <= 0 {
		return def
	}
	return n
}
