package flexpricetest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

func start(t *testing.T, o Options) *Server {
	t.Helper()
	s := New(o)
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func do(t *testing.T, s *Server, method, path, key string, body any, out any) int {
	t.Helper()
	var rd *bytes.Reader
	if body != nil {
		data, _ := json.Marshal(body)
		rd = bytes.NewReader(data)
	} else {
		rd = bytes.NewReader(nil)
	}
	req, _ := http.NewRequest(method, s.URL()+path, rd)
	if key != "" {
		req.Header.Set("x-api-key", key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if out != nil {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			t.Fatalf("%s %s: decode: %v", method, path, err)
		}
	}
	return resp.StatusCode
}

func TestAuthAndErrorShape(t *testing.T) {
	s := start(t, Options{APIKey: "sk_right"})
	for _, key := range []string{"", "sk_wrong"} {
		var e Error
		if code := do(t, s, "GET", "/customers", key, nil, &e); code != 401 {
			t.Fatalf("key %q: status %d, want 401", key, code)
		}
		if e.Code == "" || e.Message == "" || e.HTTPStatusCode != 401 {
			t.Fatalf("error body %+v", e)
		}
	}
	var e Error
	if code := do(t, s, "GET", "/customers/external/nobody/entitlements", "sk_right", nil, &e); code != 404 || e.HTTPStatusCode != 404 {
		t.Fatalf("unknown customer: %d %+v", code, e)
	}
}

func TestCustomersPaged(t *testing.T) {
	s := start(t, Options{})
	for i := range 25 {
		s.AddCustomer(Customer{ExternalID: fmt.Sprintf("c%02d", i)})
	}
	type page struct {
		Items      []Customer `json:"items"`
		Pagination struct{ Total, Limit, Offset int }
	}
	var got []string
	for off := 0; off < 25; off += 10 {
		var p page
		if code := do(t, s, "GET", fmt.Sprintf("/customers?limit=10&offset=%d", off), s.APIKey(), nil, &p); code != 200 {
			t.Fatalf("status %d", code)
		}
		if p.Pagination.Total != 25 || p.Pagination.Limit != 10 || p.Pagination.Offset != off {
			t.Fatalf("pagination %+v", p.Pagination)
		}
		for _, c := range p.Items {
			got = append(got, c.ExternalID)
		}
	}
	if len(got) != 25 || got[0] != "c00" || got[24] != "c24" {
		t.Fatalf("got %v", got)
	}
	if code := do(t, s, "GET", "/customers?limit=1001", s.APIKey(), nil, nil); code != 400 {
		t.Fatalf("limit 1001: %d", code)
	}
}

// Catalogue builds a customer with a plan, an addon attached twice and an override.
func catalogue(s *Server, now time.Time) (sub Subscription) {
	api := s.AddFeature(Feature{LookupKey: "api_calls", Type: "metered",
		Meter: &Meter{EventName: "api_request", Aggregation: Aggregation{Type: "COUNT"}}})
	flag := s.AddFeature(Feature{LookupKey: "analytics", Type: "boolean"})
	tier := s.AddFeature(Feature{LookupKey: "tier", Type: "static"})
	s.SetEntitlements("plan", "plan_pro",
		Entitlement{FeatureID: api.ID, UsageLimit: Limit(1000), UsageResetPeriod: "MONTHLY"},
		Entitlement{FeatureID: flag.ID, IsEnabled: false},
		Entitlement{FeatureID: tier.ID, StaticValue: "business"})
	s.SetEntitlements("addon", "addon_boost",
		Entitlement{FeatureID: api.ID, UsageLimit: Limit(500), IsSoftLimit: true},
		Entitlement{FeatureID: flag.ID, IsEnabled: true},
		Entitlement{FeatureID: tier.ID, StaticValue: "24/7"})
	c := s.AddCustomer(Customer{ExternalID: "acme"})
	sub = s.AddSubscription(Subscription{CustomerID: c.ID, PlanID: "plan_pro",
		CurrentPeriodStart: now.Add(-24 * time.Hour), CurrentPeriodEnd: now.Add(29 * 24 * time.Hour)})
	s.AttachAddon(sub.ID, "addon_boost")
	s.AttachAddon(sub.ID, "addon_boost")
	start, end := now.Add(time.Hour), now.Add(2*time.Hour)
	s.SetEntitlements("subscription", sub.ID,
		Entitlement{FeatureID: api.ID, UsageLimit: Limit(100), StartDate: &start, EndDate: &end})
	return sub
}

func TestEffectiveAggregation(t *testing.T) {
	now := time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)
	clock := now
	s := start(t, Options{Now: func() time.Time { return clock }})
	catalogue(s, now)
	get := func() map[string]AggregatedFeature {
		var r EntitlementsResponse
		if code := do(t, s, "GET", "/customers/external/acme/entitlements", s.APIKey(), nil, &r); code != 200 {
			t.Fatalf("status %d", code)
		}
		out := map[string]AggregatedFeature{}
		for _, f := range r.Features {
			out[f.Feature.LookupKey] = f
		}
		return out
	}
	f := get()
	api := f["api_calls"].Entitlement
	if api.UsageLimit == nil || *api.UsageLimit != 2000 || !api.IsSoftLimit || api.UsageResetPeriod != "MONTHLY" {
		t.Fatalf("api_calls before the override: %+v", api)
	}
	if n := len(f["api_calls"].Sources); n != 4 { // plan, addon twice, the upcoming override
		t.Fatalf("api_calls sources: %d", n)
	}
	if !f["analytics"].Entitlement.IsEnabled {
		t.Fatal("booleans are OR'd")
	}
	if got := strings.Join(f["tier"].Entitlement.StaticValues, ","); got != "business,24/7" {
		t.Fatalf("static values %q", got)
	}
	clock = now.Add(90 * time.Minute)
	if api := get()["api_calls"].Entitlement; *api.UsageLimit != 2100 {
		t.Fatalf("with the override: %d", *api.UsageLimit)
	}
	clock = now.Add(3 * time.Hour)
	if f := get()["api_calls"]; *f.Entitlement.UsageLimit != 2000 || len(f.Sources) != 3 {
		t.Fatalf("after the override: %+v", f)
	}
}

func TestBulkEventsDedupeAndFaults(t *testing.T) {
	s := start(t, Options{})
	ev := func(id string) Event {
		return Event{EventID: id, EventName: "api_request", ExternalCustomerID: "acme", Timestamp: "2026-11-22T10:00:00Z"}
	}
	body := map[string]any{"events": []Event{ev("a"), ev("b"), ev("c")}}
	if code := do(t, s, "POST", "/events/bulk", s.APIKey(), body, nil); code != 202 {
		t.Fatalf("status %d", code)
	}
	if code := do(t, s, "POST", "/events/bulk", s.APIKey(), body, nil); code != 202 {
		t.Fatalf("status %d", code)
	}
	if s.DistinctEvents() != 3 || s.Received() != 6 {
		t.Fatalf("distinct %d received %d", s.DistinctEvents(), s.Received())
	}
	s.RejectNextAt(1)
	var e Error
	body = map[string]any{"events": []Event{ev("d"), ev("e"), ev("f")}}
	if code := do(t, s, "POST", "/events/bulk", s.APIKey(), body, &e); code != 400 || e.Details["index"] != float64(1) {
		t.Fatalf("reject at 1: %d %+v", code, e)
	}
	if s.DistinctEvents() != 4 { // d accepted, e refused, f never looked at
		t.Fatalf("distinct %d", s.DistinctEvents())
	}
	s.FailNext("/v1/events/bulk", 2, 500)
	s.RateLimitNext("", 1, "2")
	for _, want := range []int{500, 500, 429, 202} {
		if code := do(t, s, "POST", "/events/bulk", s.APIKey(), body, nil); code != want {
			t.Fatalf("status %d, want %d", code, want)
		}
	}
	bad := ev("a")
	bad.Timestamp = "2026-11-22T10:00:01Z"
	do(t, s, "POST", "/events/bulk", s.APIKey(), map[string]any{"events": []Event{bad}}, nil)
	if c := s.Conflicts(); len(c) != 1 || c[0] != "a" {
		t.Fatalf("conflicts %v", c)
	}
}
