package limiter

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// designExample is the snapshot of DESIGN.md section 3, with a real key hash.
const designExample = `{
  "customer_id": "cust_acme",
  "updated_at": "2026-11-22T10:00:00Z",
  "billing": {"period_start": "2026-11-05T00:00:00Z", "period_end": "2026-12-05T00:00:00Z",
              "interval": "MONTHLY", "timezone": "UTC"},
  "features": {
    "api_calls":          {"type": "metered", "usage_limit": 1000, "is_soft_limit": false,
                           "usage_reset_period": "MONTHLY"},
    "tokens":             {"type": "metered", "usage_limit": null, "usage_reset_period": "DAILY"},
    "exports":            {"type": "metered", "usage_limit": 50, "is_soft_limit": true},
    "advanced_analytics": {"type": "boolean", "is_enabled": true},
    "support_tier":       {"type": "static", "static_values": ["24/7"]}
  },
  "api_keys_sha256": ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
}`

func TestParseSnapshotDesignExample(t *testing.T) {
	s, err := ParseSnapshot([]byte(designExample))
	if err != nil {
		t.Fatal(err)
	}
	if s.CustomerID != "cust_acme" || !s.UpdatedAt.Equal(time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)) || s.Revision != 0 {
		t.Errorf("snapshot header = %q %v %d", s.CustomerID, s.UpdatedAt, s.Revision)
	}
	wantBilling := Billing{
		PeriodStart: time.Date(2026, 11, 5, 0, 0, 0, 0, time.UTC), PeriodEnd: time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC),
		Interval: Monthly, Location: time.UTC,
	}
	if b := s.Billing; !b.PeriodStart.Equal(wantBilling.PeriodStart) || !b.PeriodEnd.Equal(wantBilling.PeriodEnd) || b.Interval != Monthly || b.Location != time.UTC {
		t.Errorf("billing = %+v", b)
	}
	sum := sha256.Sum256([]byte("test"))
	if len(s.APIKeys) != 1 || s.APIKeys[0] != sum {
		t.Errorf("api keys = %x, want sha256(test)", s.APIKeys)
	}
	want := map[string]*Feature{
		"api_calls":          {Key: "api_calls", Type: Metered, Enabled: true, Limit: 1000, Reset: Monthly},
		"tokens":             {Key: "tokens", Type: Metered, Enabled: true, Unlimited: true, Reset: Daily},
		"exports":            {Key: "exports", Type: Metered, Enabled: true, Limit: 50, Soft: true, Reset: BillingPeriod},
		"advanced_analytics": {Key: "advanced_analytics", Type: Boolean, Enabled: true, Unlimited: true},
		"support_tier":       {Key: "support_tier", Type: Static, Enabled: true, Unlimited: true, StaticValues: []string{"24/7"}, HeaderValue: "24/7"},
	}
	if len(s.Features) != len(want) {
		t.Errorf("%d features, want %d", len(s.Features), len(want))
	}
	for k, w := range want {
		checkFeature(t, k, s.Feature(k), w)
	}
	if s.Feature("absent") != nil {
		t.Error("Feature(absent) is not nil")
	}
}

// checkFeature compares the decoded fields of a feature.
func checkFeature(t *testing.T, key string, got, want *Feature) {
	t.Helper()
	if got == nil {
		t.Errorf("%s: missing", key)
		return
	}
	g, w := got, want
	if g.Key != w.Key || g.Type != w.Type || g.Enabled != w.Enabled || g.Unlimited != w.Unlimited || g.Limit != w.Limit ||
		g.Soft != w.Soft || g.Reset != w.Reset || !reflect.DeepEqual(g.StaticValues, w.StaticValues) ||
		!bytes.Equal(g.ConfigValue, w.ConfigValue) || g.HeaderValue != w.HeaderValue {
		t.Errorf("%s = %+v\nwant %+v", key, describe(got), describe(want))
	}
}

// describe is a feature without its window cache, for messages.
func describe(f *Feature) string {
	return strings.Join([]string{f.Key, f.Type.String(), boolStr(f.Enabled, "enabled"), boolStr(f.Unlimited, "unlimited"),
		jsonStr(f.Limit), boolStr(f.Soft, "soft"), f.Reset.String(), jsonStr(f.StaticValues), string(f.ConfigValue), f.HeaderValue}, " ")
}

func boolStr(b bool, s string) string {
	if b {
		return s
	}
	return "!" + s
}

func jsonStr(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func TestParseSnapshotDefaults(t *testing.T) {
	s, err := ParseSnapshot([]byte(`{"customer_id": "c1", "features": {
		"b":  {"type": "boolean"},
		"m":  {"type": "metered"},
		"st": {"type": "static", "static_values": ["gold", "24/7", "eu-west"]},
		"st0": {"type": "static"},
		"cf": {"type": "config", "config_value": {"models": ["a", "b"],
		        "max": 3, "nested": {"k": "v w"}}},
		"cs": {"type": "config", "config_value": "plain"},
		"m_off": {"type": "metered", "is_enabled": false},
		"b_on": {"type": "boolean", "is_enabled": true}
	}}`))
	if err != nil {
		t.Fatal(err)
	}
	// No billing section: calendar months in UTC from 1970.
	if b := s.Billing; !b.PeriodStart.Equal(time.Unix(0, 0)) || !b.PeriodEnd.IsZero() || b.Interval != Monthly || b.Location != time.UTC {
		t.Errorf("default billing = %+v", b)
	}
	if !s.UpdatedAt.IsZero() || s.APIKeys != nil {
		t.Errorf("updated_at %v, keys %v", s.UpdatedAt, s.APIKeys)
	}
	for k, w := range map[string]*Feature{
		"b":     {Key: "b", Type: Boolean, Enabled: false, Unlimited: true},
		"b_on":  {Key: "b_on", Type: Boolean, Enabled: true, Unlimited: true},
		"m":     {Key: "m", Type: Metered, Enabled: true, Unlimited: true},
		"m_off": {Key: "m_off", Type: Metered, Enabled: false, Unlimited: true},
		"st":    {Key: "st", Type: Static, Enabled: true, Unlimited: true, StaticValues: []string{"gold", "24/7", "eu-west"}, HeaderValue: "gold, 24/7, eu-west"},
		"st0":   {Key: "st0", Type: Static, Enabled: true, Unlimited: true},
		"cf": {Key: "cf", Type: Config, Enabled: true, Unlimited: true,
			ConfigValue: []byte(`{"models":["a","b"],"max":3,"nested":{"k":"v w"}}`), HeaderValue: `{"models":["a","b"],"max":3,"nested":{"k":"v w"}}`},
		"cs": {Key: "cs", Type: Config, Enabled: true, Unlimited: true, ConfigValue: []byte(`"plain"`), HeaderValue: `"plain"`},
	} {
		checkFeature(t, k, s.Feature(k), w)
	}
}

func TestParseSnapshotIgnoresUnknownFields(t *testing.T) {
	s, err := ParseSnapshot([]byte(`{"customer_id": "c1", "plan": "pro", "metadata": {"a": [1, {"b": null}]},
		"billing": {"period_start": "2026-11-05T00:00:00Z", "currency": "usd"},
		"features": {"m": {"type": "metered", "usage_limit": 3, "entitlement_id": "ent_1", "feature_name": "M"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	if f := s.Feature("m"); f == nil || f.Limit != 3 {
		t.Errorf("feature m = %v", f)
	}
}

func TestParseSnapshotTrailingWhitespace(t *testing.T) {
	if _, err := ParseSnapshot([]byte(" \n\t" + designExample + "\r\n \t")); err != nil {
		t.Errorf("surrounding whitespace: %v", err)
	}
}

func TestParseSnapshotRejects(t *testing.T) {
	valid := func(features string) string {
		return `{"customer_id": "c1", "features": {` + features + `}}`
	}
	cases := []struct {
		name string
		doc  string
		want []string // each in the error text
	}{
		{"not json", `{"customer_id": `, []string{"decode snapshot"}},
		{"not an object", `["c1"]`, []string{"decode snapshot"}},
		{"empty input", ``, []string{"decode snapshot"}},
		{"wrong field type", valid(`"m": {"type": "metered", "usage_limit": "10"}`), []string{"decode snapshot"}},
		{"fractional limit", valid(`"m": {"type": "metered", "usage_limit": 1.5}`), []string{"decode snapshot"}},
		{"limit out of range", valid(`"m": {"type": "metered", "usage_limit": 9223372036854775808}`), []string{"decode snapshot"}},
		{"trailing object", valid(``) + `{}`, []string{"trailing data"}},
		{"trailing garbage", valid(``) + ` x`, []string{"trailing data"}},
		{"trailing brace", valid(``) + `}`, []string{"trailing data"}},
		{"trailing bracket", valid(``) + `]`, []string{"trailing data"}},
		{"too large", valid(`"m": {"type": "metered", "x": "` + strings.Repeat("a", MaxSnapshotBytes) + `"}`), []string{"more than the 1048576 allowed"}},
		{"customer id missing", `{"features": {}}`, []string{"customer_id: required"}},
		{"customer id with space", `{"customer_id": "cust acme", "features": {}}`, []string{"customer_id: byte 4"}},
		{"customer id with CRLF", `{"customer_id": "cust\r\nX-Evil: 1", "features": {}}`, []string{"customer_id: byte 4"}},
		{"customer id non-ASCII", `{"customer_id": "cüst", "features": {}}`, []string{"customer_id: byte 1"}},
		{"customer id too long", `{"customer_id": "` + strings.Repeat("c", MaxIDLen+1) + `", "features": {}}`, []string{"customer_id: longer than 256"}},
		{"bad type", valid(`"m": {"type": "counter"}`), []string{`features.m.type: must be one of boolean, metered, static, config (got "counter")`}},
		{"type missing", valid(`"m": {}`), []string{`features.m.type: must be one of`}},
		{"type in upper case", valid(`"m": {"type": "METERED"}`), []string{`features.m.type`}},
		{"negative limit", valid(`"m": {"type": "metered", "usage_limit": -1}`), []string{"features.m.usage_limit: must be >= 0 or null for unlimited (got -1)"}},
		{"limit on boolean", valid(`"b": {"type": "boolean", "usage_limit": 5}`), []string{"features.b.usage_limit: only metered features have a usage limit"}},
		{"limit on static", valid(`"s": {"type": "static", "usage_limit": 0}`), []string{"features.s.usage_limit: only metered"}},
		{"soft limit on boolean", valid(`"b": {"type": "boolean", "is_soft_limit": true}`), []string{"features.b.is_soft_limit"}},
		{"bad reset period", valid(`"m": {"type": "metered", "usage_reset_period": "HOURLY"}`), []string{`features.m.usage_reset_period: must be one of`, `"HOURLY"`}},
		{"reset period in lower case", valid(`"m": {"type": "metered", "usage_reset_period": "monthly"}`), []string{`features.m.usage_reset_period`}},
		{"bad feature key", valid(`"bad key": {"type": "boolean"}`), []string{`features.bad key: feature key "bad key": byte 3`}},
		{"empty feature key", valid(`"": {"type": "boolean"}`), []string{"feature key is empty"}},
		{"control char in static value", valid(`"s": {"type": "static", "static_values": ["ok", "24/7\r\nX-Evil: 1"]}`), []string{"features.s.static_values[1]: byte 4 is a control character"}},
		{"NUL in static value", valid(`"s": {"type": "static", "static_values": ["a\u0000"]}`), []string{"features.s.static_values[0]: byte 1"}},
		{"DEL in static value", valid(`"s": {"type": "static", "static_values": ["a\u007f"]}`), []string{"features.s.static_values[0]: byte 1"}},
		{"static value too long", valid(`"s": {"type": "static", "static_values": ["` + strings.Repeat("v", 4097) + `"]}`), []string{"static_values[0]: longer than 4096"}},
		{"config without value", valid(`"c": {"type": "config"}`), []string{"features.c.config_value: required"}},
		{"config value too long", valid(`"c": {"type": "config", "config_value": "` + strings.Repeat("v", 4096) + `"}`), []string{"features.c.config_value: longer than 4096"}},
		{"bad timezone", `{"customer_id": "c1", "billing": {"period_start": "2026-11-05T00:00:00Z", "timezone": "Mars/Olympus_Mons"}, "features": {}}`, []string{`billing.timezone: unknown time zone "Mars/Olympus_Mons"`}},
		{"period_start missing", `{"customer_id": "c1", "billing": {"interval": "MONTHLY"}, "features": {}}`, []string{"billing.period_start: required"}},
		{"period_end before start", `{"customer_id": "c1", "billing": {"period_start": "2026-11-05T00:00:00Z", "period_end": "2026-11-05T00:00:00Z"}, "features": {}}`, []string{"billing.period_end: must be after period_start"}},
		{"interval NEVER", `{"customer_id": "c1", "billing": {"period_start": "2026-11-05T00:00:00Z", "interval": "NEVER"}, "features": {}}`, []string{"billing.interval"}},
		{"interval BILLING_PERIOD", `{"customer_id": "c1", "billing": {"period_start": "2026-11-05T00:00:00Z", "interval": "BILLING_PERIOD"}, "features": {}}`, []string{"billing.interval"}},
		{"bad interval", `{"customer_id": "c1", "billing": {"period_start": "2026-11-05T00:00:00Z", "interval": "FORTNIGHTLY"}, "features": {}}`, []string{"billing.interval"}},
		{"bad time", `{"customer_id": "c1", "billing": {"period_start": "yesterday"}, "features": {}}`, []string{"decode snapshot"}},
		{"api key hash too short", `{"customer_id": "c1", "features": {}, "api_keys_sha256": ["9f86d081884c7d65"]}`, []string{"api_keys_sha256[0]: must be 64 hex digits"}},
		{"api key hash not hex", `{"customer_id": "c1", "features": {}, "api_keys_sha256": ["` + hex.EncodeToString(make([]byte, 32)) + `", "` + strings.Repeat("zz", 32) + `"]}`, []string{"api_keys_sha256[1]: must be 64 hex digits"}},
		{"every problem reported", `{"customer_id": "c 1", "features": {"a": {"type": "x"}, "b": {"type": "metered", "usage_limit": -2}}}`,
			[]string{`invalid snapshot for "c 1"`, "customer_id:", "features.a.type", "features.b.usage_limit"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := ParseSnapshot([]byte(tc.doc))
			if err == nil {
				t.Fatalf("accepted: %+v", s)
			}
			if s != nil {
				t.Errorf("returned a snapshot with the error %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\ndoes not contain %q", err, w)
				}
			}
		})
	}
}

func TestSnapshotErrorUnwraps(t *testing.T) {
	_, err := ParseSnapshot([]byte(`{"customer_id": "c1", "features": {"a": {"type": "x"}, "b": {"type": "static", "usage_limit": 1}}}`))
	var se *SnapshotError
	if !errors.As(err, &se) {
		t.Fatalf("error %T is not a *SnapshotError", err)
	}
	if se.CustomerID != "c1" || len(se.Problems) != 2 {
		t.Errorf("SnapshotError = %q with %d problems: %v", se.CustomerID, len(se.Problems), se.Problems)
	}
}

// TestSnapshotDocRoundTrip re-encodes the design example through Doc.
func TestSnapshotDocRoundTrip(t *testing.T) {
	s, err := ParseSnapshot([]byte(designExample))
	if err != nil {
		t.Fatal(err)
	}
	checkRoundTrip(t, s)
}

// checkRoundTrip encodes s through Doc, parses it back and compares.
func checkRoundTrip(t *testing.T, s *Snapshot) {
	t.Helper()
	data, err := json.Marshal(s.Doc())
	if err != nil {
		t.Fatalf("accepted snapshot does not re-encode: %v", err)
	}
	s2, err := ParseSnapshot(data)
	if err != nil {
		t.Fatalf("re-encoded snapshot is rejected: %v\n%s", err, data)
	}
	if diff := snapshotDiff(s, s2); diff != "" {
		t.Fatalf("re-parsed snapshot differs: %s\n%s", diff, data)
	}
}

// snapshotDiff describes how two snapshots differ in what the limiter and the proxy
// use; "" when they are equivalent.
func snapshotDiff(a, b *Snapshot) string {
	switch {
	case a.CustomerID != b.CustomerID:
		return "customer_id"
	case !a.UpdatedAt.Equal(b.UpdatedAt):
		return "updated_at"
	case !a.Billing.PeriodStart.Equal(b.Billing.PeriodStart) || !a.Billing.PeriodEnd.Equal(b.Billing.PeriodEnd):
		return "billing period"
	case a.Billing.Interval != b.Billing.Interval:
		return "billing interval"
	case a.Billing.Location.String() != b.Billing.Location.String():
		return "billing timezone"
	case !reflect.DeepEqual(a.APIKeys, b.APIKeys):
		return "api keys"
	case len(a.Features) != len(b.Features):
		return "feature count"
	}
	for k, fa := range a.Features {
		fb := b.Features[k]
		switch {
		case fb == nil:
			return "feature " + k + " lost"
		case fa.Key != fb.Key || fa.Type != fb.Type || fa.Enabled != fb.Enabled || fa.Unlimited != fb.Unlimited || fa.Soft != fb.Soft:
			return "feature " + k
		case !fa.Unlimited && fa.Limit != fb.Limit:
			return "feature " + k + " limit"
		case fa.Type == Metered && fa.Reset != fb.Reset:
			return "feature " + k + " reset period"
		case len(fa.StaticValues) != len(fb.StaticValues) || len(fa.StaticValues) > 0 && !reflect.DeepEqual(fa.StaticValues, fb.StaticValues):
			return "feature " + k + " static values"
		case !bytes.Equal(fa.ConfigValue, fb.ConfigValue) || fa.HeaderValue != fb.HeaderValue:
			return "feature " + k + " header value"
		}
	}
	return ""
}

// TestSnapshotDocExtremeTimes holds valid RFC 3339 times that ParseSnapshot accepts but
// that, moved into the billing time zone, either fall outside the years 0 to 9999 that
// encoding/json can write, or get an offset with seconds that RFC 3339 cannot write
// (local mean time before 1893 in Berlin; Amsterdam kept +00:19:32 until 1937, within the
// years ParseSnapshot accepts). Each must re-encode through Doc, or be rejected. Found
// with FuzzParseSnapshot's round-trip property.
func TestSnapshotDocExtremeTimes(t *testing.T) {
	cases := []struct{ name, doc string }{
		{"local mean time", `{"customer_id": "c1", "billing": {"period_start": "1850-01-01T00:00:00Z", "timezone": "Europe/Berlin"}, "features": {}}`},
		{"Amsterdam time, +00:19:32 until 1937", `{"customer_id": "c1", "billing": {"period_start": "1920-01-01T00:00:00Z", "timezone": "Europe/Amsterdam"}, "features": {}}`},
		{"year -1 in UTC", `{"customer_id": "c1", "billing": {"period_start": "0000-01-01T00:00:00+00:01"}, "features": {}}`},
		{"year 10000 in the zone", `{"customer_id": "c1", "billing": {"period_start": "9999-12-31T20:00:00Z", "timezone": "Pacific/Kiritimati"}, "features": {}}`},
		{"period_end in year 10000", `{"customer_id": "c1", "billing": {"period_start": "2026-01-01T00:00:00Z", "period_end": "9999-12-31T23:59:59-01:00"}, "features": {}}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := ParseSnapshot([]byte(tc.doc))
			if err != nil {
				return // rejecting it is a fine fix too
			}
			checkRoundTrip(t, s)
		})
	}
}

func FuzzParseSnapshot(f *testing.F) {
	f.Add([]byte(designExample))
	f.Add([]byte(`{"customer_id": "c1", "features": {"cf": {"type": "config", "config_value": {"a": [1, 2.5e3, null]}}, "b": {"type": "boolean"}}}`))
	f.Add([]byte(`{"customer_id": "c1", "billing": {"period_start": "2026-03-29T01:30:00+01:00", "interval": "WEEKLY", "timezone": "Europe/Berlin"},` +
		`"features": {"m": {"type": "metered", "usage_limit": 0, "is_soft_limit": true, "usage_reset_period": "NEVER", "static_values": ["x"]}}}`))
	f.Add([]byte(`{"customer_id": "c1", "features": {"s": {"type": "static", "static_values": ["\ud800", "a\tb"]}}, "unknown": [1]}`))
	f.Add([]byte(`{"customer_id": "c1", "features": null, "api_keys_sha256": ["9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"]}`))
	f.Add([]byte(`{"customer_id": "c1", "features": {}}}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := ParseSnapshot(data)
		if err != nil {
			if s != nil {
				t.Fatalf("snapshot and error %v", err)
			}
			return
		}
		for k, f := range s.Features {
			if f.Key != k || CheckFeatureKey(k) != nil {
				t.Fatalf("feature %q has key %q", k, f.Key)
			}
			if checkHeaderValue(f.HeaderValue) != nil {
				t.Fatalf("feature %q: header value %q can break out of a header", k, f.HeaderValue)
			}
			if f.Type == Metered && !f.Unlimited && f.Limit < 0 {
				t.Fatalf("feature %q: limit %d", k, f.Limit)
			}
		}
		if CheckCustomerID(s.CustomerID) != nil {
			t.Fatalf("customer id %q accepted", s.CustomerID)
		}
		checkRoundTrip(t, s)
	})
}
