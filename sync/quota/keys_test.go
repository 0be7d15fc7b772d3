package quota

import (
	"strings"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

func TestKeys(t *testing.T) {
	for _, tc := range []struct {
		name string
		k    limiter.CounterKey
		want string
	}{
		{"plain", limiter.CounterKey{Customer: "cust_acme", Feature: "api_calls", WindowStart: 1762300800000000000}, "pcust_acme.papi_calls.1762300800000000000"},
		{"dots and colons", limiter.CounterKey{Customer: "acme.corp", Feature: "llm:tokens", WindowStart: 5}, "bYWNtZS5jb3Jw.bbGxtOnRva2Vucw.5"},
		{"quotes and wildcards", limiter.CounterKey{Customer: `a"b"*>`, Feature: "x", WindowStart: 0}, "bYSJiIio-.px.0"},
		{"before 1970", limiter.CounterKey{Customer: "c", Feature: "f", WindowStart: -86400}, "pc.pf.-86400"},
		{"slash and equals", limiter.CounterKey{Customer: "org/team=1", Feature: "f-1", WindowStart: 1}, "porg/team=1.pf-1.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Key(tc.k)
			if got != tc.want {
				t.Errorf("Key = %q, want %q", got, tc.want)
			}
			back, err := ParseKey(got)
			if err != nil || back != tc.k {
				t.Errorf("ParseKey(%q) = %+v, %v", got, back, err)
			}
		})
	}
	for _, bad := range []string{"", "pc.pf", "pc.pf.1.2", "xc.pf.1", "pc.pf.+1", "pc.pf.01", "bYw.pf.1", "p.pf.1", "pc.pf.x"} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) accepted", bad)
		}
	}
}

func FuzzKey(f *testing.F) {
	f.Add("cust_acme", "api_calls", int64(1762300800000000000))
	f.Add("a.b", "x:y", int64(-1))
	f.Add(`"*>`, "f", int64(0))
	f.Fuzz(func(t *testing.T, customer, feature string, start int64) {
		k := limiter.CounterKey{Customer: customer, Feature: feature, WindowStart: start}
		valid := limiter.CheckCustomerID(customer) == nil && limiter.CheckFeatureKey(feature) == nil
		key := Key(k)
		if strings.Count(key, ".") != 2 {
			t.Fatalf("Key(%+v) = %q: not 3 tokens", k, key)
		}
		for i := 0; i < len(key); i++ {
			c := key[i]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-/_=.", c) >= 0) {
				t.Fatalf("Key(%+v) = %q: byte %q is not allowed in a KV key", k, key, c)
			}
		}
		back, err := ParseKey(key)
		if valid && (err != nil || back != k) {
			t.Fatalf("ParseKey(Key(%+v)) = %+v, %v", k, back, err)
		}
		if !valid && err == nil {
			t.Fatalf("ParseKey accepted the key of an invalid counter %+v", k)
		}
	})
}

func TestSaved(t *testing.T) {
	s := saved{end: limiter.NeverEnds, grant: 1234, limit: 10000, rev: 42}
	got, err := decodeSaved(s.encode())
	if err != nil || got != s {
		t.Errorf("round trip: %+v, %v", got, err)
	}
	if _, err := decodeSaved([]byte{1, 2}); err == nil {
		t.Error("a short value decoded")
	}
}

func TestValue(t *testing.T) {
	k := limiter.CounterKey{Customer: "c", Feature: "f", WindowStart: time.Date(2026, 11, 5, 0, 0, 0, 0, time.UTC).UnixNano()}
	v := newValue(k, time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC).UnixNano())
	v.Limit, v.LimitRevision = 100, 7
	v.setGrant("a", 30)
	v.setGrant("b", 20)
	v.setGrant("a", 10)
	v.setGrant("c", 0)
	if v.Granted != 30 || len(v.Sidecars) != 2 || v.holders("a") != 2 || v.holders("z") != 3 {
		t.Fatalf("value %+v", v)
	}
	back, err := decodeValue(v.encode())
	if err != nil || back.Granted != 30 || back.Sidecars["b"] != 20 || back.Limit != 100 || back.LimitRevision != 7 || !back.WindowEnd.Equal(*v.WindowEnd) {
		t.Errorf("round trip %+v, %v", back, err)
	}
	// Granted is recomputed from the grants, which are the truth.
	if w, err := decodeValue([]byte(`{"limit":5,"granted":1,"sidecars":{"a":2,"b":2}}`)); err != nil || w.Granted != 4 {
		t.Errorf("granted from grants: %+v, %v", w, err)
	}
	for _, bad := range []string{`{"sidecars":{"a":-1}}`, `[`, `{"limit":"x"}`, `{"sidecars":{"a":9223372036854775807,"b":1}}`} {
		if _, err := decodeValue([]byte(bad)); err == nil {
			t.Errorf("decodeValue(%s) accepted", bad)
		}
	}
	never := newValue(k, limiter.NeverEnds)
	if never.WindowEnd != nil {
		t.Errorf("a window that never ends has an end")
	}
}

func TestLeaseSize(t *testing.T) {
	const period = 2 * time.Second
	for _, tc := range []struct {
		name                          string
		rate                          float64
		free, holders, need, min, max int64
		keep                          int64 // what the recent rate uses while a refill is under way
		want                          int64
	}{
		{"no rate yet: a share of what is left", 0, 1_000_000, 1, 1, 10, 100_000, 0, 62_500},
		{"no rate yet, little left: min lease", 0, 100, 1, 1, 10, 100_000, 0, 10},
		{"a share of what is left, 4 sidecars", 0, 10_000, 4, 1, 10, 100_000, 0, 156},
		{"rate times period", 1000, 100_000, 4, 1, 10, 100_000, 0, 2000},
		{"rate times period below the share of what is left", 1000, 1_000_000, 4, 1, 10, 100_000, 0, 15_625},
		{"max lease", 1e9, 1e12, 4, 1, 10, 100_000, 0, 100_000},
		{"huge limit, low rate: max lease at once", 1, 1e12, 4, 1, 10, 100_000, 0, 100_000},
		{"near the end: free/(2 sidecars)", 1000, 800, 4, 1, 10, 100_000, 0, 100},
		{"near the end, keeping up with the rate", 1000, 800, 4, 1, 10, 100_000, 150, 150},
		{"near the end, keeping up: at most free/sidecars", 1000, 800, 4, 1, 10, 100_000, 500, 200},
		{"near the end, keeping up needs less than free/(2 sidecars)", 1000, 800, 4, 1, 10, 100_000, 30, 100},
		{"the last units one by one", 1000, 7, 4, 1, 10, 100_000, 0, 1},
		{"the last units, keeping up: still one by one", 1000, 7, 4, 1, 10, 100_000, 50, 1},
		{"one unit left", 1000, 1, 1, 1, 10, 100_000, 0, 1},
		{"the request's cost", 0, 1000, 4, 50, 10, 100_000, 0, 50},
		{"the cost does not fit", 1000, 40, 4, 50, 10, 100_000, 0, 0},
		{"nothing left", 1000, 0, 4, 1, 10, 100_000, 0, 0},
		{"over the limit", 1000, -5, 4, 1, 10, 100_000, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := leaseSize(tc.rate, period, tc.min, tc.max, tc.max, tc.free, tc.holders, tc.need, tc.keep); got != tc.want {
				t.Errorf("leaseSize = %d, want %d", got, tc.want)
			}
		})
	}
}

// FuzzValue: a value from the bucket, which any client may write, never panics the
// decoder, and a decoded value's Granted is the sum of its grants, none negative.
func FuzzValue(f *testing.F) {
	f.Add([]byte(`{"limit":10000,"limit_revision":3,"granted":5,"sidecars":{"sc-a":2,"sc-b":3}}`))
	f.Add([]byte(`{"sidecars":{"a":-1}}`))
	f.Add([]byte(`{"sidecars":{"a":9223372036854775807,"b":1}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := decodeValue(b)
		if err != nil {
			return
		}
		var sum int64
		for id, g := range v.Sidecars {
			if g < 0 {
				t.Fatalf("negative grant of %q accepted", id)
			}
			sum += g
		}
		if sum != v.Granted {
			t.Fatalf("granted %d, grants add up to %d", v.Granted, sum)
		}
	})
}
