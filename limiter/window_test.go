package limiter

import (
	"math/rand/v2"
	"testing"
	"time"
)

// loadZone loads a zone for a test, skipping the test when the zone database lacks it.
func loadZone(tb testing.TB, name string) *time.Location {
	tb.Helper()
	loc, err := time.LoadLocation(name)
	if err != nil {
		tb.Skipf("zone %s: %v", name, err)
	}
	return loc
}

// windowCase is one call of WindowAt and the window it must return.
type windowCase struct {
	name       string
	b          Billing
	p          ResetPeriod
	now        time.Time
	start, end time.Time
}

func checkWindows(t *testing.T, cases []windowCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			start, end := WindowAt(&tc.b, tc.p, tc.now)
			if !start.Equal(tc.start) || !end.Equal(tc.end) {
				t.Fatalf("WindowAt(%s, %v) = [%v, %v), want [%v, %v)",
					tc.p, tc.now, start, end, tc.start, tc.end)
			}
			if start.Location() != tc.b.Location || end.Location() != tc.b.Location {
				t.Errorf("window in %v, %v; want %v", start.Location(), end.Location(), tc.b.Location)
			}
		})
	}
}

func utc(y int, m time.Month, d, hh, mm int) time.Time {
	return time.Date(y, m, d, hh, mm, 0, 0, time.UTC)
}

func TestWindowAtBoundaries(t *testing.T) {
	const ns = time.Nanosecond
	// Anchor: Wednesday 2026-01-14 09:30 UTC.
	a := utc(2026, 1, 14, 9, 30)
	b := Billing{PeriodStart: a, Interval: Monthly, Location: time.UTC}
	withEnd := b
	withEnd.PeriodEnd = utc(2026, 2, 14, 9, 30)

	type edge struct {
		name       string
		p          ResetPeriod
		b          Billing
		boundary   time.Time // a window boundary
		prev, next time.Time // the boundaries before and after it
	}
	edges := []edge{
		{"DAILY", Daily, b, utc(2026, 3, 5, 0, 0), utc(2026, 3, 4, 0, 0), utc(2026, 3, 6, 0, 0)},
		{"WEEKLY", Weekly, b, utc(2026, 3, 4, 9, 30), utc(2026, 2, 25, 9, 30), utc(2026, 3, 11, 9, 30)},
		{"MONTHLY", Monthly, b, utc(2026, 3, 14, 9, 30), utc(2026, 2, 14, 9, 30), utc(2026, 4, 14, 9, 30)},
		{"QUARTERLY", Quarterly, b, utc(2026, 4, 14, 9, 30), a, utc(2026, 7, 14, 9, 30)},
		{"HALF_YEARLY", HalfYearly, b, utc(2026, 7, 14, 9, 30), a, utc(2027, 1, 14, 9, 30)},
		{"ANNUAL", Annual, b, utc(2027, 1, 14, 9, 30), a, utc(2028, 1, 14, 9, 30)},
		{"BILLING_PERIOD/no_end", BillingPeriod, b, utc(2026, 2, 14, 9, 30), a, utc(2026, 3, 14, 9, 30)},
		{"BILLING_PERIOD/period_end", BillingPeriod, withEnd, withEnd.PeriodEnd, a, utc(2026, 3, 14, 9, 30)},
		{"BILLING_PERIOD/period_start", BillingPeriod, withEnd, a, utc(2025, 12, 14, 9, 30), withEnd.PeriodEnd},
	}
	var cases []windowCase
	for _, e := range edges {
		name := e.name
		cases = append(cases,
			windowCase{name + "/just_before", e.b, e.p, e.boundary.Add(-ns), e.prev, e.boundary},
			windowCase{name + "/at", e.b, e.p, e.boundary, e.boundary, e.next},
			windowCase{name + "/just_after", e.b, e.p, e.boundary.Add(ns), e.boundary, e.next},
		)
	}
	checkWindows(t, cases)
}

func TestWindowAtMonthEndClamp(t *testing.T) {
	jan31 := Billing{PeriodStart: utc(2026, 1, 31, 18, 0), Interval: Monthly, Location: time.UTC}
	jan31Leap := Billing{PeriodStart: utc(2028, 1, 31, 18, 0), Interval: Monthly, Location: time.UTC}
	aug31 := Billing{PeriodStart: utc(2025, 8, 31, 0, 0), Interval: Monthly, Location: time.UTC}
	feb29 := Billing{PeriodStart: utc(2024, 2, 29, 12, 0), Interval: Monthly, Location: time.UTC}
	checkWindows(t, []windowCase{
		{"monthly/jan31/feb_non_leap", jan31, Monthly, utc(2026, 2, 15, 0, 0), utc(2026, 1, 31, 18, 0), utc(2026, 2, 28, 18, 0)},
		{"monthly/jan31/feb_end", jan31, Monthly, utc(2026, 3, 1, 0, 0), utc(2026, 2, 28, 18, 0), utc(2026, 3, 31, 18, 0)},
		{"monthly/jan31/mar", jan31, Monthly, utc(2026, 4, 1, 0, 0), utc(2026, 3, 31, 18, 0), utc(2026, 4, 30, 18, 0)},
		{"monthly/jan31/apr", jan31, Monthly, utc(2026, 5, 1, 0, 0), utc(2026, 4, 30, 18, 0), utc(2026, 5, 31, 18, 0)},
		{"monthly/jan31/feb_leap", jan31Leap, Monthly, utc(2028, 2, 29, 17, 59), utc(2028, 1, 31, 18, 0), utc(2028, 2, 29, 18, 0)},
		{"monthly/jan31/feb_leap_end", jan31Leap, Monthly, utc(2028, 2, 29, 18, 0), utc(2028, 2, 29, 18, 0), utc(2028, 3, 31, 18, 0)},
		{"monthly/jan31/leap_from_2026", jan31, Monthly, utc(2028, 3, 1, 0, 0), utc(2028, 2, 29, 18, 0), utc(2028, 3, 31, 18, 0)},
		{"quarterly/aug31/nov", aug31, Quarterly, utc(2025, 12, 1, 0, 0), utc(2025, 11, 30, 0, 0), utc(2026, 2, 28, 0, 0)},
		{"quarterly/aug31/feb", aug31, Quarterly, utc(2026, 3, 1, 0, 0), utc(2026, 2, 28, 0, 0), utc(2026, 5, 31, 0, 0)},
		{"quarterly/aug31/feb_leap", aug31, Quarterly, utc(2028, 3, 1, 0, 0), utc(2028, 2, 29, 0, 0), utc(2028, 5, 31, 0, 0)},
		{"half_yearly/aug31/feb", aug31, HalfYearly, utc(2026, 2, 28, 0, 0), utc(2026, 2, 28, 0, 0), utc(2026, 8, 31, 0, 0)},
		{"half_yearly/aug31/before_feb", aug31, HalfYearly, utc(2026, 2, 27, 23, 59), utc(2025, 8, 31, 0, 0), utc(2026, 2, 28, 0, 0)},
		{"annual/aug31", aug31, Annual, utc(2027, 8, 30, 0, 0), utc(2026, 8, 31, 0, 0), utc(2027, 8, 31, 0, 0)},
		{"annual/feb29/non_leap", feb29, Annual, utc(2025, 3, 1, 0, 0), utc(2025, 2, 28, 12, 0), utc(2026, 2, 28, 12, 0)},
		{"annual/feb29/leap", feb29, Annual, utc(2028, 2, 29, 12, 0), utc(2028, 2, 29, 12, 0), utc(2029, 2, 28, 12, 0)},
		{"quarterly/feb29/may", feb29, Quarterly, utc(2024, 6, 1, 0, 0), utc(2024, 5, 29, 12, 0), utc(2024, 8, 29, 12, 0)},
		{"half_yearly/feb29/next_year", feb29, HalfYearly, utc(2025, 3, 1, 0, 0), utc(2025, 2, 28, 12, 0), utc(2025, 8, 29, 12, 0)},
	})
}

func TestWindowAtDST(t *testing.T) {
	ny := loadZone(t, "America/New_York")
	berlin := loadZone(t, "Europe/Berlin")
	at := func(loc *time.Location, y int, m time.Month, d, hh, mm int) time.Time {
		return time.Date(y, m, d, hh, mm, 0, 0, loc)
	}
	nyB := Billing{PeriodStart: at(ny, 2026, 1, 5, 9, 0), Interval: Monthly, Location: ny} // a Monday
	beB := Billing{PeriodStart: at(berlin, 2026, 1, 5, 9, 0), Interval: Monthly, Location: berlin}
	cases := []struct {
		windowCase
		hours time.Duration
	}{
		{windowCase{"daily/new_york/spring_forward", nyB, Daily, at(ny, 2026, 3, 8, 12, 0),
			at(ny, 2026, 3, 8, 0, 0), at(ny, 2026, 3, 9, 0, 0)}, 23},
		{windowCase{"daily/new_york/fall_back", nyB, Daily, at(ny, 2026, 11, 1, 12, 0),
			at(ny, 2026, 11, 1, 0, 0), at(ny, 2026, 11, 2, 0, 0)}, 25},
		{windowCase{"daily/new_york/fall_back_repeated_hour", nyB, Daily, time.Date(2026, 11, 1, 6, 30, 0, 0, time.UTC), // 01:30 EST
			at(ny, 2026, 11, 1, 0, 0), at(ny, 2026, 11, 2, 0, 0)}, 25},
		{windowCase{"daily/new_york/ordinary", nyB, Daily, at(ny, 2026, 3, 9, 0, 0),
			at(ny, 2026, 3, 9, 0, 0), at(ny, 2026, 3, 10, 0, 0)}, 24},
		{windowCase{"daily/berlin/spring_forward", beB, Daily, at(berlin, 2026, 3, 29, 23, 59),
			at(berlin, 2026, 3, 29, 0, 0), at(berlin, 2026, 3, 30, 0, 0)}, 23},
		{windowCase{"daily/berlin/fall_back", beB, Daily, at(berlin, 2026, 10, 25, 0, 0),
			at(berlin, 2026, 10, 25, 0, 0), at(berlin, 2026, 10, 26, 0, 0)}, 25},
		{windowCase{"weekly/new_york/spring_forward", nyB, Weekly, at(ny, 2026, 3, 8, 12, 0),
			at(ny, 2026, 3, 2, 9, 0), at(ny, 2026, 3, 9, 9, 0)}, 7*24 - 1},
		{windowCase{"weekly/new_york/fall_back", nyB, Weekly, at(ny, 2026, 11, 2, 8, 59),
			at(ny, 2026, 10, 26, 9, 0), at(ny, 2026, 11, 2, 9, 0)}, 7*24 + 1},
		{windowCase{"weekly/berlin/spring_forward", beB, Weekly, at(berlin, 2026, 3, 30, 9, 0),
			at(berlin, 2026, 3, 30, 9, 0), at(berlin, 2026, 4, 6, 9, 0)}, 7 * 24},
		{windowCase{"weekly/berlin/spring_forward_week", beB, Weekly, at(berlin, 2026, 3, 29, 3, 0),
			at(berlin, 2026, 3, 23, 9, 0), at(berlin, 2026, 3, 30, 9, 0)}, 7*24 - 1},
		{windowCase{"weekly/berlin/fall_back_week", beB, Weekly, at(berlin, 2026, 10, 25, 2, 30),
			at(berlin, 2026, 10, 19, 9, 0), at(berlin, 2026, 10, 26, 9, 0)}, 7*24 + 1},
		{windowCase{"monthly/new_york/keeps_wall_clock", nyB, Monthly, at(ny, 2026, 3, 20, 0, 0),
			at(ny, 2026, 3, 5, 9, 0), at(ny, 2026, 4, 5, 9, 0)}, 31*24 - 1},
		{windowCase{"monthly/new_york/february", nyB, Monthly, at(ny, 2026, 3, 1, 0, 0),
			at(ny, 2026, 2, 5, 9, 0), at(ny, 2026, 3, 5, 9, 0)}, 28 * 24},
		{windowCase{"monthly/berlin/across_fall_back", beB, Monthly, at(berlin, 2026, 10, 25, 12, 0),
			at(berlin, 2026, 10, 5, 9, 0), at(berlin, 2026, 11, 5, 9, 0)}, 31*24 + 1},
	}
	var wcs []windowCase
	for _, tc := range cases {
		wcs = append(wcs, tc.windowCase)
		t.Run(tc.name+"/duration", func(t *testing.T) {
			start, end := WindowAt(&tc.b, tc.p, tc.now)
			if got := end.Sub(start); got != tc.hours*time.Hour {
				t.Errorf("window [%v, %v) lasts %v, want %v", start, end, got, tc.hours*time.Hour)
			}
		})
	}
	checkWindows(t, wcs)
}

func TestWindowAtBillingPeriod(t *testing.T) {
	// Anniversary billing from Jan 31: Flexprice ends the first period on Feb 28.
	anniv := Billing{PeriodStart: utc(2026, 1, 31, 10, 0), PeriodEnd: utc(2026, 2, 28, 10, 0), Interval: Monthly, Location: time.UTC}
	// Calendar billing that started mid-month: a prorated first period to the 1st.
	prorated := Billing{PeriodStart: utc(2026, 1, 15, 10, 0), PeriodEnd: utc(2026, 2, 1, 0, 0), Interval: Monthly, Location: time.UTC}
	noEnd := Billing{PeriodStart: utc(2026, 1, 31, 10, 0), Interval: Monthly, Location: time.UTC}
	badEnd := anniv
	badEnd.PeriodEnd = anniv.PeriodStart
	annual := Billing{PeriodStart: utc(2025, 6, 1, 0, 0), PeriodEnd: utc(2026, 6, 1, 0, 0), Interval: Annual, Location: time.UTC}
	weekly := Billing{PeriodStart: utc(2026, 1, 7, 0, 0), PeriodEnd: utc(2026, 1, 14, 0, 0), Interval: Weekly, Location: time.UTC}
	daily := Billing{PeriodStart: utc(2026, 1, 7, 15, 0), PeriodEnd: utc(2026, 1, 8, 15, 0), Interval: Daily, Location: time.UTC}
	long := Billing{PeriodStart: utc(2026, 1, 1, 0, 0), PeriodEnd: utc(2026, 3, 1, 0, 0), Interval: Monthly, Location: time.UTC}

	checkWindows(t, []windowCase{
		{"inside/start", anniv, BillingPeriod, anniv.PeriodStart, anniv.PeriodStart, anniv.PeriodEnd},
		{"inside/middle", anniv, BillingPeriod, utc(2026, 2, 14, 0, 0), anniv.PeriodStart, anniv.PeriodEnd},
		{"inside/last_instant", anniv, BillingPeriod, anniv.PeriodEnd.Add(-1), anniv.PeriodStart, anniv.PeriodEnd},
		{"after/at_end", anniv, BillingPeriod, anniv.PeriodEnd, anniv.PeriodEnd, utc(2026, 3, 31, 10, 0)},
		{"after/keeps_anchor_day", anniv, BillingPeriod, utc(2026, 4, 15, 0, 0), utc(2026, 3, 31, 10, 0), utc(2026, 4, 30, 10, 0)},
		{"after/years_later", anniv, BillingPeriod, utc(2030, 2, 28, 9, 0), utc(2030, 1, 31, 10, 0), utc(2030, 2, 28, 10, 0)},
		{"before/one_interval", anniv, BillingPeriod, utc(2026, 1, 1, 0, 0), utc(2025, 12, 31, 10, 0), anniv.PeriodStart},
		{"before/clamped", anniv, BillingPeriod, utc(2025, 11, 30, 10, 0), utc(2025, 11, 30, 10, 0), utc(2025, 12, 31, 10, 0)},
		{"before/last_instant", anniv, BillingPeriod, anniv.PeriodStart.Add(-1), utc(2025, 12, 31, 10, 0), anniv.PeriodStart},
		{"prorated/inside", prorated, BillingPeriod, utc(2026, 1, 20, 0, 0), prorated.PeriodStart, prorated.PeriodEnd},
		{"prorated/after_end", prorated, BillingPeriod, utc(2026, 2, 1, 0, 0), utc(2026, 2, 1, 0, 0), utc(2026, 3, 1, 0, 0)},
		{"prorated/later", prorated, BillingPeriod, utc(2026, 7, 31, 23, 0), utc(2026, 7, 1, 0, 0), utc(2026, 8, 1, 0, 0)},
		{"prorated/before_start", prorated, BillingPeriod, utc(2026, 1, 15, 9, 0), utc(2025, 12, 15, 10, 0), prorated.PeriodStart},
		{"no_end/first", noEnd, BillingPeriod, utc(2026, 2, 1, 0, 0), noEnd.PeriodStart, utc(2026, 2, 28, 10, 0)},
		{"no_end/later", noEnd, BillingPeriod, utc(2026, 3, 31, 9, 0), utc(2026, 2, 28, 10, 0), utc(2026, 3, 31, 10, 0)},
		{"end_not_after_start/ignored", badEnd, BillingPeriod, utc(2026, 2, 1, 0, 0), noEnd.PeriodStart, utc(2026, 2, 28, 10, 0)},
		{"annual/after", annual, BillingPeriod, utc(2027, 12, 1, 0, 0), utc(2027, 6, 1, 0, 0), utc(2028, 6, 1, 0, 0)},
		{"weekly/after", weekly, BillingPeriod, utc(2026, 1, 22, 0, 0), utc(2026, 1, 21, 0, 0), utc(2026, 1, 28, 0, 0)},
		{"daily/keeps_time_of_day", daily, BillingPeriod, utc(2026, 1, 9, 14, 59), utc(2026, 1, 8, 15, 0), utc(2026, 1, 9, 15, 0)},
		{"longer_than_interval/inside", long, BillingPeriod, utc(2026, 2, 10, 0, 0), long.PeriodStart, long.PeriodEnd},
		{"longer_than_interval/after", long, BillingPeriod, utc(2026, 3, 10, 0, 0), utc(2026, 3, 1, 0, 0), utc(2026, 4, 1, 0, 0)},
	})
}

func TestWindowAtNever(t *testing.T) {
	berlin := loadZone(t, "Europe/Berlin")
	b := Billing{PeriodStart: time.Date(2026, 1, 31, 10, 0, 0, 0, berlin), Interval: Monthly, Location: berlin}
	end := time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC).In(berlin)
	checkWindows(t, []windowCase{
		{"at_start", b, Never, b.PeriodStart, b.PeriodStart, end},
		{"years_later", b, Never, b.PeriodStart.AddDate(50, 0, 0), b.PeriodStart, end},
		{"before_start", b, Never, b.PeriodStart.Add(-time.Hour), b.PeriodStart, end},
	})
}

func TestWindowAtBeforeAnchor(t *testing.T) {
	ny := loadZone(t, "America/New_York")
	b := Billing{PeriodStart: utc(2026, 1, 15, 12, 0), Interval: Monthly, Location: time.UTC}
	nyB := Billing{PeriodStart: time.Date(2026, 1, 5, 9, 0, 0, 0, ny), Interval: Weekly, Location: ny}
	nyAt := func(y int, m time.Month, d, hh int) time.Time { return time.Date(y, m, d, hh, 0, 0, 0, ny) }
	checkWindows(t, []windowCase{
		{"daily", b, Daily, utc(2025, 6, 1, 13, 0), utc(2025, 6, 1, 0, 0), utc(2025, 6, 2, 0, 0)},
		{"weekly/previous", b, Weekly, utc(2026, 1, 15, 11, 59), utc(2026, 1, 8, 12, 0), utc(2026, 1, 15, 12, 0)},
		{"weekly/far", b, Weekly, utc(1970, 1, 1, 0, 0), utc(1969, 12, 25, 12, 0), utc(1970, 1, 1, 12, 0)},
		{"weekly/new_york_across_dst", nyB, Weekly, nyAt(2025, 11, 2, 12), nyAt(2025, 10, 27, 9), nyAt(2025, 11, 3, 9)},
		{"monthly/previous", b, Monthly, utc(2025, 12, 15, 12, 0), utc(2025, 12, 15, 12, 0), utc(2026, 1, 15, 12, 0)},
		{"monthly/two_back", b, Monthly, utc(2025, 11, 20, 0, 0), utc(2025, 11, 15, 12, 0), utc(2025, 12, 15, 12, 0)},
		{"monthly/far", b, Monthly, utc(1900, 3, 1, 0, 0), utc(1900, 2, 15, 12, 0), utc(1900, 3, 15, 12, 0)},
		{"quarterly", b, Quarterly, utc(2025, 10, 14, 0, 0), utc(2025, 7, 15, 12, 0), utc(2025, 10, 15, 12, 0)},
		{"half_yearly", b, HalfYearly, utc(2025, 7, 15, 12, 0), utc(2025, 7, 15, 12, 0), utc(2026, 1, 15, 12, 0)},
		{"annual", b, Annual, utc(2020, 1, 15, 11, 0), utc(2019, 1, 15, 12, 0), utc(2020, 1, 15, 12, 0)},
	})
}

// TestWindowAtProperties checks, for random anchors and times in zones with unusual
// daylight-saving rules, that every window holds now and that windows tile time.
func TestWindowAtProperties(t *testing.T) {
	zones := []string{"UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe",
		"America/Santiago", "America/Havana", "Asia/Tehran", "Pacific/Apia", "Asia/Kolkata"}
	var locs []*time.Location
	for _, z := range zones {
		if loc, err := time.LoadLocation(z); err == nil {
			locs = append(locs, loc)
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	lo, hi := utc(1950, 1, 1, 0, 0).Unix(), utc(2100, 1, 1, 0, 0).Unix()
	randTime := func(loc *time.Location) time.Time {
		t := time.Unix(lo+rng.Int64N(hi-lo), rng.Int64N(1e9)).In(loc)
		if rng.IntN(4) == 0 { // on the hour, where daylight-saving changes happen
			t = t.Truncate(time.Hour)
		}
		return t
	}
	intervals := []ResetPeriod{Daily, Weekly, Monthly, Quarterly, HalfYearly, Annual}
	periods := []ResetPeriod{BillingPeriod, Daily, Weekly, Monthly, Quarterly, HalfYearly, Annual}
	n := 3000
	if testing.Short() {
		n = 300
	}
	for i := 0; i < n; i++ {
		loc := locs[rng.IntN(len(locs))]
		b := Billing{PeriodStart: randTime(loc), Interval: intervals[rng.IntN(len(intervals))], Location: loc}
		switch rng.IntN(3) {
		case 0: // on the anchor's grid, as Flexprice writes it
			_, b.PeriodEnd = WindowAt(&Billing{PeriodStart: b.PeriodStart, Interval: b.Interval, Location: loc}, BillingPeriod, b.PeriodStart)
		case 1: // anywhere after the start: a prorated period
			b.PeriodEnd = b.PeriodStart.Add(time.Duration(1 + rng.Int64N(int64(400*24*time.Hour))))
		}
		now := randTime(loc)
		if rng.IntN(4) == 0 { // near the anchor
			now = b.PeriodStart.Add(time.Duration(rng.Int64N(int64(60*24*time.Hour))) - 30*24*time.Hour)
		}
		for _, p := range periods {
			start, end := WindowAt(&b, p, now)
			where := func() string {
				return p.String() + " " + b.Interval.String() + " anchor " + b.PeriodStart.String() +
					" end " + b.PeriodEnd.String() + " now " + now.String()
			}
			if now.Before(start) || !now.Before(end) {
				t.Fatalf("%s: window [%v, %v) does not hold now", where(), start, end)
			}
			if start.Location() != loc || end.Location() != loc {
				t.Fatalf("%s: window in %v, %v, want %v", where(), start.Location(), end.Location(), loc)
			}
			if next, _ := WindowAt(&b, p, end); !next.Equal(end) {
				t.Fatalf("%s: window [%v, %v) is followed by one that starts at %v", where(), start, end, next)
			}
			if _, prev := WindowAt(&b, p, start.Add(-time.Nanosecond)); !prev.Equal(start) {
				t.Fatalf("%s: window [%v, %v) is preceded by one that ends at %v", where(), start, end, prev)
			}
		}
	}
}

func TestWindowAtAllocs(t *testing.T) {
	ny := loadZone(t, "America/New_York")
	b := Billing{PeriodStart: time.Date(1970, 1, 31, 9, 0, 0, 0, ny), Interval: Monthly, Location: ny}
	b.PeriodEnd = time.Date(1970, 2, 28, 9, 0, 0, 0, ny)
	now := time.Date(2026, 3, 8, 12, 0, 0, 0, ny)
	for p := BillingPeriod; p <= Never; p++ {
		if n := testing.AllocsPerRun(100, func() { WindowAt(&b, p, now) }); n != 0 {
			t.Errorf("WindowAt(%v) allocates %v times, want 0", p, n)
		}
	}
}

func BenchmarkWindowAt(b *testing.B) {
	ny := loadZone(b, "America/New_York")
	bill := Billing{PeriodStart: time.Date(1970, 1, 31, 9, 0, 0, 0, ny), Interval: Monthly, Location: ny}
	bill.PeriodEnd = time.Date(1970, 2, 28, 9, 0, 0, 0, ny)
	now := time.Date(2026, 3, 8, 12, 0, 0, 0, ny)
	for _, p := range []ResetPeriod{BillingPeriod, Daily, Weekly, Monthly, Annual, Never} {
		b.Run(p.String(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				WindowAt(&bill, p, now)
			}
		})
	}
}
