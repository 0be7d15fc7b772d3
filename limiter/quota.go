package limiter

import "time"

// Quota hands out a fleet's shares of hard limits as leases (DESIGN.md section 6):
// a sidecar admits hard-limited usage only against the lease it holds on the counter,
// so that the sidecars of a fleet never admit more than the limit between them.
// sync/quota implements it; a Limiter without a Quota enforces each hard limit alone.
//
// The lease lives on the Counter (see Counter.Lease): the request path takes from it
// with a compare-and-swap, lock-free and without allocating, and calls a Quota method
// only when the lease runs low (Refill) or short (Acquire).
type Quota interface {
	// Acquire is called on the request path when c's lease cannot cover need units of
	// f, a hard-limited feature of s, for a request that arrived at now. It may block:
	// only while this sidecar holds too little and the fleet may still have quota, and
	// never beyond a bounded wait counted from now. QuotaGranted means the lease may
	// now cover the request (the caller tries again, and may call again should other
	// requests have taken it first); the other results are final for this request.
	Acquire(s *Snapshot, f *Feature, c *Counter, need int64, now time.Time) QuotaResult
	// Refill asks for c's lease to be topped up ahead of need: a reservation took it
	// below its low-water mark. It must not block. The limiter asks once, until
	// Counter.RefillDone lets it ask again.
	Refill(s *Snapshot, f *Feature, c *Counter)
}

// QuotaResult is what Quota.Acquire found.
type QuotaResult uint8

// Results of Quota.Acquire.
const (
	// QuotaGranted: the lease was topped up; the caller tries again.
	QuotaGranted QuotaResult = iota
	// QuotaExhausted: the fleet has no quota left for this window (or too little for
	// the request): the request is refused as over its limit.
	QuotaExhausted
	// QuotaUnreachable: the quota could not be reached in time (NATS away, no
	// JetStream leader); the route's on_unavailable policy decides.
	QuotaUnreachable
)

var quotaResultNames = [...]string{QuotaGranted: "granted", QuotaExhausted: "exhausted", QuotaUnreachable: "unreachable"}

func (r QuotaResult) String() string {
	if int(r) < len(quotaResultNames) {
		return quotaResultNames[r]
	}
	return "unknown"
}

// SetQuota makes every hard limit take leases from q. Call it once, before the limiter
// decides anything; nil (the default) enforces each hard limit alone.
func (l *Limiter) SetQuota(q Quota) { l.quota = q }

// Counter returns the counter of k, creating it with window end end when it does not
// exist. It is for the quota package restoring leases at start.
func (l *Limiter) Counter(k CounterKey, end int64) *Counter { return l.counter(k, end) }

// Lease is the part of this sidecar's fleet lease on the counter that no reservation
// holds yet. It may be negative after a deferred cost overran it: the next reservation
// then waits for a refill that covers the debt.
func (c *Counter) Lease() int64 { return c.lease.Load() }

// LeaseLimit is the limit under which the lease was granted. A request that sees a
// lower limit does not use the lease: it asks Quota.Acquire, which returns it.
func (c *Counter) LeaseLimit() int64 { return c.leaseLimit.Load() }

// LeaseLow is the lease's low-water mark.
func (c *Counter) LeaseLow() int64 { return c.leaseLow.Load() }

// GrantLease adds n units to the lease, granted under limit, with the low-water mark
// low below which Refill is asked for.
func (c *Counter) GrantLease(n, low, limit int64) {
	c.leaseLow.Store(low)
	c.leaseLimit.Store(limit)
	c.lease.Add(n)
}

// TakeLease removes up to n units of the lease (every unit when n < 0) and returns how
// many it removed; it never takes the lease below 0.
func (c *Counter) TakeLease(n int64) int64 {
	for {
		a := c.lease.Load()
		if a <= 0 {
			return 0
		}
		take := a
		if n >= 0 && n < a {
			take = n
		}
		if c.lease.CompareAndSwap(a, a-take) {
			return take
		}
	}
}

// RefillDone lets the request path ask Quota.Refill again. The quota's maintenance
// calls it for every lease a few times a second: it writes only when there is something
// to undo, so that the counter's cache line, which every request of the key reads and
// writes, is not taken from the CPUs serving them for nothing.
func (c *Counter) RefillDone() {
	if c.asked.Load() {
		c.asked.Store(false)
	}
}

// maxAcquire bounds the rounds of one reservation with Quota.Acquire, which bounds each
// round's wait; it only matters when other requests take each refill first.
const maxAcquire = 64

// reserveLease reserves it.cost of a hard-limited feature from c's lease, asking l.quota
// for more when it is short. It returns OK, UsageLimitExceeded or QuotaUnavailable, and
// the usage to report with a refusal.
func (l *Limiter) reserveLease(s *Snapshot, f *Feature, c *Counter, it *reserved, failOpen bool, now time.Time) (Reason, int64) {
	need := max(it.cost, 1) // a cost of 0 (deferred) needs one unit left
	for round := 0; ; {
		held := c.held.Load()
		if !admits(held, it.cost, f.Limit) {
			return UsageLimitExceeded, held
		}
		a := c.lease.Load()
		if a >= need && f.Limit >= c.leaseLimit.Load() {
			if it.cost != 0 && !c.lease.CompareAndSwap(a, a-it.cost) {
				continue
			}
			c.held.Add(it.cost)
			it.leased = true
			if a-it.cost < c.leaseLow.Load() && !c.asked.Load() && c.asked.CompareAndSwap(false, true) {
				l.quota.Refill(s, f, c)
			}
			return OK, 0
		}
		if round++; round > maxAcquire {
			return l.quotaUnavailable(c, it, failOpen)
		}
		switch l.quota.Acquire(s, f, c, need, now) {
		case QuotaGranted:
		case QuotaExhausted:
			return UsageLimitExceeded, max(held, f.Limit)
		default:
			return l.quotaUnavailable(c, it, failOpen)
		}
	}
}

// quotaUnavailable applies the route's policy when the quota cannot be reached: fail
// open admits the request outside any lease, counted like any other.
func (l *Limiter) quotaUnavailable(c *Counter, it *reserved, failOpen bool) (Reason, int64) {
	if failOpen {
		c.held.Add(it.cost)
		return OK, 0
	}
	return QuotaUnavailable, c.held.Load()
}

// forceLease is reserveLease for a forced reservation (shadow mode): it takes from the
// lease what it can without waiting, and counts the request in any case, asking for a
// refill when the lease did not cover it. It returns the counter's held usage after.
func (l *Limiter) forceLease(s *Snapshot, f *Feature, c *Counter, it *reserved) int64 {
	need := max(it.cost, 1)
	for {
		a := c.lease.Load()
		if a < need || f.Limit < c.leaseLimit.Load() {
			break
		}
		if it.cost == 0 || c.lease.CompareAndSwap(a, a-it.cost) {
			it.leased = true
			return c.held.Add(it.cost)
		}
	}
	if !c.asked.Load() && c.asked.CompareAndSwap(false, true) {
		l.quota.Refill(s, f, c)
	}
	return c.held.Add(it.cost)
}
