package limiter

import (
	"crypto/sha256"
	"sync/atomic"
	"time"
)

// FeatureType is the kind of a feature, spelled as Flexprice spells it.
type FeatureType uint8

// Feature types.
const (
	Boolean FeatureType = iota + 1
	Metered
	Static
	Config
)

var featureTypeNames = [...]string{Boolean: "boolean", Metered: "metered", Static: "static", Config: "config"}

func (t FeatureType) String() string {
	if int(t) < len(featureTypeNames) && featureTypeNames[t] != "" {
		return featureTypeNames[t]
	}
	return "unknown"
}

// ResetPeriod is how often a metered feature's usage returns to 0.
type ResetPeriod uint8

// Reset periods. BillingPeriod is the zero value: absent means the billing period.
const (
	BillingPeriod ResetPeriod = iota
	Daily
	Weekly
	Monthly
	Quarterly
	HalfYearly
	Annual
	Never
)

var resetPeriodNames = [...]string{
	BillingPeriod: "BILLING_PERIOD", Daily: "DAILY", Weekly: "WEEKLY", Monthly: "MONTHLY",
	Quarterly: "QUARTERLY", HalfYearly: "HALF_YEARLY", Annual: "ANNUAL", Never: "NEVER",
}

func (p ResetPeriod) String() string {
	if int(p) < len(resetPeriodNames) {
		return resetPeriodNames[p]
	}
	return "unknown"
}

// ParseResetPeriod reads a reset period as Flexprice spells it. The empty string is
// BillingPeriod.
func ParseResetPeriod(s string) (ResetPeriod, bool) {
	if s == "" {
		return BillingPeriod, true
	}
	for p, name := range resetPeriodNames {
		if name == s {
			return ResetPeriod(p), true
		}
	}
	return 0, false
}

// Billing is the customer's billing period, which anchors every usage window.
type Billing struct {
	PeriodStart time.Time // the anchor, in Location
	PeriodEnd   time.Time // zero when unknown: then PeriodStart + Interval
	Interval    ResetPeriod
	Location    *time.Location
}

// Feature is one entitlement of one customer. It is immutable once decoded, except for
// the window cache, which only the limiter touches.
type Feature struct {
	Key          string // lookup key, as routes name it
	Type         FeatureType
	Enabled      bool
	Unlimited    bool  // metered only: no usage limit
	Limit        int64 // metered only, when !Unlimited; 0 blocks a hard feature at once
	Soft         bool  // metered only: usage may run over the limit, billed as overage
	Reset        ResetPeriod
	StaticValues []string
	ConfigValue  []byte // config features: the raw JSON value
	// HeaderValue is what a route forwards upstream for a static or config feature:
	// the static values joined by ", ", or the config value's JSON.
	HeaderValue string

	win atomic.Pointer[window] // the window last seen, with its counter; see Limiter
}

// Snapshot is a customer's effective entitlements: one KV value, decoded and validated.
// A Snapshot is never changed once published; an update is a new Snapshot.
type Snapshot struct {
	CustomerID string
	UpdatedAt  time.Time
	Billing    Billing
	Features   map[string]*Feature
	APIKeys    [][sha256.Size]byte // SHA-256 of each API key that identifies this customer
	Revision   uint64              // KV revision that carried it; 0 when read from a file
}

// Feature returns the named feature, or nil when the customer is not entitled to it.
func (s *Snapshot) Feature(key string) *Feature {
	return s.Features[key]
}

// Source is where the limiter and the proxy read snapshots from: the replica, or a
// snapshot file in tests and simple deployments.
//
// Performance contract: Customer and CustomerByKey are called on every request. On a hit
// they must answer from memory in well under a microsecond, take no lock held across
// work and allocate nothing; a miss may read local disk but must never make a network call.
type Source interface {
	// Customer returns the customer's current snapshot, or nil when it is unknown.
	// id is only read during the call.
	Customer(id []byte) *Snapshot
	// CustomerByKey returns the snapshot whose api_keys_sha256 lists this key hash.
	CustomerByKey(sum *[sha256.Size]byte) *Snapshot
	// Ready reports whether the source has caught up with its control plane at least
	// once, so that an unknown customer is really unknown.
	Ready() bool
}
