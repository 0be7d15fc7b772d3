package flexprice

import (
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

// built is a customer's snapshot as the bridge derived it, with what it learnt on the way.
type built struct {
	doc      *limiter.SnapshotDoc // UpdatedAt is nil; set when written
	next     time.Time            // the next instant the snapshot may change; zero: none known
	problems []error              // features left out because they would not validate
	refs     customerRefs
}

// customerRefs are the Flexprice entities a customer's snapshot depends on, so that a
// webhook about one of them re-fetches the customers that use it.
type customerRefs struct {
	internalID    string
	plans         []string
	addons        []string
	subscriptions []string
	features      []string
}

// buildSnapshot maps a customer's effective entitlements and subscriptions at now to a
// snapshot (DESIGN.md section 3), keyed by the external id:
//
//   - billing comes from the subscription chooseSubscription picks;
//   - entries of the entitlements response are grouped by feature lookup key and folded
//     with Flexprice's rules (see fold), so that per-source entries give the same result
//     as an aggregated one;
//   - an entry all of whose sources are dated and none in effect at now (an override that
//     has not started or has ended) is left out;
//   - next is the earliest instant after now at which a source starts or ends, or a
//     subscription's period, trial or term ends: the snapshot is re-fetched then.
func buildSnapshot(externalID string, resp *entitlementsResponse, subs []subscription, now time.Time) *built {
	b := &built{doc: &limiter.SnapshotDoc{CustomerID: externalID, Features: map[string]limiter.FeatureDoc{}}}
	b.refs.internalID = resp.CustomerID
	later := func(t *time.Time) {
		if t != nil && t.After(now) && (b.next.IsZero() || t.Before(b.next)) {
			b.next = *t
		}
	}
	for i := range subs {
		s := &subs[i]
		b.refs.subscriptions = append(b.refs.subscriptions, s.ID)
		if s.PlanID != "" {
			b.refs.plans = append(b.refs.plans, s.PlanID)
		}
		for _, li := range s.LineItems {
			switch strings.ToLower(li.EntityType) {
			case "plan":
				b.refs.plans = append(b.refs.plans, li.EntityID)
			case "addon":
				b.refs.addons = append(b.refs.addons, li.EntityID)
			}
		}
		if live(s.SubscriptionStatus) {
			later(s.StartDate)
			later(s.CurrentPeriodEnd)
			later(s.TrialEnd)
			later(s.EndDate)
			later(s.CancelAt)
		}
	}
	if s := chooseSubscription(subs, now); s != nil {
		b.doc.Billing = billingOf(s)
		if b.doc.Billing != nil {
			d := limiter.SnapshotDoc{CustomerID: externalID, Billing: b.doc.Billing}
			if _, err := d.Snapshot(); err != nil { // windows fall back to calendar periods in UTC
				b.problems = append(b.problems, fmt.Errorf("subscription %s: billing left out: %w", s.ID, err))
				b.doc.Billing = nil
			}
		}
	}

	groups := map[string][]*featureEntry{}
	var keys []string
	for i := range resp.Features {
		e := &resp.Features[i]
		if e.Feature == nil {
			b.problems = append(b.problems, fmt.Errorf("features[%d]: no feature object", i))
			continue
		}
		inEffect := len(e.Sources) == 0
		for j := range e.Sources {
			src := &e.Sources[j]
			later(src.StartDate)
			later(src.EndDate)
			inEffect = inEffect || sourceInEffect(src, now)
			switch kind, id := src.entity(); kind {
			case "plan":
				b.refs.plans = append(b.refs.plans, id)
			case "addon":
				b.refs.addons = append(b.refs.addons, id)
			}
		}
		b.refs.features = append(b.refs.features, e.Feature.ID)
		if !inEffect {
			continue
		}
		key := e.Feature.LookupKey
		if key == "" {
			key = e.Feature.ID
		}
		if _, ok := groups[key]; !ok {
			keys = append(keys, key)
		}
		groups[key] = append(groups[key], e)
	}
	for _, key := range keys {
		fd, err := fold(groups[key])
		if err == nil {
			err = checkFeature(externalID, key, fd)
		}
		if err != nil {
			b.problems = append(b.problems, fmt.Errorf("feature %q: %w", key, err))
			continue
		}
		b.doc.Features[key] = fd
	}
	b.refs.plans = dedupe(b.refs.plans)
	b.refs.addons = dedupe(b.refs.addons)
	b.refs.features = dedupe(b.refs.features)
	return b
}

func sourceInEffect(s *source, now time.Time) bool {
	return (s.StartDate == nil || !now.Before(*s.StartDate)) && (s.EndDate == nil || now.Before(*s.EndDate))
}

func live(status string) bool {
	s := strings.ToLower(status)
	return s == "active" || s == "trialing"
}

// chooseSubscription picks the subscription whose billing period anchors the customer's
// usage windows, deterministically when there are several: among the active and
// trialing subscriptions that have started by now, active before trialing, then the
// earliest start_date (the customer's longest-standing subscription, normally its base
// plan, which does not change when a short add-on subscription comes or goes), then the
// smallest id. Nil when there is none.
func chooseSubscription(subs []subscription, now time.Time) *subscription {
	var best *subscription
	rank := func(s *subscription) int {
		if strings.EqualFold(s.SubscriptionStatus, "active") {
			return 0
		}
		return 1
	}
	for i := range subs {
		s := &subs[i]
		if !live(s.SubscriptionStatus) || (s.StartDate != nil && s.StartDate.After(now)) {
			continue
		}
		if best == nil {
			best = s
			continue
		}
		c := cmp.Compare(rank(s), rank(best))
		if c == 0 {
			c = compareStart(s.StartDate, best.StartDate)
		}
		if c == 0 {
			c = cmp.Compare(s.ID, best.ID)
		}
		if c < 0 {
			best = s
		}
	}
	return best
}

// compareStart orders start dates, an absent one last.
func compareStart(a, b *time.Time) int {
	switch {
	case a == nil && b == nil:
		return 0
	case a == nil:
		return 1
	case b == nil:
		return -1
	}
	return a.Compare(*b)
}

// billingOf maps a subscription to the snapshot's billing section: the current period,
// its interval (billing_period, with billing_period_count folded in where a longer
// interval exists: 3 MONTHLY is QUARTERLY) and the subscription's timezone (UTC when
// absent or unknown). Windows are anchored on the current period's start.
func billingOf(s *subscription) *limiter.BillingDoc {
	start := s.CurrentPeriodStart
	if start == nil {
		start = s.BillingAnchor
	}
	if start == nil {
		start = s.StartDate
	}
	if start == nil || start.IsZero() {
		return nil
	}
	b := &limiter.BillingDoc{PeriodStart: start.UTC(), Interval: interval(s.BillingPeriod, s.BillingPeriodCount)}
	if e := s.CurrentPeriodEnd; e != nil && e.After(*start) {
		t := e.UTC()
		b.PeriodEnd = &t
	}
	if s.Timezone != "" && s.Timezone != "UTC" {
		if _, err := limiter.LoadLocation(s.Timezone); err == nil {
			b.Timezone = s.Timezone
		}
	}
	if b.Timezone == "" {
		b.Timezone = "UTC"
	}
	return b
}

// interval maps a billing period and count to a snapshot interval; "" (MONTHLY) when
// it has no equivalent.
func interval(period string, count int) string {
	p := strings.ToUpper(strings.TrimSpace(period))
	if p == "YEARLY" {
		p = "ANNUAL"
	}
	if count > 1 {
		switch {
		case p == "MONTHLY" && count == 3:
			p = "QUARTERLY"
		case p == "MONTHLY" && count == 6:
			p = "HALF_YEARLY"
		case p == "MONTHLY" && count == 12, p == "QUARTERLY" && count == 4, p == "HALF_YEARLY" && count == 2:
			p = "ANNUAL"
		case p == "DAILY" && count == 7:
			p = "WEEKLY"
		}
	}
	switch p {
	case "DAILY", "WEEKLY", "MONTHLY", "QUARTERLY", "HALF_YEARLY", "ANNUAL":
		return p
	}
	return ""
}

// precedence orders contributors for the fields where one value wins (the reset period,
// a config value): plan, then addon, then subscription override.
func precedence(e *featureEntry) int {
	if len(e.Sources) == 0 {
		return 3
	}
	switch kind, _ := e.Sources[0].entity(); kind {
	case "plan":
		return 0
	case "addon":
		return 1
	case "subscription", "override":
		return 2
	}
	return 3
}

// fold aggregates the entries of one feature with Flexprice's rules: metered limits are
// summed and any unlimited contributor (absent usage_limit) makes the sum unlimited;
// soft is the OR; booleans are OR'd; static values are de-duplicated in order of first
// appearance; the reset period and a config value come from the first contributor that
// has one, in precedence order. The type is lowercased; reset periods are uppercased.
// One entry (the API's own aggregate) folds to itself.
func fold(entries []*featureEntry) (limiter.FeatureDoc, error) {
	entries = slices.Clone(entries)
	slices.SortStableFunc(entries, func(a, b *featureEntry) int { return cmp.Compare(precedence(a), precedence(b)) })
	typ := strings.ToLower(entries[0].Feature.Type)
	fd := limiter.FeatureDoc{Type: typ}
	enabled, unlimited := false, false
	var sum int64
	for _, e := range entries {
		if t := strings.ToLower(e.Feature.Type); t != typ {
			return fd, fmt.Errorf("contributors disagree on the type (%s, %s)", typ, t)
		}
		v := e.Entitlement
		if v == nil {
			v = &entitlementValue{}
		}
		switch typ {
		case "boolean":
			enabled = enabled || (v.IsEnabled != nil && *v.IsEnabled)
		case "metered":
			fd.IsSoftLimit = fd.IsSoftLimit || v.IsSoftLimit
			if fd.UsageResetPeriod == "" {
				fd.UsageResetPeriod = strings.ToUpper(strings.TrimSpace(v.UsageResetPeriod))
			}
			if v.UsageLimit == nil {
				unlimited = true
			} else if *v.UsageLimit > math.MaxInt64-sum {
				sum = math.MaxInt64
			} else {
				sum += *v.UsageLimit
			}
		case "static":
			for _, s := range append(slices.Clone(v.StaticValues), v.StaticValue) {
				if s != "" && !slices.Contains(fd.StaticValues, s) {
					fd.StaticValues = append(fd.StaticValues, s)
				}
			}
		case "config":
			if len(fd.ConfigValue) == 0 && len(bytes.TrimSpace(v.ConfigValue)) > 0 && string(bytes.TrimSpace(v.ConfigValue)) != "null" {
				fd.ConfigValue = v.ConfigValue
			}
		default:
			return fd, fmt.Errorf("unknown feature type %q", e.Feature.Type)
		}
	}
	switch typ {
	case "boolean":
		fd.IsEnabled = &enabled
	case "metered":
		if !unlimited {
			fd.UsageLimit = &sum
		}
	case "config":
		if len(fd.ConfigValue) == 0 {
			fd.ConfigValue = entries[0].Feature.ConfigValue
		}
		var buf bytes.Buffer
		if err := json.Compact(&buf, fd.ConfigValue); err == nil {
			fd.ConfigValue = buf.Bytes()
		}
	}
	return fd, nil
}

// checkFeature validates one feature as the sidecar will, so that one bad feature is left
// out instead of getting the whole snapshot rejected.
func checkFeature(customerID, key string, fd limiter.FeatureDoc) error {
	d := limiter.SnapshotDoc{CustomerID: customerID, Features: map[string]limiter.FeatureDoc{key: fd}}
	_, err := d.Snapshot()
	return err
}

func dedupe(s []string) []string {
	s = slices.DeleteFunc(s, func(x string) bool { return x == "" })
	slices.Sort(s)
	return slices.Compact(s)
}
