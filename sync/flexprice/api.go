package flexprice

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// The wire types below follow FLEXPRICE.md. Decoding ignores fields the bridge does not
// use, so that Flexprice can add fields freely.

type customer struct {
	ID         string `json:"id"`
	ExternalID string `json:"external_id"`
	Timezone   string `json:"timezone"`
}

type pagination struct {
	Total  int `json:"total"`
	Limit  int `json:"limit"`
	Offset int `json:"offset"`
}

type customerList struct {
	Items      []customer  `json:"items"`
	Pagination *pagination `json:"pagination"`
}

type subscription struct {
	ID                 string     `json:"id"`
	CustomerID         string     `json:"customer_id"`
	PlanID             string     `json:"plan_id"`
	SubscriptionStatus string     `json:"subscription_status"`
	StartDate          *time.Time `json:"start_date"`
	EndDate            *time.Time `json:"end_date"`
	TrialEnd           *time.Time `json:"trial_end"`
	CancelAt           *time.Time `json:"cancel_at"`
	CurrentPeriodStart *time.Time `json:"current_period_start"`
	CurrentPeriodEnd   *time.Time `json:"current_period_end"`
	BillingAnchor      *time.Time `json:"billing_anchor"`
	BillingPeriod      string     `json:"billing_period"`
	BillingPeriodCount int        `json:"billing_period_count"`
	Timezone           string     `json:"timezone"`
	LineItems          []struct {
		EntityType string `json:"entity_type"`
		EntityID   string `json:"entity_id"`
	} `json:"line_items"`
}

type subscriptionList struct {
	Items []subscription `json:"items"`
}

type feature struct {
	ID          string          `json:"id"`
	LookupKey   string          `json:"lookup_key"`
	Type        string          `json:"type"`
	ConfigValue json.RawMessage `json:"config_value"`
}

type entitlementValue struct {
	IsEnabled        *bool           `json:"is_enabled"`
	UsageLimit       *int64          `json:"usage_limit"` // absent: unlimited
	IsSoftLimit      bool            `json:"is_soft_limit"`
	UsageResetPeriod string          `json:"usage_reset_period"`
	StaticValues     []string        `json:"static_values"`
	StaticValue      string          `json:"static_value"`
	ConfigValue      json.RawMessage `json:"config_value"`
}

type source struct {
	SubscriptionID string     `json:"subscription_id"`
	EntityType     string     `json:"entity_type"`
	EntityID       string     `json:"entity_id"`
	SourceType     string     `json:"source_type"` // older responses
	PlanID         string     `json:"plan_id"`
	AddonID        string     `json:"addon_id"`
	StartDate      *time.Time `json:"start_date"`
	EndDate        *time.Time `json:"end_date"`
}

// entity returns the source's kind (plan, addon, subscription) and id, reading the
// older source_type/plan_id/addon_id spelling as well.
func (s *source) entity() (kind, id string) {
	kind, id = strings.ToLower(s.EntityType), s.EntityID
	if kind == "" {
		kind = strings.ToLower(s.SourceType)
	}
	if id == "" {
		switch kind {
		case "plan":
			id = s.PlanID
		case "addon":
			id = s.AddonID
		}
	}
	return kind, id
}

type featureEntry struct {
	Feature     *feature          `json:"feature"`
	Entitlement *entitlementValue `json:"entitlement"`
	Sources     []source          `json:"sources"`
}

type entitlementsResponse struct {
	CustomerID string         `json:"customer_id"`
	Features   []featureEntry `json:"features"`
}

// Event is one Flexprice usage event, as POST /v1/events/bulk takes it.
type Event struct {
	EventID            string         `json:"event_id"`
	EventName          string         `json:"event_name"`
	ExternalCustomerID string         `json:"external_customer_id"`
	Timestamp          time.Time      `json:"timestamp"`
	Source             string         `json:"source,omitempty"`
	Properties         map[string]any `json:"properties,omitempty"`
}

// APIError is a Flexprice API answer other than success, with its error body
// ({"code", "message", "http_status_code", "details"}) when it had one.
type APIError struct {
	Method     string
	Path       string // without query and never with the key
	Status     int
	Code       string
	Message    string
	Details    json.RawMessage
	RetryAfter time.Duration // from a 429's Retry-After; 0 when absent
}

func (e *APIError) Error() string {
	msg := e.Message
	if msg == "" {
		msg = e.Code
	}
	if len(msg) > 300 {
		msg = msg[:300] + "…"
	}
	return fmt.Sprintf("flexprice %s %s: status %d: %s", e.Method, e.Path, e.Status, msg)
}

// retryable reports whether the request may succeed if sent again: 429, 408 and 5xx.
func (e *APIError) retryable() bool {
	return e.Status == 429 || e.Status == 408 || e.Status >= 500
}

// badEventIndex returns the index of the rejected event in a 400 on a bulk request, from
// details.index or details.event_id, or -1 when the answer does not say.
func (e *APIError) badEventIndex(events []Event) int {
	var d struct {
		Index   *int   `json:"index"`
		EventID string `json:"event_id"`
	}
	if len(e.Details) == 0 || json.Unmarshal(e.Details, &d) != nil {
		return -1
	}
	if d.Index != nil && *d.Index >= 0 && *d.Index < len(events) &&
		(d.EventID == "" || events[*d.Index].EventID == d.EventID) {
		return *d.Index
	}
	if d.EventID != "" {
		for i := range events {
			if events[i].EventID == d.EventID {
				return i
			}
		}
	}
	return -1
}
