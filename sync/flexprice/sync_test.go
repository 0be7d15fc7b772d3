package flexprice

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"testing"
	"time"

	fpt "github.com/gatehouse-dev/gatehouse/internal/flexpricetest"
	"github.com/gatehouse-dev/gatehouse/limiter"
)

// catalogue adds the features, two plans and an addon the tests use.
func (e *env) catalogue() map[string]fpt.Feature {
	f := map[string]fpt.Feature{}
	add := func(key, typ string, meter *fpt.Meter, cfg string) {
		ft := fpt.Feature{ID: "feat_" + key, LookupKey: key, Type: typ, Meter: meter}
		if cfg != "" {
			ft.ConfigValue = json.RawMessage(cfg)
		}
		f[key] = e.fp.AddFeature(ft)
	}
	add("api_calls", "metered", &fpt.Meter{EventName: "api_request", Aggregation: fpt.Aggregation{Type: "COUNT"}}, "")
	add("tokens", "metered", &fpt.Meter{EventName: "llm_usage", Aggregation: fpt.Aggregation{Type: "SUM", Field: "tokens"}}, "")
	add("exports", "metered", nil, "")
	add("analytics", "boolean", nil, "")
	add("sso", "boolean", nil, "")
	add("beta", "boolean", nil, "")
	add("support_tier", "static", nil, "")
	add("model_config", "config", nil, "")
	e.fp.SetEntitlements("plan", "plan_pro",
		fpt.Entitlement{FeatureID: "feat_api_calls", UsageLimit: fpt.Limit(1000), UsageResetPeriod: "MONTHLY"},
		fpt.Entitlement{FeatureID: "feat_tokens", UsageResetPeriod: "DAILY"}, // unlimited
		fpt.Entitlement{FeatureID: "feat_exports", UsageLimit: fpt.Limit(50), IsSoftLimit: true},
		fpt.Entitlement{FeatureID: "feat_analytics", IsEnabled: false},
		fpt.Entitlement{FeatureID: "feat_sso", IsEnabled: false},
		fpt.Entitlement{FeatureID: "feat_support_tier", StaticValue: "business hours"},
		fpt.Entitlement{FeatureID: "feat_model_config", ConfigValue: json.RawMessage(`{"model": "large"}`)})
	e.fp.SetEntitlements("plan", "plan_basic",
		fpt.Entitlement{FeatureID: "feat_api_calls", UsageLimit: fpt.Limit(100), UsageResetPeriod: "MONTHLY"},
		fpt.Entitlement{FeatureID: "feat_analytics", IsEnabled: false})
	e.fp.SetEntitlements("addon", "addon_boost",
		fpt.Entitlement{FeatureID: "feat_api_calls", UsageLimit: fpt.Limit(500)},
		fpt.Entitlement{FeatureID: "feat_exports", UsageLimit: fpt.Limit(10)},
		fpt.Entitlement{FeatureID: "feat_analytics", IsEnabled: true},
		fpt.Entitlement{FeatureID: "feat_support_tier", StaticValue: "24/7"})
	return f
}

// customer adds a customer on a plan, with its current period around t0.
func (e *env) customer(ext, plan string) fpt.Subscription {
	c := e.fp.AddCustomer(fpt.Customer{ExternalID: ext, Timezone: "Europe/Berlin"})
	return e.fp.AddSubscription(fpt.Subscription{CustomerID: c.ID, PlanID: plan,
		CurrentPeriodStart: t0.Add(-5 * 24 * time.Hour), CurrentPeriodEnd: t0.Add(25 * 24 * time.Hour)})
}

// acme is on plan_pro with addon_boost attached twice and three dated overrides: 250
// more api_calls until t0+2h, 100 more exports from t0+1h to t0+3h, and beta from t0+1h.
func (e *env) acme() fpt.Subscription {
	sub := e.customer("acme", "plan_pro")
	e.fp.AttachAddon(sub.ID, "addon_boost")
	e.fp.AttachAddon(sub.ID, "addon_boost")
	at := func(d time.Duration) *time.Time { t := t0.Add(d); return &t }
	e.fp.SetEntitlements("subscription", sub.ID,
		fpt.Entitlement{FeatureID: "feat_api_calls", UsageLimit: fpt.Limit(250), StartDate: at(-time.Hour), EndDate: at(2 * time.Hour)},
		fpt.Entitlement{FeatureID: "feat_exports", UsageLimit: fpt.Limit(100), StartDate: at(time.Hour), EndDate: at(3 * time.Hour)},
		fpt.Entitlement{FeatureID: "feat_beta", IsEnabled: true, StartDate: at(time.Hour)})
	return sub
}

func TestSnapshotAggregation(t *testing.T) {
	for _, perSource := range []bool{false, true} {
		t.Run(fmt.Sprintf("per_source=%v", perSource), func(t *testing.T) {
			e := newEnv(t, fpt.Options{PerSource: perSource})
			e.catalogue()
			e.acme()
			e.run(func(o *Options) { o.DisableUsage = true })

			d := e.snap("acme")
			if d == nil {
				t.Fatal("no snapshot for acme")
			}
			data, _ := json.Marshal(d)
			if _, err := limiter.ParseSnapshot(data); err != nil {
				t.Fatalf("ParseSnapshot: %v\n%s", err, data)
			}
			yes, no := true, false
			want := map[string]limiter.FeatureDoc{
				// plan 1000 + addon 500 twice + override 250; hard; the plan's reset period
				"api_calls": {Type: "metered", UsageLimit: ptr(int64(2250)), UsageResetPeriod: "MONTHLY"},
				// absent usage_limit: unlimited
				"tokens": {Type: "metered", UsageResetPeriod: "DAILY"},
				// plan 50 (soft) + addon 10 twice; soft is OR; the exports override has not started
				"exports":      {Type: "metered", UsageLimit: ptr(int64(70)), IsSoftLimit: true},
				"analytics":    {Type: "boolean", IsEnabled: &yes}, // plan false OR addon true
				"sso":          {Type: "boolean", IsEnabled: &no},
				"support_tier": {Type: "static", StaticValues: []string{"business hours", "24/7"}},
				"model_config": {Type: "config", ConfigValue: json.RawMessage(`{"model":"large"}`)},
			}
			if !reflect.DeepEqual(d.Features, want) {
				got, _ := json.MarshalIndent(d.Features, "", " ")
				t.Fatalf("features:\n%s", got)
			}
			b := d.Billing
			if b == nil || !b.PeriodStart.Equal(t0.Add(-5*24*time.Hour)) || b.PeriodEnd == nil ||
				!b.PeriodEnd.Equal(t0.Add(25*24*time.Hour)) || b.Interval != "MONTHLY" || b.Timezone != "Europe/Berlin" {
				t.Fatalf("billing %+v", b)
			}
			if d.UpdatedAt == nil || !d.UpdatedAt.Equal(t0) {
				t.Fatalf("updated_at %v, want the bridge clock's %v", d.UpdatedAt, t0)
			}
		})
	}
}

func ptr[T any](v T) *T { return &v }

func TestOverrideStartAndEndRefresh(t *testing.T) {
	for _, perSource := range []bool{false, true} {
		t.Run(fmt.Sprintf("per_source=%v", perSource), func(t *testing.T) { testOverrideRefresh(t, perSource) })
	}
}

func testOverrideRefresh(t *testing.T, perSource bool) {
	e := newEnv(t, fpt.Options{PerSource: perSource})
	e.catalogue()
	e.acme()
	e.run(func(o *Options) { o.DisableUsage = true })
	check := func(step string, api, exports int64, beta bool) {
		t.Helper()
		e.eventually(5*time.Second, step, func() bool {
			d := e.snap("acme")
			_, hasBeta := d.Features["beta"]
			return limit(d, "api_calls") == api && limit(d, "exports") == exports && hasBeta == beta
		})
	}
	check("start", 2250, 70, false)
	writes := e.metric("gatehouse_flexprice_kv_writes_total")
	// No webhook fires when an override starts or ends: only the schedule refreshes.
	e.clock.Advance(time.Hour + time.Second)
	check("exports override and beta begin", 2250, 170, true)
	e.clock.Advance(time.Hour)
	check("api_calls override ends", 2000, 170, true)
	e.clock.Advance(time.Hour)
	check("exports override ends", 2000, 70, true)
	if got := e.metric("gatehouse_flexprice_kv_writes_total") - writes; got != 3 {
		t.Fatalf("%v KV writes for 3 changes", got)
	}
	if e.metric("gatehouse_flexprice_scheduled_refreshes_total") < 3 {
		t.Fatal("refreshes were not scheduled")
	}
}

func TestPagedCustomersAndNoRewrite(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.catalogue()
	const n = 345
	for i := range n {
		e.customer(fmt.Sprintf("cust-%04d", i), "plan_basic")
	}
	e.run(func(o *Options) { o.PageSize = 50; o.DisableUsage = true })
	ids, err := e.store.customers(context.Background())
	if err != nil || len(ids) != n {
		t.Fatalf("%d customers in KV (%v), want %d", len(ids), err, n)
	}
	if calls := len(e.fp.Calls("/v1/customers")); calls != 7 {
		t.Fatalf("%d list calls, want 7 pages of 50", calls)
	}
	d := e.snap("cust-0299")
	data, _ := json.Marshal(d)
	if _, err := limiter.ParseSnapshot(data); err != nil || limit(d, "api_calls") != 100 {
		t.Fatalf("snapshot %s: %v", data, err)
	}
	if w := e.metric("gatehouse_flexprice_kv_writes_total"); w != n {
		t.Fatalf("%v writes", w)
	}
	// A second full sync, and a new bridge process, find nothing changed: no writes.
	if _, err := e.b.FullSync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if w := e.metric("gatehouse_flexprice_kv_writes_total"); w != n {
		t.Fatalf("%v writes after an unchanged full sync", w)
	}
	e.stop()
	e.run(func(o *Options) { o.PageSize = 1000; o.DisableUsage = true })
	if w := e.metric("gatehouse_flexprice_kv_writes_total"); w != 0 {
		t.Fatalf("a restarted bridge rewrote %v unchanged snapshots", w)
	}
}

func TestWebhookUpdatesReachKV(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.catalogue()
	sub := e.customer("globex", "plan_basic")
	e.run(func(o *Options) { o.DisableUsage = true })
	if got := limit(e.snap("globex"), "api_calls"); got != 100 {
		t.Fatalf("api_calls %d", got)
	}
	up, _ := e.fp.UpdateSubscription(sub.ID, func(s *fpt.Subscription) { s.PlanID = "plan_pro" })
	start := time.Now()
	e.fire("subscription.updated", up)
	e.eventually(5*time.Second, "upgrade in KV", func() bool { return limit(e.snap("globex"), "api_calls") == 1000 })
	t.Logf("subscription.updated reached KV in %v", time.Since(start))

	// A new customer, named by its Flexprice id only, appears at once.
	c := e.fp.AddCustomer(fpt.Customer{ExternalID: "initech"})
	e.fp.AddSubscription(fpt.Subscription{CustomerID: c.ID, PlanID: "plan_basic", CurrentPeriodStart: t0, CurrentPeriodEnd: t0.AddDate(0, 1, 0)})
	e.fire("customer.created", map[string]string{"id": c.ID})
	e.eventually(5*time.Second, "new customer in KV", func() bool { return e.snap("initech") != nil })
	if e.metric("gatehouse_flexprice_webhooks_received_total", `type="subscription.updated"`) != 1 {
		t.Fatal("webhook not counted by type")
	}
}

func TestPlanChangeFansOut(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.catalogue()
	for i := range 20 {
		e.customer(fmt.Sprintf("pro-%02d", i), "plan_pro")
	}
	for i := range 5 {
		e.customer(fmt.Sprintf("basic-%02d", i), "plan_basic")
	}
	sub := e.customer("boosted", "plan_basic")
	e.fp.AttachAddon(sub.ID, "addon_boost")
	e.run(func(o *Options) { o.DisableUsage = true })
	calls := len(e.fp.Calls("/v1/customers/external/entitlements"))

	ents := e.fp.SetEntitlements("plan", "plan_pro",
		fpt.Entitlement{FeatureID: "feat_api_calls", UsageLimit: fpt.Limit(5000), UsageResetPeriod: "MONTHLY"})
	e.fire("entitlement.updated", ents[0])
	e.eventually(5*time.Second, "every plan_pro customer updated", func() bool {
		for i := range 20 {
			if limit(e.snap(fmt.Sprintf("pro-%02d", i)), "api_calls") != 5000 {
				return false
			}
		}
		return true
	})
	if got := len(e.fp.Calls("/v1/customers/external/entitlements")) - calls; got != 20 {
		t.Fatalf("%d customers re-fetched for a plan with 20", got)
	}
	if limit(e.snap("basic-00"), "api_calls") != 100 {
		t.Fatal("a plan_basic customer changed")
	}

	// An addon change reaches the customer it is attached to.
	ents = e.fp.SetEntitlements("addon", "addon_boost", fpt.Entitlement{FeatureID: "feat_api_calls", UsageLimit: fpt.Limit(7)})
	e.fire("entitlement.updated", ents[0])
	e.eventually(5*time.Second, "addon change", func() bool { return limit(e.snap("boosted"), "api_calls") == 107 })
}

func TestCustomerDeletedLeavesKV(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.catalogue()
	for _, id := range []string{"a", "b", "c"} {
		e.customer(id, "plan_basic")
	}
	e.run(func(o *Options) { o.DisableUsage = true })
	gone, _ := e.fp.DeleteCustomer("a")
	e.fire("customer.deleted", gone)
	e.eventually(5*time.Second, "a deleted from KV", func() bool { return e.snap("a") == nil })

	// Without a webhook, the full sync finds b gone.
	e.fp.DeleteCustomer("b")
	if _, err := e.b.FullSync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if e.snap("b") != nil || e.snap("c") == nil {
		t.Fatal("full sync did not delete exactly the customer that is gone")
	}
	if d := e.metric("gatehouse_flexprice_kv_writes_total", `op="delete"`); d != 2 {
		t.Fatalf("%v deletes", d)
	}
}

func TestConfiguredCustomersAndAPIFaults(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.catalogue()
	for _, id := range []string{"x", "y", "z"} {
		e.customer(id, "plan_pro")
	}
	e.fp.FailNext("/v1/customers/external/x/entitlements", 2, 500)
	e.fp.RateLimitNext("/v1/customers/external/y/subscriptions", 1, "1")
	e.fp.SlowNext("/v1/customers/external/z/entitlements", 1, 3*time.Second) // past RequestTimeout
	e.run(func(o *Options) {
		o.Customers = []string{"x", "y", "z"}
		o.DisableUsage = true
		o.RequestTimeout = 500 * time.Millisecond
	})
	for _, id := range []string{"x", "y", "z"} {
		if limit(e.snap(id), "api_calls") != 1000 {
			t.Fatalf("%s not synced through the faults", id)
		}
	}
	if n := len(e.fp.Calls("/v1/customers")); n != 0 {
		t.Fatalf("listed customers %d times with a configured list", n)
	}
	if e.fp.PendingFaults() != 0 {
		t.Fatal("faults not consumed")
	}
	if e.metric("gatehouse_flexprice_api_errors_total", `class="5xx"`) != 2 ||
		e.metric("gatehouse_flexprice_api_errors_total", `class="4xx"`) != 1 ||
		e.metric("gatehouse_flexprice_api_errors_total", `class="timeout"`) < 1 {
		t.Fatal(e.get("/metrics"))
	}
	// The 429 held back its retry for Retry-After.
	var last time.Time
	for _, c := range e.fp.Calls("/v1/customers/external/subscriptions") {
		if c.Path != "/v1/customers/external/y/subscriptions" {
			continue
		}
		if !last.IsZero() && c.At.Sub(last) < 900*time.Millisecond {
			t.Fatalf("retried %v after a 429 with Retry-After: 1", c.At.Sub(last))
		}
		last = time.Time{}
		if c.Status == 429 {
			last = c.At
		}
	}
}

func TestFailedRefreshRetried(t *testing.T) {
	e := newEnv(t, fpt.Options{})
	e.catalogue()
	sub := e.customer("hooli", "plan_basic")
	e.run(func(o *Options) { o.DisableUsage = true; o.MaxAttempts = 2 })
	up, _ := e.fp.UpdateSubscription(sub.ID, func(s *fpt.Subscription) { s.PlanID = "plan_pro" })
	e.fp.FailNext("/v1/customers/external/hooli/entitlements", 2, 500) // the webhook's refresh gives up
	e.fire("subscription.updated", up)
	e.eventually(5*time.Second, "the failed refresh", func() bool { return e.fp.PendingFaults() == 0 })
	e.eventually(5*time.Second, "the retry scheduled", func() bool {
		e.b.sync.Load().mu.Lock()
		defer e.b.sync.Load().mu.Unlock()
		due, ok := e.b.sync.Load().sched.at["hooli"] // the period end's, until the retry's
		return ok && due.Before(t0.Add(time.Hour))
	})
	if limit(e.snap("hooli"), "api_calls") != 100 {
		t.Fatal("changed without a successful fetch")
	}
	e.clock.Advance(time.Second) // past MaxBackoff: the retry runs, without a webhook or full sync
	e.eventually(5*time.Second, "retry succeeded", func() bool { return limit(e.snap("hooli"), "api_calls") == 1000 })
}
