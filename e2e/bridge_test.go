package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	fpt "github.com/gatehouse-dev/gatehouse/internal/flexpricetest"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/flexprice"
	"github.com/gatehouse-dev/gatehouse/sync/replica"
	"github.com/gatehouse-dev/gatehouse/sync/usage"
	"github.com/nats-io/nats.go/jetstream"
)

// TestFlexpriceBridgeEndToEnd runs a Flexprice API (internal/flexpricetest), a sidecar
// with its embedded NATS (DESIGN.md section 9) and the bridge configured from the same
// file's flexprice section, with api_calls sent as count-mode events:
//
//   - a customer defined in Flexprice becomes a snapshot in KV (the bridge's sync);
//   - the sidecar admits a request for it, and its usage becomes exactly one event at
//     Flexprice;
//   - a boolean feature switched off in the plan, announced by a webhook, reaches the
//     sidecar's decision (403 feature_not_entitled), and refused requests send nothing.
func TestFlexpriceBridgeEndToEnd(t *testing.T) {
	now := time.Now().UTC()
	fp := fpt.New(fpt.Options{APIKey: "sk_e2e_bridge"})
	if err := fp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fp.Close)
	calls := fp.AddFeature(fpt.Feature{LookupKey: fCalls, Type: "metered",
		Meter: &fpt.Meter{EventName: "api_request", Aggregation: fpt.Aggregation{Type: "COUNT"}}})
	beta := fp.AddFeature(fpt.Feature{LookupKey: fBeta, Type: "boolean"})
	plan := func(betaOn bool) []fpt.Entitlement {
		return fp.SetEntitlements("plan", "plan_pro",
			fpt.Entitlement{FeatureID: calls.ID, UsageLimit: fpt.Limit(1000), UsageResetPeriod: "MONTHLY"},
			fpt.Entitlement{FeatureID: beta.ID, IsEnabled: betaOn})
	}
	plan(true)
	acme := fp.AddCustomer(fpt.Customer{ExternalID: "acme"})
	fp.AddSubscription(fpt.Subscription{CustomerID: acme.ID, PlanID: "plan_pro",
		CurrentPeriodStart: now.Add(-24 * time.Hour), CurrentPeriodEnd: now.Add(29 * 24 * time.Hour)})

	t.Setenv("GH_E2E_FLEXPRICE_KEY", fp.APIKey())
	log, _ := testLogger(t)
	cfg := sidecarConfig(t, testutil.Echo(t), filepath.Join(t.TempDir(), "data"), "", fmt.Sprintf(`
flexprice:
  api_url: %q
  api_key_env: GH_E2E_FLEXPRICE_KEY
  sync_interval: 1h
  webhook_listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
  features:
    api_calls: {event_name: api_request, mode: count}
`, fp.URL()))
	sc := startSidecar(t, cfg, log, nil)
	if !sc.NATS.Embedded() {
		t.Fatal("the sidecar did not start its embedded NATS")
	}

	// The bridge, as `gatehouse bridge flexprice` builds it, against the sidecar's NATS.
	opts, err := flexprice.OptionsFromConfig(cfg.Flexprice)
	if err != nil {
		t.Fatal(err)
	}
	js := connectJS(t, sc.NATS.ClientURL())
	opts.JetStream, opts.Logger, opts.StreamReplicas = js, log, cfg.Usage.StreamReplicas
	opts.FetchWait = 200 * time.Millisecond
	b, err := flexprice.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("bridge Run: %v", err)
		}
	})
	eventually(t, 30*time.Second, "bridge ready", b.Ready)

	// The customer is a snapshot in KV.
	kctx, kcancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer kcancel()
	kv, err := js.KeyValue(kctx, replica.DefaultBucket)
	if err != nil {
		t.Fatal(err)
	}
	entry, err := kv.Get(kctx, replica.KeyFor("acme"))
	if err != nil {
		t.Fatalf("acme in KV: %v", err)
	}
	snap, err := limiter.ParseSnapshot(entry.Value())
	if err != nil {
		t.Fatalf("acme's snapshot: %v\n%s", err, entry.Value())
	}
	if f := snap.Features[fCalls]; f == nil || f.Unlimited || f.Limit != 1000 || f.Soft {
		t.Fatalf("acme's api_calls: %+v\n%s", f, entry.Value())
	}
	if f := snap.Features[fBeta]; f == nil || !f.Enabled {
		t.Fatalf("acme's beta: %+v\n%s", f, entry.Value())
	}

	// The sidecar's replica picks it up, and admits a request.
	sc.waitReady(t)
	eventually(t, 30*time.Second, "acme known to the sidecar", func() bool {
		st, _ := sc.decision(betaReq("acme"))
		return st == 200
	})
	sc.must(t, callsReq("acme"), 200, "")
	sc.flush(t)
	events := waitEvents(t, fp, js, 1)
	e := events[0]
	if e.EventName != "api_request" || e.ExternalCustomerID != "acme" || e.Source != flexprice.EventSource ||
		!strings.HasSuffix(e.EventID, "/0/0") || e.Timestamp == "" {
		t.Fatalf("event %+v", e)
	}

	// Switch beta off in the plan; Flexprice announces it with a webhook.
	ents := plan(false)
	if err := fpt.Fire(context.Background(), b.WebhookURL(), "entitlement.updated", ents[1]); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "beta switched off reaching the sidecar", func() bool {
		st, reason := sc.decision(betaReq("acme"))
		return st == 403 && reason == "feature_not_entitled"
	})
	sc.must(t, betaReq("acme"), 403, "feature_not_entitled")
	// api_calls is still entitled: one more event, and none for the refusals.
	sc.must(t, callsReq("acme"), 200, "")
	sc.flush(t)
	events = waitEvents(t, fp, js, 2)
	if events[0].EventID == events[1].EventID {
		t.Fatalf("two units under one event id: %+v", events)
	}
	if c := fp.Conflicts(); len(c) > 0 {
		t.Fatalf("event ids sent with two timestamps: %v", c)
	}
}

// waitEvents waits until the bridge's consumer has processed every usage message and
// Flexprice holds at least n distinct events, then requires exactly n, each received
// once.
func waitEvents(t *testing.T, fp *fpt.Server, js jetstream.JetStream, n int) []fpt.Event {
	t.Helper()
	eventually(t, 30*time.Second, fmt.Sprintf("%d events at Flexprice", n), func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := js.Consumer(ctx, usage.Stream, flexprice.ConsumerName)
		if err != nil {
			return false
		}
		info, err := c.Info(ctx)
		if err != nil {
			return false
		}
		return info.NumPending == 0 && info.NumAckPending == 0 && fp.DistinctEvents() >= n
	})
	events := fp.Events()
	if len(events) != n || fp.Received() != n {
		t.Fatalf("Flexprice holds %d distinct events (%d received), want %d: %+v", len(events), fp.Received(), n, events)
	}
	return events
}
