package limiter

import "time"

// neverEnd is the end of the one window of a feature that never resets: far enough ahead
// that no request reaches it, and still a valid time.Time whose Unix seconds fit an int64.
var neverEnd = time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)

// WindowAt returns the usage window [start, end) of a feature that resets every p, the one
// that contains now. Windows are anchored on b.PeriodStart in b.Location, as Flexprice
// anchors them (DESIGN.md section 4), and start and end are in b.Location:
//
//   - Daily: local midnight to the next local midnight, so a daylight-saving day is 23 or
//     25 hours long.
//   - Weekly: 7 local days from the anchor's weekday and wall-clock time, which stays put
//     across daylight-saving changes.
//   - Monthly, Quarterly, HalfYearly, Annual: 1, 3, 6 or 12 calendar months from the
//     anchor, at the anchor's wall-clock time. Boundary k is k steps from the anchor, not
//     from boundary k-1, and a day the month lacks is clamped to its last day: an anchor
//     on Jan 31 gives Feb 28 (29 in leap years), Mar 31, Apr 30.
//   - BillingPeriod: [PeriodStart, PeriodEnd). After PeriodEnd the windows roll forward by
//     b.Interval: on the anchor's grid when PeriodEnd lies on it (the usual case, which
//     keeps a Jan 31 anchor's day after a Feb 28 end), else anchored on PeriodEnd itself
//     (a short, prorated first period). Before PeriodStart they roll backward by
//     b.Interval from the anchor. A zero PeriodEnd, or one not after PeriodStart, means
//     periods of b.Interval from the anchor. An Interval of Daily steps whole local days
//     from the anchor's wall-clock time, not midnights.
//   - Never: the one window [PeriodStart, 9999-01-01 UTC), even for a now before
//     PeriodStart, whose usage counts in it too. This is the only case where start may
//     be after now.
//
// For every periodic p, windows extend before the anchor as well, and start <= now < end.
// Consecutive windows tile time: WindowAt(b, p, end) starts at end.
//
// WindowAt costs a few time.Date calls whatever the distance from the anchor, and
// allocates nothing. b.Location must not be nil, and for BillingPeriod b.Interval must be
// one of Daily through Annual (WindowAt panics otherwise, as ParseSnapshot guarantees
// it). A p outside BillingPeriod through Never is treated as Never.
func WindowAt(b *Billing, p ResetPeriod, now time.Time) (start, end time.Time) {
	loc := b.Location
	anchor := b.PeriodStart.In(loc)
	switch p {
	case Daily:
		y, m, d := now.In(loc).Date()
		return grid{y: y, m: m, d: d, loc: loc, days: 1}.window(now)
	case Weekly, Monthly, Quarterly, HalfYearly, Annual:
		return gridOf(anchor, p).window(now)
	case BillingPeriod:
		pe := b.PeriodEnd.In(loc)
		if b.PeriodEnd.IsZero() || !pe.After(anchor) || now.Before(anchor) {
			return gridOf(anchor, b.Interval).window(now)
		}
		if now.Before(pe) {
			return anchor, pe
		}
		g := gridOf(anchor, b.Interval)
		if s, _ := g.window(pe); !s.Equal(pe) {
			g = gridOf(pe, b.Interval) // PeriodEnd is off the anchor's grid: it anchors what follows
		}
		return g.window(now)
	default:
		return anchor, neverEnd.In(loc)
	}
}

// grid is the sequence of window boundaries at(k), k in all integers, that step by a whole
// number of calendar months or of local days from boundary 0, on a fixed wall-clock time.
type grid struct {
	y      int        // y-m-d is the date of boundary 0; a month step clamps d to
	m      time.Month // the last day of a shorter month
	d      int
	clock  int // wall-clock time of every boundary, in nanoseconds since midnight
	loc    *time.Location
	months int       // months per step; 0 when the grid steps by days
	days   int       // days per step when months is 0
	exact  time.Time // boundary 0 itself, when not zero
}

// gridOf returns the grid of windows that reset every p from anchor. p is one of Daily
// through Annual; a Daily grid keeps the anchor's wall-clock time.
func gridOf(anchor time.Time, p ResetPeriod) grid {
	y, m, d := anchor.Date()
	hh, mm, ss := anchor.Clock()
	g := grid{y: y, m: m, d: d, clock: ((hh*60+mm)*60+ss)*1e9 + anchor.Nanosecond(),
		loc: anchor.Location(), exact: anchor}
	switch p {
	case Daily:
		g.days = 1
	case Weekly:
		g.days = 7
	case Monthly:
		g.months = 1
	case Quarterly:
		g.months = 3
	case HalfYearly:
		g.months = 6
	case Annual:
		g.months = 12
	default:
		panic("limiter: no window grid for reset period " + p.String())
	}
	return g
}

// at returns boundary k: k steps from boundary 0 at the grid's wall-clock time, with the
// day of the month clamped to the last day of a shorter month. A wall-clock time that a
// daylight-saving change skips or repeats is resolved as time.Date does.
func (g grid) at(k int) time.Time {
	if k == 0 && !g.exact.IsZero() {
		return g.exact // even when its wall-clock time is ambiguous
	}
	if g.months == 0 {
		return time.Date(g.y, g.m, g.d+k*g.days, 0, 0, 0, g.clock, g.loc)
	}
	mi := int(g.m) - 1 + k*g.months // months since January of year g.y
	y, m := g.y+floorDiv(mi, 12), time.Month(mi-12*floorDiv(mi, 12)+1)
	return time.Date(y, m, min(g.d, daysIn(y, m)), 0, 0, 0, g.clock, g.loc)
}

// window returns [at(k), at(k+1)) that holds now. It estimates k from the calendar
// distance between boundary 0 and now, then corrects the estimate, which is off by at
// most one step (more only where a zone skips whole days, as Pacific/Apia did in 2011).
// Boundaries never decrease in k, so the result always holds now.
func (g grid) window(now time.Time) (start, end time.Time) {
	ny, nm, nd := now.In(g.loc).Date()
	var k int
	if g.months == 0 {
		k = floorDiv(dayNumber(ny, nm, nd)-dayNumber(g.y, g.m, g.d), g.days)
	} else {
		k = floorDiv((ny-g.y)*12+int(nm-g.m), g.months)
	}
	start = g.at(k)
	for now.Before(start) {
		k--
		start = g.at(k)
	}
	end = g.at(k + 1)
	for !now.Before(end) {
		k++
		start, end = end, g.at(k+1)
	}
	return start, end
}

// dayNumber returns the number of days from 1970-01-01 to the date y-m-d.
func dayNumber(y int, m time.Month, d int) int {
	return floorDiv(int(time.Date(y, m, d, 0, 0, 0, 0, time.UTC).Unix()), 86400)
}

// daysIn returns the number of days in month m of year y.
func daysIn(y int, m time.Month) int {
	return time.Date(y, m+1, 0, 0, 0, 0, 0, time.UTC).Day()
}

// floorDiv returns a/b rounded toward negative infinity, for b > 0.
func floorDiv(a, b int) int {
	q := a / b
	if a%b < 0 {
		q--
	}
	return q
}
