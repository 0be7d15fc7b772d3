package limiter

import (
	"fmt"
	"math"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testNow is inside the billing window [2026-11-05, 2026-12-05) of testSnap's customers.
var testNow = time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)

// windowEnd is the end of the monthly window that holds testNow.
var windowEnd = time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)

// testSnap parses a snapshot of customer id with the given "features" members, billed
// monthly from 2026-11-05 in UTC.
func testSnap(tb testing.TB, id, features string) *Snapshot {
	tb.Helper()
	s, err := ParseSnapshot([]byte(`{"customer_id":"` + id + `",` +
		`"billing":{"period_start":"2026-11-05T00:00:00Z","interval":"MONTHLY","timezone":"UTC"},` +
		`"features":{` + features + `}}`))
	if err != nil {
		tb.Fatalf("testSnap(%s): %v", id, err)
	}
	return s
}

// countersOf returns the counters of one customer's feature, oldest window first.
func countersOf(l *Limiter, customer, feature string) []*Counter {
	var out []*Counter
	l.Counters(customer, func(c *Counter) {
		if c.Key.Feature == feature {
			out = append(out, c)
		}
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Key.WindowStart < out[j].Key.WindowStart })
	return out
}

// usage returns the held and committed usage of a feature summed over its windows.
func usage(l *Limiter, customer, feature string) (held, committed int64) {
	for _, c := range countersOf(l, customer, feature) {
		held += c.Held()
		committed += c.Committed()
	}
	return held, committed
}

// restoreAt gives a feature prior committed usage in the window that holds now.
func restoreAt(tb testing.TB, l *Limiter, s *Snapshot, feature string, now time.Time, committed int64) {
	tb.Helper()
	f := s.Feature(feature)
	if f == nil {
		tb.Fatalf("restoreAt: no feature %q", feature)
	}
	start, end := WindowAt(&s.Billing, f.Reset, now)
	l.Restore(CounterKey{Customer: s.CustomerID, Feature: feature, WindowStart: start.UnixNano()}, end.UnixNano(), committed)
}

func TestReserveDecisions(t *testing.T) {
	const features = `
		"on":        {"type": "boolean", "is_enabled": true},
		"off":       {"type": "boolean", "is_enabled": false},
		"implicit":  {"type": "boolean"},
		"tier":      {"type": "static", "static_values": ["24/7"]},
		"calls":     {"type": "metered", "usage_limit": 5},
		"calls_off": {"type": "metered", "usage_limit": 5, "is_enabled": false},
		"big":       {"type": "metered", "usage_limit": 1000},
		"huge":      {"type": "metered", "usage_limit": 9223372036854775807},
		"zero":      {"type": "metered", "usage_limit": 0},
		"free_null": {"type": "metered", "usage_limit": null},
		"free_none": {"type": "metered"},
		"soft":      {"type": "metered", "usage_limit": 5, "is_soft_limit": true},
		"soft_zero": {"type": "metered", "usage_limit": 0, "is_soft_limit": true}`
	end := windowEnd.UnixNano()
	refused := func(feature string, limit, used int64) Decision {
		return Decision{Reason: UsageLimitExceeded, Feature: feature, Metered: true, Limit: limit, Used: used, ResetAt: end}
	}
	notEntitled := func(feature string) Decision { return Decision{Reason: FeatureNotEntitled, Feature: feature} }
	cases := []struct {
		name  string
		prior map[string]int64 // committed usage before the call
		uses  []Use
		force bool
		want  Decision
		held  map[string]int64 // held after the call, per feature
	}{
		{name: "boolean on", uses: []Use{{Feature: "on"}}},
		{name: "boolean off", uses: []Use{{Feature: "off"}}, want: notEntitled("off")},
		{name: "boolean is_enabled absent is off", uses: []Use{{Feature: "implicit"}}, want: notEntitled("implicit")},
		{name: "static as a gate", uses: []Use{{Feature: "tier"}}},
		{name: "feature absent", uses: []Use{{Feature: "nope", Cost: 1}}, want: notEntitled("nope")},
		{name: "metered disabled", uses: []Use{{Feature: "calls_off", Cost: 1}}, want: notEntitled("calls_off")},
		{name: "hard under limit", prior: map[string]int64{"calls": 3}, uses: []Use{{Feature: "calls", Cost: 1}}, held: map[string]int64{"calls": 4}},
		{name: "hard reaches limit exactly", prior: map[string]int64{"calls": 2}, uses: []Use{{Feature: "calls", Cost: 3}}, held: map[string]int64{"calls": 5}},
		{name: "hard one over", prior: map[string]int64{"calls": 3}, uses: []Use{{Feature: "calls", Cost: 3}}, want: refused("calls", 5, 3), held: map[string]int64{"calls": 3}},
		{name: "hard at limit", prior: map[string]int64{"calls": 5}, uses: []Use{{Feature: "calls", Cost: 1}}, want: refused("calls", 5, 5), held: map[string]int64{"calls": 5}},
		{name: "hard cost 0 with one unit left", prior: map[string]int64{"calls": 4}, uses: []Use{{Feature: "calls"}}, held: map[string]int64{"calls": 4}},
		{name: "hard cost 0 at limit", prior: map[string]int64{"calls": 5}, uses: []Use{{Feature: "calls"}}, want: refused("calls", 5, 5)},
		{name: "deferred with one unit left", prior: map[string]int64{"calls": 4}, uses: []Use{{Feature: "calls", Deferred: true}}, held: map[string]int64{"calls": 4}},
		{name: "deferred at limit", prior: map[string]int64{"calls": 5}, uses: []Use{{Feature: "calls", Deferred: true}}, want: refused("calls", 5, 5)},
		{name: "hard cost overflow", prior: map[string]int64{"huge": math.MaxInt64 - 1}, uses: []Use{{Feature: "huge", Cost: 5}}, want: refused("huge", math.MaxInt64, math.MaxInt64-1)},
		{name: "zero limit cost 1", uses: []Use{{Feature: "zero", Cost: 1}}, want: refused("zero", 0, 0)},
		{name: "zero limit cost 0", uses: []Use{{Feature: "zero"}}, want: refused("zero", 0, 0)},
		{name: "zero limit deferred", uses: []Use{{Feature: "zero", Deferred: true}}, want: refused("zero", 0, 0)},
		{name: "unlimited null", prior: map[string]int64{"free_null": 1 << 50}, uses: []Use{{Feature: "free_null", Cost: 1 << 40}}, held: map[string]int64{"free_null": 1<<50 + 1<<40}},
		{name: "unlimited absent", prior: map[string]int64{"free_none": 1 << 50}, uses: []Use{{Feature: "free_none", Cost: 7}}, held: map[string]int64{"free_none": 1<<50 + 7}},
		{name: "soft over limit", prior: map[string]int64{"soft": 9}, uses: []Use{{Feature: "soft", Cost: 2}}, held: map[string]int64{"soft": 11}},
		{name: "soft zero limit", uses: []Use{{Feature: "soft_zero", Cost: 1}}, held: map[string]int64{"soft_zero": 1}},
		{name: "force over hard limit reserves and reports", prior: map[string]int64{"calls": 5}, uses: []Use{{Feature: "calls", Cost: 2}}, force: true,
			want: refused("calls", 5, 5), held: map[string]int64{"calls": 7}},
		{name: "force zero limit", uses: []Use{{Feature: "zero", Cost: 1}}, force: true, want: refused("zero", 0, 0), held: map[string]int64{"zero": 1}},
		{name: "force not entitled still reserves the rest", uses: []Use{{Feature: "off"}, {Feature: "calls", Cost: 1}}, force: true,
			want: notEntitled("off"), held: map[string]int64{"calls": 1}},
		{name: "force reports the first refusal", prior: map[string]int64{"calls": 5}, uses: []Use{{Feature: "calls", Cost: 1}, {Feature: "nope"}}, force: true,
			want: notEntitled("nope"), held: map[string]int64{"calls": 6}},
		{name: "all features admitted", prior: map[string]int64{"big": 10, "calls": 1}, uses: []Use{{Feature: "big", Cost: 1}, {Feature: "on"}, {Feature: "calls", Cost: 2}, {Feature: "soft", Cost: 1}},
			held: map[string]int64{"big": 11, "calls": 3, "soft": 1}},
		{name: "second refuses: first undone", prior: map[string]int64{"big": 10, "calls": 5}, uses: []Use{{Feature: "big", Cost: 3}, {Feature: "calls", Cost: 1}},
			want: refused("calls", 5, 5), held: map[string]int64{"big": 10, "calls": 5}},
		{name: "third refuses: soft and unlimited undone", prior: map[string]int64{"calls": 5}, uses: []Use{{Feature: "soft", Cost: 3}, {Feature: "free_null", Cost: 4}, {Feature: "calls", Cost: 1}},
			want: refused("calls", 5, 5), held: map[string]int64{"soft": 0, "free_null": 0, "calls": 5}},
		{name: "gate refuses after metered: nothing taken", uses: []Use{{Feature: "big", Cost: 3}, {Feature: "off"}},
			want: notEntitled("off"), held: map[string]int64{"big": 0}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := New()
			s := testSnap(t, "cust_t", features)
			for f, n := range tc.prior {
				restoreAt(t, l, s, f, testNow, n)
			}
			var r Reservation
			d := l.Reserve(s, tc.uses, testNow, tc.force, &r)
			if d != tc.want {
				t.Fatalf("Reserve = %+v, want %+v", d, tc.want)
			}
			for f, want := range tc.held {
				if held, _ := usage(l, "cust_t", f); held != want {
					t.Errorf("%s: held %d, want %d", f, held, want)
				}
			}
			admitted := d.Reason == OK || tc.force
			if !admitted && r.Len() != 0 {
				t.Errorf("refused reservation has Len %d, want 0", r.Len())
			}
			// Refund gives back exactly what was reserved.
			l.Refund(&r)
			for f := range tc.held {
				held, committed := usage(l, "cust_t", f)
				if held != tc.prior[f] || committed != tc.prior[f] {
					t.Errorf("%s after refund: held %d, committed %d, want %d", f, held, committed, tc.prior[f])
				}
			}
		})
	}
}

func TestCommitOverage(t *testing.T) {
	l := New()
	s := testSnap(t, "cust_o", `"soft": {"type": "metered", "usage_limit": 5, "is_soft_limit": true},
		"hard": {"type": "metered", "usage_limit": 5},
		"free": {"type": "metered"}`)
	key := CounterKey{Customer: "cust_o", Feature: "soft", WindowStart: time.Date(2026, 11, 5, 0, 0, 0, 0, time.UTC).UnixNano()}
	steps := []struct {
		feature           string
		cost              int64
		quantity, overage int64
	}{
		{"soft", 3, 3, 0},
		{"soft", 3, 3, 1},
		{"soft", 3, 3, 3},
		{"soft", 1, 1, 1},
		{"hard", 5, 5, 0},
		{"free", 1 << 40, 1 << 40, 0},
	}
	var r Reservation
	for i, st := range steps {
		if d := l.Reserve(s, []Use{{Feature: st.feature, Cost: st.cost}}, testNow, false, &r); d.Reason != OK {
			t.Fatalf("step %d: Reserve = %+v", i, d)
		}
		out := l.Commit(&r, nil)
		if len(out) != 1 {
			t.Fatalf("step %d: Commit returned %d usages, want 1", i, len(out))
		}
		u := out[0]
		if u.Quantity != st.quantity || u.Overage != st.overage {
			t.Errorf("step %d (%s +%d): quantity %d overage %d, want %d and %d", i, st.feature, st.cost, u.Quantity, u.Overage, st.quantity, st.overage)
		}
		if u.Key.Customer != "cust_o" || u.Key.Feature != st.feature || u.Key.WindowStart != key.WindowStart || u.End != windowEnd.UnixNano() {
			t.Errorf("step %d: usage key %+v end %d", i, u.Key, u.End)
		}
		r.Reset()
	}
	if held, committed := usage(l, "cust_o", "soft"); held != 10 || committed != 10 {
		t.Errorf("soft: held %d committed %d, want 10 and 10", held, committed)
	}
	// The reservation is spent: a second Commit or a Refund changes nothing.
	if d := l.Reserve(s, []Use{{Feature: "soft", Cost: 2}}, testNow, false, &r); d.Reason != OK {
		t.Fatal(d)
	}
	l.Commit(&r, nil)
	if out := l.Commit(&r, nil); len(out) != 0 {
		t.Errorf("second Commit returned %v", out)
	}
	l.Refund(&r)
	if held, committed := usage(l, "cust_o", "soft"); held != 12 || committed != 12 {
		t.Errorf("soft after a spent reservation: held %d committed %d, want 12 and 12", held, committed)
	}
}

func TestRefundRestores(t *testing.T) {
	l := New()
	s := testSnap(t, "cust_r", `"calls": {"type": "metered", "usage_limit": 2}, "soft": {"type": "metered", "usage_limit": 1, "is_soft_limit": true}`)
	uses := []Use{{Feature: "calls", Cost: 2}, {Feature: "soft", Cost: 3}}
	var r Reservation
	if d := l.Reserve(s, uses, testNow, false, &r); d.Reason != OK {
		t.Fatal(d)
	}
	var r2 Reservation
	if d := l.Reserve(s, uses, testNow, false, &r2); d.Reason != UsageLimitExceeded || d.Used != 2 {
		t.Fatalf("second Reserve while the first holds the limit = %+v", d)
	}
	l.Refund(&r)
	for _, f := range []string{"calls", "soft"} {
		if held, committed := usage(l, "cust_r", f); held != 0 || committed != 0 {
			t.Errorf("%s after refund: held %d committed %d", f, held, committed)
		}
	}
	r.Reset()
	if d := l.Reserve(s, uses, testNow, false, &r); d.Reason != OK {
		t.Fatalf("Reserve after refund = %+v", d)
	}
	out := l.Commit(&r, nil)
	if len(out) != 2 || out[0].Quantity != 2 || out[1].Quantity != 3 || out[1].Overage != 2 {
		t.Errorf("Commit = %+v", out)
	}
}

func TestDeferredSetActual(t *testing.T) {
	l := New()
	s := testSnap(t, "cust_d", `"tokens": {"type": "metered", "usage_limit": 10}, "on": {"type": "boolean", "is_enabled": true}`)
	var r Reservation
	reserve := func(cost int64) Decision {
		r.Reset()
		return l.Reserve(s, []Use{{Feature: "on"}, {Feature: "tokens", Cost: cost, Deferred: true}}, testNow, false, &r)
	}
	check := func(step string, held, committed int64) {
		t.Helper()
		if h, c := usage(l, "cust_d", "tokens"); h != held || c != committed {
			t.Errorf("%s: held %d committed %d, want %d and %d", step, h, c, held, committed)
		}
	}
	// Reserve 2, commit more (5).
	if d := reserve(2); d.Reason != OK {
		t.Fatal(d)
	}
	if r.Deferred(0) || !r.Deferred(1) {
		t.Errorf("Deferred = %v, %v; want false, true", r.Deferred(0), r.Deferred(1))
	}
	if _, ok := r.Meter(0); ok {
		t.Error("Meter(0) of a boolean feature is ok")
	}
	if m, ok := r.Meter(1); !ok || m.Feature != "tokens" || m.Limit != 10 || m.Held != 2 || m.ResetAt != windowEnd.UnixNano() {
		t.Errorf("Meter(1) = %+v, %v", m, ok)
	}
	check("reserved 2", 2, 0)
	r.SetActual(1, 5)
	if out := l.Commit(&r, nil); len(out) != 1 || out[0].Quantity != 5 || out[0].Overage != 0 {
		t.Errorf("Commit = %+v", out)
	}
	check("committed 5", 5, 5)
	// Reserve 2, commit less (1).
	if d := reserve(2); d.Reason != OK {
		t.Fatal(d)
	}
	r.SetActual(1, 1)
	l.Commit(&r, nil)
	check("committed 1", 6, 6)
	// A negative actual is ignored: the reserved cost is committed.
	if d := reserve(1); d.Reason != OK {
		t.Fatal(d)
	}
	r.SetActual(1, -4)
	l.Commit(&r, nil)
	check("negative actual", 7, 7)
	// Reserved 0 and actual 0: nothing to report.
	if d := reserve(0); d.Reason != OK {
		t.Fatal(d)
	}
	if out := l.Commit(&r, nil); len(out) != 0 {
		t.Errorf("Commit of 0 = %+v", out)
	}
	check("committed 0", 7, 7)
	// A deferred cost needs one unit left, and may then run over the hard limit.
	if d := reserve(0); d.Reason != OK {
		t.Fatal(d)
	}
	r.SetActual(1, 9)
	if out := l.Commit(&r, nil); len(out) != 1 || out[0].Quantity != 9 || out[0].Overage != 6 {
		t.Errorf("Commit over the limit = %+v", out)
	}
	check("over the limit", 16, 16)
	if d := reserve(0); d.Reason != UsageLimitExceeded || d.Used != 16 || d.Limit != 10 {
		t.Errorf("Reserve over the limit = %+v", d)
	}
}

func TestWindowRollover(t *testing.T) {
	l := New()
	s := testSnap(t, "cust_w", `"calls": {"type": "metered", "usage_limit": 2, "usage_reset_period": "DAILY"}`)
	uses := []Use{{Feature: "calls", Cost: 1}}
	var r Reservation
	day1 := time.Date(2026, 11, 22, 23, 59, 0, 0, time.UTC)
	midnight := time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC)
	for i := 0; i < 2; i++ {
		if d := l.Reserve(s, uses, day1, false, &r); d.Reason != OK {
			t.Fatalf("request %d: %+v", i, d)
		}
		l.Commit(&r, nil)
	}
	d := l.Reserve(s, uses, day1, false, &r)
	if d.Reason != UsageLimitExceeded || d.ResetAt != midnight.UnixNano() || d.Used != 2 {
		t.Fatalf("third request = %+v, want refusal resetting at %v", d, midnight)
	}
	// One nanosecond before the end is still the old window.
	if d := l.Reserve(s, uses, midnight.Add(-1), false, &r); d.Reason != UsageLimitExceeded {
		t.Fatalf("just before midnight = %+v", d)
	}
	// At the end the new window starts from 0 in a new counter.
	if d := l.Reserve(s, uses, time.Unix(0, d.ResetAt), false, &r); d.Reason != OK {
		t.Fatalf("at midnight = %+v", d)
	}
	out := l.Commit(&r, nil)
	if len(out) != 1 || out[0].Key.WindowStart != midnight.UnixNano() || out[0].Overage != 0 {
		t.Errorf("Commit in the new window = %+v", out)
	}
	cs := countersOf(l, "cust_w", "calls")
	if len(cs) != 2 {
		t.Fatalf("%d counters, want 2", len(cs))
	}
	if cs[0].Committed() != 2 || cs[0].End != midnight.UnixNano() {
		t.Errorf("old window: committed %d end %d", cs[0].Committed(), cs[0].End)
	}
	if cs[1].Committed() != 1 || cs[1].Key.WindowStart != midnight.UnixNano() || cs[1].End != midnight.Add(24*time.Hour).UnixNano() {
		t.Errorf("new window: %+v committed %d", cs[1].Key, cs[1].Committed())
	}
	// A late request for the old window still finds it (and it is still full).
	if d := l.Reserve(s, uses, day1, false, &r); d.Reason != UsageLimitExceeded || d.Used != 2 {
		t.Errorf("back in the old window = %+v", d)
	}
}

func TestNewSnapshotKeepsCount(t *testing.T) {
	l := New()
	snap := func(limit int) *Snapshot {
		return testSnap(t, "cust_n", fmt.Sprintf(`"calls": {"type": "metered", "usage_limit": %d}`, limit))
	}
	var r Reservation
	take := func(s *Snapshot, cost int64) Decision {
		r.Reset()
		d := l.Reserve(s, []Use{{Feature: "calls", Cost: cost}}, testNow, false, &r)
		if d.Reason == OK {
			l.Commit(&r, nil)
		}
		return d
	}
	v1 := snap(5)
	if d := take(v1, 4); d.Reason != OK {
		t.Fatal(d)
	}
	v2 := snap(10) // raised mid-window
	if d := take(v2, 7); d.Reason != UsageLimitExceeded || d.Used != 4 || d.Limit != 10 {
		t.Errorf("raised limit, 4+7 = %+v", d)
	}
	if d := take(v2, 6); d.Reason != OK {
		t.Errorf("raised limit, 4+6 = %+v", d)
	}
	v3 := snap(3) // lowered below the usage
	if d := take(v3, 0); d.Reason != UsageLimitExceeded || d.Used != 10 || d.Limit != 3 {
		t.Errorf("lowered limit = %+v", d)
	}
	// The old snapshot, still held by a request in flight, shares the counter.
	if d := take(v1, 1); d.Reason != UsageLimitExceeded || d.Used != 10 {
		t.Errorf("old snapshot = %+v", d)
	}
	if cs := countersOf(l, "cust_n", "calls"); len(cs) != 1 || cs[0].Committed() != 10 {
		t.Errorf("counters = %d, want one with 10", len(cs))
	}
}

func TestRestore(t *testing.T) {
	l := New()
	s := testSnap(t, "cust_x", `"calls": {"type": "metered", "usage_limit": 8}`)
	restoreAt(t, l, s, "calls", testNow, 7)
	// A previous window's usage does not count now.
	restoreAt(t, l, s, "calls", testNow.AddDate(0, -1, 0), 8)
	var r Reservation
	if d := l.Reserve(s, []Use{{Feature: "calls", Cost: 1}}, testNow, false, &r); d.Reason != OK {
		t.Fatalf("after restoring 7 of 8: %+v", d)
	}
	if out := l.Commit(&r, nil); len(out) != 1 || out[0].Overage != 0 {
		t.Errorf("Commit = %+v", out)
	}
	if d := l.Reserve(s, []Use{{Feature: "calls", Cost: 1}}, testNow, false, &r); d.Reason != UsageLimitExceeded || d.Used != 8 {
		t.Errorf("after 8 of 8: %+v", d)
	}
	cs := countersOf(l, "cust_x", "calls")
	if len(cs) != 2 || cs[0].Committed() != 8 || cs[1].Committed() != 8 || cs[1].Held() != 8 {
		t.Errorf("counters: %d", len(cs))
	}
}

func TestSweep(t *testing.T) {
	l := New()
	s := testSnap(t, "cust_s", `"calls": {"type": "metered", "usage_reset_period": "DAILY"}`)
	use := []Use{{Feature: "calls", Cost: 1}}
	day := func(d int) time.Time { return time.Date(2026, 11, d, 12, 0, 0, 0, time.UTC) }
	var r Reservation
	for _, d := range []int{20, 21} { // committed
		l.Reserve(s, use, day(d), false, &r)
		l.Commit(&r, nil)
		r.Reset()
	}
	var open Reservation // day 19: a reservation not yet committed
	l.Reserve(s, use, day(19), false, &open)
	l.Reserve(s, use, day(22), false, &r) // today
	l.Commit(&r, nil)

	horizon := time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC) // days 19..21 ended by then
	if n := l.Sweep(horizon); n != 2 {
		t.Errorf("Sweep dropped %d counters, want 2 (days 20 and 21)", n)
	}
	var starts []int
	for _, c := range countersOf(l, "cust_s", "calls") {
		starts = append(starts, time.Unix(0, c.Key.WindowStart).UTC().Day())
	}
	if fmt.Sprint(starts) != "[19 22]" {
		t.Errorf("counters left for days %v, want [19 22]", starts)
	}
	// The late commit still lands on its counter, which the next sweep drops.
	if out := l.Commit(&open, nil); len(out) != 1 || out[0].Key.WindowStart != time.Date(2026, 11, 19, 0, 0, 0, 0, time.UTC).UnixNano() {
		t.Errorf("late Commit = %+v", out)
	}
	if n := l.Sweep(horizon); n != 1 {
		t.Errorf("second Sweep dropped %d, want 1", n)
	}
	if n := l.Sweep(horizon); n != 0 {
		t.Errorf("third Sweep dropped %d, want 0", n)
	}
	if cs := countersOf(l, "cust_s", "calls"); len(cs) != 1 || cs[0].Committed() != 1 {
		t.Errorf("today's counter was swept")
	}
}

func TestReasonCodes(t *testing.T) {
	want := map[Reason]string{
		OK: "ok", CustomerMissing: "customer_missing", CustomerUnknown: "customer_unknown",
		FeatureNotEntitled: "feature_not_entitled", UsageLimitExceeded: "usage_limit_exceeded",
		ReplicaNotReady: "replica_not_ready", APIKeyInvalid: "api_key_invalid",
		CostInvalid: "cost_invalid", RouteNotAllowed: "route_not_allowed",
		QuotaUnavailable: "quota_unavailable",
	}
	if got := Reasons(); len(got) != len(want) {
		t.Errorf("Reasons() has %d, want %d", len(got), len(want))
	}
	for r, s := range want {
		if r.String() != s {
			t.Errorf("Reason(%d) = %q, want %q", r, r.String(), s)
		}
	}
	if Reason(200).String() != "unknown" {
		t.Errorf("out of range reason = %q", Reason(200).String())
	}
}

// TestConcurrentHardLimit has 64 goroutines make 3,000 attempts against one customer with
// a hard limit of 1,000: exactly 1,000 are admitted, and the limit is never held beyond.
func TestConcurrentHardLimit(t *testing.T) {
	const (
		workers  = 64
		attempts = 3000
		limit    = 1000
	)
	run := func(t *testing.T, refundEvery int) {
		l := New()
		s := testSnap(t, "cust_c", `"calls": {"type": "metered", "usage_limit": 1000}, "on": {"type": "boolean", "is_enabled": true}`)
		uses := []Use{{Feature: "on"}, {Feature: "calls", Cost: 1}}
		var admitted, refunded, committed, refused, maxHeld atomic.Int64
		var next atomic.Int64
		var wg sync.WaitGroup
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var r Reservation
				var out []Usage
				for next.Add(1) <= attempts {
					r.Reset()
					d := l.Reserve(s, uses, testNow, false, &r)
					if d.Reason != OK {
						if d.Reason != UsageLimitExceeded || d.Used > limit {
							t.Errorf("refusal %+v", d)
						}
						refused.Add(1)
						continue
					}
					n := admitted.Add(1)
					if m, _ := r.Meter(1); m.Held > maxHeld.Load() {
						maxHeld.Store(m.Held) // racy maximum, but never below a real Held
					}
					if refundEvery > 0 && n%int64(refundEvery) == 0 {
						l.Refund(&r)
						refunded.Add(1)
						continue
					}
					out = l.Commit(&r, out[:0])
					if len(out) != 1 || out[0].Overage != 0 {
						t.Errorf("Commit = %+v", out)
					}
					committed.Add(1)
				}
			}()
		}
		wg.Wait()
		held, comm := usage(l, "cust_c", "calls")
		if admitted.Load()+refused.Load() != attempts {
			t.Errorf("admitted %d + refused %d != %d", admitted.Load(), refused.Load(), attempts)
		}
		if admitted.Load()-refunded.Load() != committed.Load() || comm != committed.Load() || held != comm {
			t.Errorf("admitted %d, refunded %d, committed %d; counter held %d committed %d",
				admitted.Load(), refunded.Load(), committed.Load(), held, comm)
		}
		if maxHeld.Load() > limit {
			t.Errorf("held %d at some point, over the limit %d", maxHeld.Load(), limit)
		}
		if refundEvery == 0 {
			if committed.Load() != limit {
				t.Errorf("admitted %d, want exactly %d", committed.Load(), limit)
			}
			return
		}
		// Whatever the refunds left is still there to take, and no more.
		var r Reservation
		for comm < limit+1 {
			r.Reset()
			if d := l.Reserve(s, uses, testNow, false, &r); d.Reason != OK {
				break
			}
			l.Commit(&r, nil)
			comm++
		}
		if comm != limit {
			t.Errorf("after refunds, the limit let %d through in all, want %d", comm, limit)
		}
	}
	t.Run("commit", func(t *testing.T) { run(t, 0) })
	t.Run("refund every 3rd", func(t *testing.T) { run(t, 3) })
}

func TestReserveCommitAllocs(t *testing.T) {
	l := New()
	s := testSnap(t, "cust_a", `"calls": {"type": "metered", "usage_limit": 4611686018427387904},
		"soft": {"type": "metered", "usage_limit": 1, "is_soft_limit": true},
		"tokens": {"type": "metered"}, "on": {"type": "boolean", "is_enabled": true},
		"zero": {"type": "metered", "usage_limit": 0}`)
	src := NewMemorySource(s)
	id := []byte("cust_a")
	admit := []Use{{Feature: "calls", Cost: 1}, {Feature: "soft", Cost: 1}, {Feature: "tokens", Deferred: true}, {Feature: "on"}}
	refuse := []Use{{Feature: "calls", Cost: 1}, {Feature: "zero", Cost: 1}}
	var r Reservation
	out := make([]Usage, 0, MaxRouteFeatures)
	l.Reserve(s, admit, testNow, false, &r) // first use creates the counters
	l.Commit(&r, out[:0])
	l.Reserve(s, refuse, testNow, false, &r)

	cases := []struct {
		name string
		fn   func()
	}{
		{"reserve and commit", func() {
			r.Reset()
			if d := l.Reserve(src.Customer(id), admit, testNow, false, &r); d.Reason != OK {
				t.Fatal(d)
			}
			r.SetActual(2, 3)
			out = l.Commit(&r, out[:0])
		}},
		{"reserve and refund", func() {
			r.Reset()
			l.Reserve(src.Customer(id), admit, testNow, false, &r)
			l.Refund(&r)
		}},
		{"refusal", func() {
			r.Reset()
			if d := l.Reserve(src.Customer(id), refuse, testNow, false, &r); d.Reason != UsageLimitExceeded {
				t.Fatal(d)
			}
		}},
	}
	for _, tc := range cases {
		if n := testing.AllocsPerRun(1000, tc.fn); n != 0 {
			t.Errorf("%s: %v allocations per run, want 0", tc.name, n)
		}
	}
}
