package limiter

import (
	"cmp"
	"crypto/sha256"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
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
	// The fields the request path reads come first, to share a cache line.

	win       atomic.Pointer[Counter] // the counter of the window last used; see Limiter
	Limit     int64                   // metered only, when !Unlimited; 0 blocks a hard feature at once
	Type      FeatureType
	Enabled   bool
	Unlimited bool // metered only: no usage limit
	Soft      bool // metered only: usage may run over the limit, billed as overage
	Reset     ResetPeriod

	Key          string // lookup key, as routes name it
	StaticValues []string
	ConfigValue  []byte // config features: the raw JSON value
	// HeaderValue is what a route forwards upstream for a static or config feature:
	// the static values joined by ", ", or the config value's JSON.
	HeaderValue string
}

// Snapshot is a customer's effective entitlements: one KV value, decoded and validated.
// A Snapshot is never changed once published; an update is a new Snapshot.
//
// Layout: with 10,000 customers, the request path reads most customers' data from
// memory, not from the CPU's caches, and each separate allocation it touches costs a
// cache and TLB miss. So ParseSnapshot allocates a snapshot, its features and the
// strings the request path reads as one block (allocSnapshot, pack), and keeps a small
// feature index inside the struct, next to CustomerID.
type Snapshot struct {
	CustomerID string

	// The index of Features by FeatureID, sorted by id: the request path finds a
	// feature with a scan of a few int32s instead of hashing its key. Up to
	// inlineFeatures entries live in idx; a longer index is all in more.
	indexed bool
	nidx    uint8
	idx     [inlineFeatures]featRef
	more    []featRef

	UpdatedAt time.Time
	Billing   Billing
	Features  map[string]*Feature
	APIKeys   [][sha256.Size]byte // SHA-256 of each API key that identifies this customer
	Revision  uint64              // KV revision that carried it; 0 when read from a file
}

// inlineFeatures is how many index entries a Snapshot holds in itself.
const inlineFeatures = 8

type featRef struct {
	id int32
	f  *Feature
}

// Feature returns the named feature, or nil when the customer is not entitled to it.
func (s *Snapshot) Feature(key string) *Feature {
	return s.Features[key]
}

// FeatureByID returns the feature interned as id (see FeatureID), or the one named key
// when id is 0 or the snapshot was built without an index. It hashes nothing.
func (s *Snapshot) FeatureByID(id int32, key string) *Feature {
	if id == 0 || !s.indexed {
		return s.Features[key]
	}
	if s.more != nil {
		i, ok := slices.BinarySearchFunc(s.more, id, func(r featRef, id int32) int { return cmp.Compare(r.id, id) })
		if !ok {
			return nil
		}
		return s.more[i].f
	}
	for i := range s.idx[:s.nidx] {
		if s.idx[i].id == id {
			return s.idx[i].f
		}
	}
	return nil
}

// Index builds the by-id feature index. ParseSnapshot calls it; a Snapshot built in Go
// works without it, more slowly.
func (s *Snapshot) Index() {
	refs := make([]featRef, 0, len(s.Features))
	for k, f := range s.Features {
		refs = append(refs, featRef{id: FeatureID(k), f: f})
	}
	slices.SortFunc(refs, func(a, b featRef) int { return cmp.Compare(a.id, b.id) })
	s.indexed, s.more, s.nidx, s.idx = true, nil, 0, [inlineFeatures]featRef{}
	if len(refs) > inlineFeatures {
		s.more = refs
		return
	}
	s.nidx = uint8(copy(s.idx[:], refs))
}

// allocSnapshot allocates a Snapshot with room for n features and strBytes bytes of
// strings (see pack) in one block, so that what a request reads of a customer sits
// together in memory. Larger snapshots get separate allocations.
func allocSnapshot(n, strBytes int) (*Snapshot, []Feature, []byte) {
	switch {
	case n <= 2 && strBytes <= 128:
		b := new(struct {
			s Snapshot
			f [2]Feature
			b [128]byte
		})
		return &b.s, b.f[:n], b.b[:0]
	case n <= 4 && strBytes <= 256:
		b := new(struct {
			s Snapshot
			f [4]Feature
			b [256]byte
		})
		return &b.s, b.f[:n], b.b[:0]
	case n <= 8 && strBytes <= 512:
		b := new(struct {
			s Snapshot
			f [8]Feature
			b [512]byte
		})
		return &b.s, b.f[:n], b.b[:0]
	default:
		return new(Snapshot), make([]Feature, n), nil
	}
}

// pack moves the strings the request path reads (the customer id, feature keys and
// header values) into buf, or into a new buffer when buf is too small, then indexes the
// features. Nothing may write to buf afterwards.
func (s *Snapshot) pack(buf []byte) {
	size := len(s.CustomerID)
	for _, f := range s.Features {
		size += len(f.Key) + len(f.HeaderValue)
	}
	if cap(buf) < size {
		buf = make([]byte, 0, size)
	}
	buf = buf[:0]
	str := func(v string) string {
		if v == "" {
			return ""
		}
		start := len(buf)
		buf = append(buf, v...) // within capacity: buf never moves
		return unsafe.String(&buf[start], len(v))
	}
	s.CustomerID = str(s.CustomerID)
	for _, f := range s.Features {
		f.Key, f.HeaderValue = str(f.Key), str(f.HeaderValue)
	}
	s.Index()
}

// features interns feature keys as small integers for the request path.
var features struct {
	mu  sync.Mutex // protects ids
	ids map[string]int32
}

// FeatureID returns the process-wide id of a feature key, assigning one on first use.
// Ids start at 1. It takes a lock: call it when compiling routes and decoding snapshots,
// never per request.
func FeatureID(key string) int32 {
	features.mu.Lock()
	defer features.mu.Unlock()
	if features.ids == nil {
		features.ids = make(map[string]int32)
	}
	id, ok := features.ids[key]
	if !ok {
		id = int32(len(features.ids) + 1)
		features.ids[key] = id
	}
	return id
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
