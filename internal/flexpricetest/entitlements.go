package flexpricetest

import (
	"encoding/json"
	"net/url"
	"slices"
	"time"
)

// EntitlementsResponse is the body of GET /v1/customers/external/{id}/entitlements.
type EntitlementsResponse struct {
	CustomerID    string              `json:"customer_id"`
	Subscriptions []Subscription      `json:"subscriptions"`
	Features      []AggregatedFeature `json:"features"`
}

// AggregatedFeature is one feature of a customer's effective entitlements.
type AggregatedFeature struct {
	Feature     Feature               `json:"feature"`
	Entitlement AggregatedEntitlement `json:"entitlement"`
	Sources     []Source              `json:"sources"`
}

// AggregatedEntitlement is the entitlement aggregated over its sources. UsageLimit is
// absent (not null) when unlimited.
type AggregatedEntitlement struct {
	IsEnabled        bool            `json:"is_enabled"`
	UsageLimit       *int64          `json:"usage_limit,omitempty"`
	IsSoftLimit      bool            `json:"is_soft_limit"`
	UsageResetPeriod string          `json:"usage_reset_period,omitempty"`
	StaticValues     []string        `json:"static_values,omitempty"`
	ConfigValue      json.RawMessage `json:"config_value,omitempty"`
}

// Source is one contributor to an aggregated entitlement: a plan, one attachment of an
// addon, or a subscription override (which may carry start and end dates).
type Source struct {
	SubscriptionID string     `json:"subscription_id"`
	EntityType     string     `json:"entity_type"`
	EntityID       string     `json:"entity_id"`
	EntitlementID  string     `json:"entitlement_id"`
	Quantity       int64      `json:"quantity"`
	IsEnabled      bool       `json:"is_enabled"`
	UsageLimit     *int64     `json:"usage_limit,omitempty"`
	IsSoftLimit    bool       `json:"is_soft_limit"`
	StaticValue    string     `json:"static_value,omitempty"`
	StartDate      *time.Time `json:"start_date,omitempty"`
	EndDate        *time.Time `json:"end_date,omitempty"`
}

// contributor is one entitlement that reaches a customer through one subscription.
type contributor struct {
	sub *Subscription
	ent *Entitlement
}

func (c contributor) source() Source {
	e := c.ent
	return Source{SubscriptionID: c.sub.ID, EntityType: e.EntityType, EntityID: e.EntityID,
		EntitlementID: e.ID, Quantity: 1, IsEnabled: e.IsEnabled, UsageLimit: e.UsageLimit,
		IsSoftLimit: e.IsSoftLimit, StaticValue: e.StaticValue, StartDate: e.StartDate, EndDate: e.EndDate}
}

// effective computes a customer's effective entitlements at now, over its active and
// trialing subscriptions. The caller holds s.mu.
//
// Aggregated mode lists one entry per feature, aggregated over the contributors in
// effect at now (limits summed, any unlimited contributor makes it unlimited, soft is
// OR, booleans OR, static values de-duplicated); its sources are those contributors plus
// the overrides that have yet to start, dated, so that a client can refresh when they
// do. A feature whose only contributors are overrides that have yet to start is listed
// with those, each dated, and must not be granted before its start. Ended overrides are
// not listed. PerSource mode lists every contributor as its own entry, ended ones too.
func (s *Server) effective(c *Customer, now time.Time) EntitlementsResponse {
	resp := EntitlementsResponse{CustomerID: c.ID, Subscriptions: []Subscription{}, Features: []AggregatedFeature{}}
	var contribs []contributor
	for _, sub := range s.subsOf[c.ID] {
		if sub.SubscriptionStatus != "active" && sub.SubscriptionStatus != "trialing" {
			continue
		}
		resp.Subscriptions = append(resp.Subscriptions, *sub)
		for _, li := range sub.LineItems {
			for _, e := range s.entsOf[li.EntityType+"/"+li.EntityID] {
				contribs = append(contribs, contributor{sub, e})
			}
		}
		for _, e := range s.entsOf["subscription/"+sub.ID] {
			contribs = append(contribs, contributor{sub, e})
		}
	}
	var order []string
	byFeature := map[string][]contributor{}
	for _, ct := range contribs {
		if s.features[ct.ent.FeatureID] == nil {
			continue
		}
		if _, ok := byFeature[ct.ent.FeatureID]; !ok {
			order = append(order, ct.ent.FeatureID)
		}
		byFeature[ct.ent.FeatureID] = append(byFeature[ct.ent.FeatureID], ct)
	}
	slices.SortFunc(order, func(a, b string) int {
		ka, kb := s.features[a].LookupKey, s.features[b].LookupKey
		if ka < kb {
			return -1
		} else if ka > kb {
			return 1
		}
		return 0
	})
	for _, fid := range order {
		f := *s.features[fid]
		cs := byFeature[fid]
		if s.opts.PerSource {
			for _, ct := range cs {
				resp.Features = append(resp.Features, AggregatedFeature{Feature: f,
					Entitlement: aggregate(f, []contributor{ct}), Sources: []Source{ct.source()}})
			}
			continue
		}
		var in, upcoming []contributor
		for _, ct := range cs {
			switch {
			case ct.ent.StartDate != nil && now.Before(*ct.ent.StartDate):
				upcoming = append(upcoming, ct)
			case ct.ent.EndDate == nil || now.Before(*ct.ent.EndDate):
				in = append(in, ct)
			}
		}
		listed := in
		if len(in) == 0 {
			listed = upcoming
		}
		if len(listed) == 0 {
			continue
		}
		af := AggregatedFeature{Feature: f, Entitlement: aggregate(f, listed)}
		for _, ct := range append(slices.Clone(listed), pick(len(in) > 0, upcoming)...) {
			af.Sources = append(af.Sources, ct.source())
		}
		resp.Features = append(resp.Features, af)
	}
	return resp
}

func pick(ok bool, cs []contributor) []contributor {
	if ok {
		return cs
	}
	return nil
}

// aggregate applies Flexprice's aggregation rules to the contributors of one feature.
func aggregate(f Feature, cs []contributor) AggregatedEntitlement {
	var a AggregatedEntitlement
	switch f.Type {
	case "boolean":
		for _, c := range cs {
			a.IsEnabled = a.IsEnabled || c.ent.IsEnabled
		}
	case "metered":
		a.IsEnabled = true
		var sum int64
		unlimited := false
		for _, c := range cs {
			a.IsSoftLimit = a.IsSoftLimit || c.ent.IsSoftLimit
			if a.UsageResetPeriod == "" {
				a.UsageResetPeriod = c.ent.UsageResetPeriod
			}
			if c.ent.UsageLimit == nil {
				unlimited = true
			} else {
				sum += *c.ent.UsageLimit
			}
		}
		if !unlimited {
			a.UsageLimit = &sum
		}
	case "static":
		a.IsEnabled = true
		for _, c := range cs {
			if c.ent.StaticValue != "" && !slices.Contains(a.StaticValues, c.ent.StaticValue) {
				a.StaticValues = append(a.StaticValues, c.ent.StaticValue)
			}
		}
	case "config":
		a.IsEnabled = true
		for _, c := range cs {
			if len(a.ConfigValue) == 0 && len(c.ent.ConfigValue) > 0 {
				a.ConfigValue = c.ent.ConfigValue
			}
		}
		if len(a.ConfigValue) == 0 {
			a.ConfigValue = f.ConfigValue
		}
	}
	return a
}

func unescape(s string) (string, error) { return url.PathUnescape(s) }
