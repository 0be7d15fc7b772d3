package limiter

import (
	"hash/maphash"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// MaxRouteFeatures bounds the features one route may name, so that a Reservation has a
// fixed size and lives on the caller's stack or in a pooled struct.
const MaxRouteFeatures = 16

// Reason says why a request was refused. Zero means admitted.
type Reason uint8

// Reasons, with the codes DESIGN.md section 5 gives them.
const (
	OK Reason = iota
	CustomerMissing
	CustomerUnknown
	FeatureNotEntitled
	UsageLimitExceeded
	ReplicaNotReady
	APIKeyInvalid
	CostInvalid
	RouteNotAllowed
	QuotaUnavailable // the fleet's quota could not be reached and the lease ran out
)

var reasonCodes = [...]string{
	OK: "ok", CustomerMissing: "customer_missing", CustomerUnknown: "customer_unknown",
	FeatureNotEntitled: "feature_not_entitled", UsageLimitExceeded: "usage_limit_exceeded",
	ReplicaNotReady: "replica_not_ready", APIKeyInvalid: "api_key_invalid",
	CostInvalid: "cost_invalid", RouteNotAllowed: "route_not_allowed",
	QuotaUnavailable: "quota_unavailable",
}

// String returns the reason code used in problem bodies, logs and metrics.
func (r Reason) String() string {
	if int(r) < len(reasonCodes) {
		return reasonCodes[r]
	}
	return "unknown"
}

// Reasons lists every reason, for metrics that pre-register their label values.
func Reasons() []Reason {
	out := make([]Reason, len(reasonCodes))
	for i := range out {
		out[i] = Reason(i)
	}
	return out
}

// Use is one feature that a request needs, and what it costs.
type Use struct {
	Feature string
	ID      int32 // FeatureID(Feature), when known: a faster lookup
	Cost    int64
	// Deferred marks a cost known only from the upstream's response: Cost is reserved
	// now (it may be 0), admission needs at least one unit left under a hard limit, and
	// the real cost is set with Reservation.SetActual before Commit.
	Deferred bool
	// FailOpen admits the request, counted like any other, when a hard limit's fleet
	// quota cannot be reached and this sidecar's lease is spent (the route's
	// on_unavailable: allow); otherwise such a request is refused with QuotaUnavailable.
	FailOpen bool
}

// CounterKey names a usage counter: one customer, one feature, one window.
type CounterKey struct {
	Customer    string
	Feature     string
	WindowStart int64 // unix nanoseconds
}

// Counter is the local usage of one CounterKey.
type Counter struct {
	held      atomic.Int64 // committed + reserved: what admission compares with the limit
	committed atomic.Int64 // usage that the upstream served
	start     int64        // Key.WindowStart, beside the hot fields
	End       int64        // window end, unix nanoseconds
	Key       CounterKey

	// The fleet lease (see Quota), for hard limits when the limiter has a Quota.
	lease      atomic.Int64 // units of this sidecar's lease not reserved yet
	leaseLow   atomic.Int64 // below this, Quota.Refill is asked for
	leaseLimit atomic.Int64 // the limit the lease was granted under
	asked      atomic.Bool  // Quota.Refill was asked for and not answered yet
}

// Held is committed plus reserved usage.
func (c *Counter) Held() int64 { return c.held.Load() }

// Committed is the usage that was committed.
func (c *Counter) Committed() int64 { return c.committed.Load() }

// Usage is committed usage of one request for one feature, as the usage outbox records it.
type Usage struct {
	Key      CounterKey
	End      int64 // window end, unix nanoseconds
	Quantity int64
	Overage  int64 // the part of Quantity over the limit (soft limits), as this process counted
	// Limited says the feature has a limit, Limit: the usage outbox then computes the
	// overage again in the order its commits are durable, which a crash can make differ
	// from the order of Commit calls.
	Limited bool
	Limit   int64
}

// Decision is the outcome of Reserve. When Reason is not OK, Feature, Limit, Used and
// ResetAt describe the feature that refused.
type Decision struct {
	Reason    Reason
	Feature   string
	Metered   bool
	Unlimited bool
	Limit     int64
	Used      int64
	ResetAt   int64 // unix nanoseconds of the window's end; 0 when not metered
}

// Reservation holds what Reserve took, until Commit or Refund. It is a plain value:
// keep it in a pooled per-request struct and Reset it before reuse.
type Reservation struct {
	n     int // items in the reservation
	dirty int // items written since the last Reset
	snap  *Snapshot
	items [MaxRouteFeatures]reserved
}

type reserved struct {
	f        *Feature
	c        *Counter // nil for features that do not count
	cost     int64    // what was reserved
	actual   int64    // what to commit
	deferred bool
	leased   bool // cost was taken from the counter's fleet lease
}

// Reset empties r for reuse.
func (r *Reservation) Reset() {
	clear(r.items[:r.dirty])
	r.n, r.dirty, r.snap = 0, 0, nil
}

// Len is the number of features in the reservation.
func (r *Reservation) Len() int { return r.n }

// Meter describes a metered feature of the reservation, for RateLimit headers.
type Meter struct {
	Feature   string
	Unlimited bool
	Limit     int64
	Held      int64 // committed + reserved, this reservation's actual cost included
	Start     int64 // window start, unix nanoseconds
	ResetAt   int64 // window end, unix nanoseconds
}

// Meter returns the i-th feature's counter state; ok is false when it is not metered.
func (r *Reservation) Meter(i int) (m Meter, ok bool) {
	it := &r.items[i]
	if it.c == nil {
		return Meter{}, false
	}
	return Meter{Feature: it.f.Key, Unlimited: it.f.Unlimited, Limit: it.f.Limit, Held: it.c.held.Load() + it.actual - it.cost, Start: it.c.Key.WindowStart, ResetAt: it.c.End}, true
}

// Deferred reports whether the i-th feature's cost comes from the response.
func (r *Reservation) Deferred(i int) bool { return r.items[i].deferred }

// SetActual sets the cost to commit for the i-th feature (a deferred cost read from the
// response). A negative cost is ignored.
func (r *Reservation) SetActual(i int, cost int64) {
	if cost >= 0 {
		r.items[i].actual = cost
	}
}

// Limiter holds the usage counters and makes decisions. The zero value is not usable;
// call New.
type Limiter struct {
	seed   maphash.Seed
	quota  Quota // nil: each hard limit is enforced by this limiter alone
	shards [64]shard
}

type shard struct {
	mu sync.RWMutex // protects m; held only for a map read or write
	m  map[CounterKey]*Counter
}

// New returns an empty limiter.
func New() *Limiter {
	l := &Limiter{seed: maphash.MakeSeed()}
	for i := range l.shards {
		l.shards[i].m = make(map[CounterKey]*Counter)
	}
	return l
}

func (l *Limiter) shard(k *CounterKey) *shard {
	var h maphash.Hash
	h.SetSeed(l.seed)
	h.WriteString(k.Customer)
	h.WriteString(k.Feature)
	return &l.shards[(h.Sum64()^uint64(k.WindowStart))%uint64(len(l.shards))]
}

// counter returns the counter for k, creating it with window end end.
func (l *Limiter) counter(k CounterKey, end int64) *Counter {
	s := l.shard(&k)
	s.mu.RLock()
	c := s.m[k]
	s.mu.RUnlock()
	if c != nil {
		return c
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if c = s.m[k]; c == nil {
		c = &Counter{Key: k, start: k.WindowStart, End: end}
		s.m[k] = c
	}
	return c
}

// windowOf returns the counter of f's window that holds now. The counter of the window
// last used is cached on the feature, so the map is read once per window per snapshot.
func (l *Limiter) windowOf(s *Snapshot, f *Feature, now int64) *Counter {
	if c := f.win.Load(); c != nil && now >= c.start && now < c.End {
		return c
	}
	start, end := WindowAt(&s.Billing, f.Reset, time.Unix(0, now))
	c := l.counter(CounterKey{Customer: s.CustomerID, Feature: f.Key, WindowStart: unixNano(start)}, unixNano(end))
	f.win.Store(c)
	return c
}

// Reserve decides whether the customer of s may make a request that needs uses, and if
// so reserves the cost of every metered feature in r. force admits what a hard limit
// would refuse (shadow mode and fail-open), counting it like soft-limit overage, but still
// refuses what the customer is not entitled to at all unless force is set, in which case
// the returned Decision still says what would have happened.
//
// Concurrent calls never admit more than a hard limit between them: each metered
// feature is taken with a compare-and-swap on its counter, or, with a Quota, on the
// counter's fleet lease (see reserveLease), which may wait for a refill.
func (l *Limiter) Reserve(s *Snapshot, uses []Use, now time.Time, force bool, r *Reservation) Decision {
	var d Decision
	if len(uses) > MaxRouteFeatures {
		uses = uses[:MaxRouteFeatures]
	}
	r.snap, r.n, r.dirty = s, len(uses), max(r.dirty, len(uses))
	// First every gate, so that a refusal takes nothing from any counter.
	for i := range uses {
		f := s.FeatureByID(uses[i].ID, uses[i].Feature)
		if f == nil || !f.Enabled {
			if d.Reason == OK {
				d = Decision{Reason: FeatureNotEntitled, Feature: uses[i].Feature}
			}
			if !force {
				r.n = 0
				return d
			}
		}
		if uses[i].Cost < 0 {
			r.n = 0
			return Decision{Reason: CostInvalid, Feature: uses[i].Feature}
		}
		r.items[i] = reserved{f: f, cost: uses[i].Cost, actual: uses[i].Cost, deferred: uses[i].Deferred}
	}
	n := now.UnixNano()
	for i := range uses {
		it := &r.items[i]
		if it.f == nil || it.f.Type != Metered {
			continue
		}
		f := it.f
		c := l.windowOf(s, f, n)
		it.c = c
		if f.Unlimited || f.Soft || force {
			var held int64
			if force && l.quota != nil && !f.Unlimited && !f.Soft {
				held = l.forceLease(s, f, c, it)
			} else {
				held = c.held.Add(it.cost)
			}
			if d.Reason == OK && !f.Unlimited && !f.Soft && !admits(held-it.cost, it.cost, f.Limit) {
				d = Decision{Reason: UsageLimitExceeded, Feature: f.Key, Metered: true, Limit: f.Limit, Used: held - it.cost, ResetAt: c.End}
			}
			continue
		}
		if l.quota != nil {
			if why, used := l.reserveLease(s, f, c, it, uses[i].FailOpen, now); why != OK {
				l.undo(r, i)
				return Decision{Reason: why, Feature: f.Key, Metered: true, Limit: f.Limit, Used: used, ResetAt: c.End}
			}
			continue
		}
		for {
			held := c.held.Load()
			if !admits(held, it.cost, f.Limit) {
				l.undo(r, i)
				return Decision{Reason: UsageLimitExceeded, Feature: f.Key, Metered: true, Limit: f.Limit, Used: held, ResetAt: c.End}
			}
			if c.held.CompareAndSwap(held, held+it.cost) {
				break
			}
		}
	}
	return d
}

// NeverEnds is the end, in unix nanoseconds, of a window that never resets.
const NeverEnds = math.MaxInt64

// unixNano is t.UnixNano, saturated to the int64 range (NEVER windows end in year 9999).
func unixNano(t time.Time) int64 {
	if t.After(maxNano) {
		return NeverEnds
	}
	if t.Before(minNano) {
		return math.MinInt64
	}
	return t.UnixNano()
}

var (
	maxNano = time.Unix(0, math.MaxInt64)
	minNano = time.Unix(0, math.MinInt64)
)

// admits reports whether cost more fits under limit when held is already taken. A
// request of cost 0 (a deferred cost, or a metered gate) needs one unit left.
func admits(held, cost, limit int64) bool {
	if cost == 0 {
		return held < limit
	}
	return held+cost <= limit && held+cost > held
}

// undo gives back the reservations of items [0, upto).
func (l *Limiter) undo(r *Reservation, upto int) {
	for i := range r.items[:upto] {
		if it := &r.items[i]; it.c != nil {
			it.c.held.Add(-it.cost)
			if it.leased {
				it.c.lease.Add(it.cost)
				it.leased = false
			}
			it.c = nil
		}
	}
	r.n = 0
}

// Commit turns the reservation into usage: each metered feature's actual cost (the
// reserved cost unless SetActual changed it) is committed, and one Usage per metered
// feature with a non-zero quantity is appended to out. The reservation is spent.
func (l *Limiter) Commit(r *Reservation, out []Usage) []Usage {
	for i := range r.items[:r.n] {
		it := &r.items[i]
		if it.c == nil {
			continue
		}
		if delta := it.actual - it.cost; delta != 0 {
			it.c.held.Add(delta)
			if it.leased {
				it.c.lease.Add(-delta) // may go below 0: the next refill covers the debt
			}
		}
		if it.actual == 0 {
			continue
		}
		after := it.c.committed.Add(it.actual)
		u := Usage{Key: it.c.Key, End: it.c.End, Quantity: it.actual}
		if !it.f.Unlimited {
			u.Limited, u.Limit = true, it.f.Limit
			before := after - it.actual
			switch {
			case before >= it.f.Limit:
				u.Overage = it.actual
			case after > it.f.Limit:
				u.Overage = after - it.f.Limit
			}
		}
		out = append(out, u)
	}
	r.n = 0
	return out
}

// Refund gives back everything the reservation holds: the upstream failed, so the
// request did not count.
func (l *Limiter) Refund(r *Reservation) {
	l.undo(r, r.n)
}

// Restore sets a counter's committed usage, as read back from durable storage at start,
// before any request is served for it.
func (l *Limiter) Restore(k CounterKey, end, committed int64) {
	c := l.counter(k, end)
	c.End = max(c.End, end)
	c.committed.Store(committed)
	c.held.Store(committed)
}

// Counters calls fn for every counter of a customer (all customers when customer is
// empty). For introspection; it takes each shard's read lock in turn.
func (l *Limiter) Counters(customer string, fn func(c *Counter)) {
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.RLock()
		for k, c := range s.m {
			if customer == "" || k.Customer == customer {
				fn(c)
			}
		}
		s.mu.RUnlock()
	}
}

// Sweep drops counters whose window ended before horizon and that hold no reservation.
// It returns how many it dropped. Run it now and then with a horizon some time in the
// past, so that late commits still find their counter.
func (l *Limiter) Sweep(horizon time.Time) int {
	h := horizon.UnixNano()
	dropped := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for k, c := range s.m {
			if c.End <= h && c.held.Load() == c.committed.Load() {
				delete(s.m, k)
				dropped++
			}
		}
		s.mu.Unlock()
	}
	return dropped
}
