package quota

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"go.uber.org/zap"
)

// maxConflicts bounds the compare-and-set rounds of one refill or return.
const maxConflicts = 32

// maxRereads bounds the reads again of a refill job that found the fleet exhausted
// while units were freed (runJob).
const maxRereads = 3

// contended is how long after a lost compare-and-set a refill reads the key before it
// writes, rather than write with the value it last read or wrote.
const contended = time.Second

// lease is this sidecar's share of one counter's limit. The units it may still spend
// sit on the counter (limiter.Counter.Lease), where the request path takes them.
type lease struct {
	key   limiter.CounterKey
	kvKey string
	end   int64 // window end, unix nanoseconds
	c     *limiter.Counter

	// Guarded by Manager.mu. The atomics among them are written under Manager.mu and
	// read without it by the maintenance walk, which takes no lock per lease.
	idx            int                 // the lease's place in Manager.list; -1 once removed
	limit          atomic.Int64        // the newest hard limit known locally; -1: none (return everything)
	rev            uint64              // the entitlement revision that set limit
	job            atomic.Pointer[job] // the refill under way, which Acquire joins; nil when none
	giving         bool                // a return is queued or under way
	exhaustedUntil int64               // unix nanoseconds: the fleet had nothing left; do not ask again before
	exhaustedLimit int64               // the limit under which it was exhausted
	freed          uint64              // how many times other sidecars announced units of the key freed (onFreed)
	aheadUntil     atomic.Int64        // unix nanoseconds: no refill ahead of need before (the last one failed or found nothing)
	askedAt        atomic.Int64        // unix nanoseconds: another sidecar last asked for the key's unused units (onWant)
	retry          atomic.Bool         // the last return failed
	refilling      atomic.Bool         // a refill's compare-and-set is under way (not its ask)
	yielding       bool                // a yield job answers the asks of other sidecars (want.go)
	askers         []string            // reply subjects of the asks that the yield job answers

	// pendingSeen is pending as last set, for Manager.Pending, which must not wait on mu
	// (a return holds it across its network call).
	pendingSeen atomic.Int64

	// Written by the maintenance loop once the lease is in Manager.list, read by yield.
	idleHeld  atomic.Int64 // the counter's held usage when it last changed, as a tick saw it
	idleSince atomic.Int64 // unix nanoseconds: the tick that saw it change

	// mu serialises the lease's work with the bucket and guards what follows.
	mu      sync.Mutex
	granted int64 // this sidecar's grant in the bucket's value, as far as it knows
	// spent is the part of granted that this database cannot account for: a grant the
	// bucket holds for this sidecar id that no local record explains (the database was
	// rebuilt or wiped, or a crash fell between the bucket's answer and the save). It may
	// have been used, so it is never handed out again.
	spent   int64
	pending int64  // units taken back from the counter whose return the bucket has not confirmed
	known   bool   // granted was restored or read from the bucket
	value   *Value // the value last read or written, and its revision
	valRev  uint64
	// quietRev is the key's revision at which an ask found no unused units on any
	// other sidecar: asks wait for a newer revision (want.go).
	quietRev uint64
	lostAt   time.Time // when a compare-and-set of this lease last lost to another sidecar's
	size     int64     // the last lease granted
	rate     float64   // recent use, units per second
	rateAt   time.Time
	rateUse  int64
}

// job is one refill; its waiters read res once done is closed.
type job struct {
	done chan struct{}
	res  limiter.QuotaResult
	// need is the most that a request waiting for the job needs, written under
	// Manager.mu; 0 while none waits (a refill ahead of need).
	need atomic.Int64
	// demand is what the requests waiting for the job need together: a refill takes
	// at least that much when the bucket has it, so that one compare-and-set serves
	// every request that waits, not one of them. Added to under Manager.mu, read by
	// the job without it.
	demand atomic.Int64
	// freed is the lease's freed count when the job started: a job that ends exhausted
	// after units were freed meanwhile must not mark the key exhausted, since its last
	// read of the bucket may predate the return (Manager.mu).
	freed uint64
}

// noteLimit records the limit that a request's snapshot gives, if it is the newest
// known. Manager.mu is held.
func (l *lease) noteLimit(s *limiter.Snapshot, f *limiter.Feature) {
	if s.Revision > l.rev || s.Revision == l.rev && (l.rev == 0 || l.limit.Load() < 0) {
		l.limit.Store(f.Limit)
		l.rev = s.Revision
	}
}

// refillLocked starts a refill of at least need units (0: ahead of need), or returns
// the one under way, which then covers need too and counts it in its demand.
// Manager.mu is held.
func (m *Manager) refillLocked(l *lease, need int64) *job {
	if j := l.job.Load(); j != nil {
		j.need.Store(max(j.need.Load(), need))
		j.demand.Add(need)
		return j
	}
	j := &job{done: make(chan struct{}), freed: l.freed}
	j.need.Store(need)
	j.demand.Store(need)
	if m.closed.Load() {
		j.res = limiter.QuotaUnreachable
		close(j.done)
		return j
	}
	l.job.Store(j)
	l.refilling.Store(true)
	limit, rev := l.limit.Load(), l.rev
	m.jobs.Add(1)
	go m.runJob(l, j, need, limit, rev)
	return j
}

// runJob runs a refill job. When the refill finds too little left and requests wait
// for it, it asks the other holders for their unused units (want.go) before it
// answers. A job that no request waits for does not ask, and does not make the
// requests that come after it refuse without asking: it only delays the next refill
// ahead of need, so that a sidecar whose traffic stopped does not take back, ahead of
// need, what another gave for a request that waits.
func (m *Manager) runJob(l *lease, j *job, need, limit int64, rev uint64) {
	defer m.jobs.Done()
	res := m.refill(l, j, need, limit, rev)
	m.mu.Lock()
	if waiting := j.need.Load(); res == limiter.QuotaExhausted && waiting > need {
		// Requests joined a refill ahead of need, which leaves the last units to
		// requests that wait: they do.
		m.mu.Unlock()
		res = m.refill(l, j, waiting, limit, rev)
		m.mu.Lock()
	}
	l.refilling.Store(false)
	if waiting := j.need.Load(); res == limiter.QuotaExhausted && waiting > 0 && limit > 0 && !m.closed.Load() {
		m.mu.Unlock() // requests that join meanwhile wait for the ask too
		res = m.askAfter(l, j, waiting, limit, rev)
		m.mu.Lock()
	}
	// Units another sidecar freed while the job ran (onFreed) may be in the bucket
	// although the job's last read did not see them: a read that raced the return, or
	// that took place before it and was answered late. The requests that wait read
	// again rather than be refused while those units sit there. The freed message
	// follows the return's write, so a read after it sees the return; a few rounds
	// bound a stream of freed messages.
	for range maxRereads {
		waiting := j.need.Load()
		if res != limiter.QuotaExhausted || waiting == 0 || l.freed == j.freed || m.closed.Load() {
			break
		}
		j.freed = l.freed
		m.mu.Unlock()
		l.refilling.Store(true)
		res = m.refill(l, j, waiting, limit, rev)
		l.refilling.Store(false)
		m.mu.Lock()
	}
	m.finishLocked(l, j, res, limit)
	m.mu.Unlock()
	close(j.done)
}

// finishLocked records a refill job's result on its lease: an exhausted key is not
// asked again for a recheck period, an unreachable bucket for a backoff. Manager.mu is
// held; the caller closes j.done.
func (m *Manager) finishLocked(l *lease, j *job, res limiter.QuotaResult, limit int64) {
	now := m.now()
	j.res = res
	l.job.Store(nil)
	switch res {
	case limiter.QuotaExhausted:
		// Units another sidecar freed while the job ran (onFreed) may be in the bucket
		// although the job's last read did not see them: then the next request reads
		// again instead of refusing for a recheck period while they sit there.
		if l.freed == j.freed {
			l.aheadUntil.Store(now.Add(m.recheck).UnixNano())
			if j.need.Load() > 0 {
				l.exhaustedUntil, l.exhaustedLimit = now.Add(m.recheck).UnixNano(), limit
			}
		}
	case limiter.QuotaUnreachable:
		l.aheadUntil.Store(now.Add(m.failBackoff).UnixNano())
	}
}

// giveBackLocked queues a return of everything the lease holds unused. Manager.mu is
// held.
func (m *Manager) giveBackLocked(l *lease) {
	if l.giving || m.closed.Load() {
		return
	}
	l.giving = true
	m.jobs.Add(1)
	go func() {
		defer m.jobs.Done()
		m.sem <- struct{}{}
		defer func() { <-m.sem }()
		ctx, cancel := context.WithTimeout(m.ctx, m.opts.RequestTimeout)
		defer cancel()
		_, err := m.giveBack(ctx, l)
		m.mu.Lock()
		l.giving = false
		l.retry.Store(err != nil) // the maintenance loop retries
		m.mu.Unlock()
	}()
}

// refill tops the lease up by at least need units (at least 1), sized by size, and by
// at least what the requests waiting for job j need together when the bucket has it.
func (m *Manager) refill(l *lease, j *job, need, limit int64, rev uint64) limiter.QuotaResult {
	m.sem <- struct{}{}
	defer func() { <-m.sem }()
	l.mu.Lock()
	defer l.mu.Unlock()
	defer l.c.RefillDone()
	if limit < 0 { // no hard limit any more: nothing to take
		return limiter.QuotaExhausted
	}
	enough := max(need, j.demand.Load()) // the waiting requests' need; a refill ahead of need tops up to the low water
	if enough == 0 {
		enough = l.c.LeaseLow()
	}
	if l.c.Lease() >= max(enough, 1) && l.c.LeaseLimit() <= limit {
		return limiter.QuotaGranted // a refill that ended while this one waited covered it
	}
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.RequestTimeout)
	defer cancel()
	leftLast := false
	n, err := m.update(ctx, l, limit, rev, true, func(v *Value, mine int64) int64 {
		free := v.Limit - (v.Granted - v.Sidecars[m.id]) - mine
		holders := max(v.holders(m.id), m.fleet.Load())
		need := max(need, j.need.Load()) // requests that joined a refill ahead of need wait for it
		// The last units go to requests that wait for them, here or on another
		// sidecar, not ahead of need to a sidecar whose traffic may have stopped.
		leftLast = need == 0 && free > 0 && free < 2*holders
		if need == 0 && free < 2*holders {
			return 0
		}
		var n int64
		switch {
		case m.now().UnixNano()-l.askedAt.Load() < int64(askedLately):
			// Other sidecars asked lately for this key's unused units: their requests
			// wait near the limit too. Take only what the requests waiting here
			// need, so that no units sit in this lease while theirs are refused.
			if need == 0 {
				leftLast = free > 0
			} else if free >= need {
				n = min(max(need, j.demand.Load()), free)
			}
		default:
			n = m.size(l, free, holders, max(need, 1))
			if n > 0 {
				n = max(n, min(j.demand.Load(), free)) // every request that waits, if the bucket has it
			}
		}
		if m.afterTake != nil {
			m.afterTake(l, n)
		}
		return n
	})
	switch {
	case err != nil:
		m.st.refillErrors.Add(1)
		if ce := m.log.Check(zap.DebugLevel, "lease refill failed"); ce != nil {
			ce.Write(zap.String("key", l.kvKey), zap.Error(err))
		}
		return limiter.QuotaUnreachable
	case n > 0:
		m.st.refills.Add(1)
		return limiter.QuotaGranted
	}
	// A reconciliation may have found quota that was ours. A refill ahead of need that
	// found nothing is not granted for the units left from before: it backs off (runJob)
	// rather than read the key again at every request until they are spent.
	if need = max(need, j.need.Load()); need == 0 && l.c.Lease() >= max(l.c.LeaseLow(), 1) || need > 0 && l.c.Lease() >= need {
		return limiter.QuotaGranted
	}
	if !leftLast {
		m.st.exhausted.Add(1)
	}
	return limiter.QuotaExhausted
}

// giveBack returns every unused unit of the lease to the fleet, and writes a newer
// limit that the bucket does not hold yet. It reports the units returned.
func (m *Manager) giveBack(ctx context.Context, l *lease) (int64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := m.takeBack(l); err != nil {
		return 0, err
	}
	m.mu.Lock()
	limit, rev := l.limit.Load(), l.rev
	m.mu.Unlock()
	if l.pending == 0 && (limit < 0 || l.value != nil && l.value.LimitRevision >= rev) {
		return 0, nil // nothing to return, and the bucket knows the limit
	}
	returning := l.pending
	_, err := m.update(ctx, l, limit, rev, false, func(*Value, int64) int64 { return 0 })
	if err != nil {
		m.st.refillErrors.Add(1)
		m.log.Debug("lease return failed; it is retried", zap.String("key", l.kvKey), zap.Error(err))
		return 0, err
	}
	if returning > 0 {
		m.st.returns.Add(1)
		m.st.returned.Add(returning)
	}
	return returning, nil
}

// setPending sets l.pending and its copy for Manager.Pending. l.mu is held.
func (l *lease) setPending(n int64) {
	l.pending = n
	l.pendingSeen.Store(n)
}

// takeBack moves every unused unit of the lease from the counter to pending, recording
// the lower grant in Badger before the bucket hears of it. l.mu is held.
func (m *Manager) takeBack(l *lease) error {
	r := l.c.TakeLease(-1)
	if r == 0 {
		return nil
	}
	l.setPending(l.pending + r)
	if err := m.save(l); err != nil {
		l.c.GrantLease(r, l.c.LeaseLow(), l.c.LeaseLimit()) // keep it rather than lose it
		l.setPending(l.pending - r)
		return err
	}
	return nil
}

// update reads the key (or trusts the value it last read or wrote), reconciles this
// sidecar's grant with it, and writes back this sidecar's grant less what is pending
// return plus what take decides to take, by compare-and-set, until it wins. It returns
// the units taken and added to the counter's lease. A refill (refill true) trusts the
// remembered value only for a write, which the compare-and-set checks: finding too
// little left in it, it reads the key again, since other sidecars may have returned
// quota meanwhile. l.mu is held.
func (m *Manager) update(ctx context.Context, l *lease, limit int64, rev uint64, refill bool, take func(v *Value, mine int64) int64) (int64, error) {
	b, err := m.openBucket(ctx)
	if err != nil {
		return 0, err
	}
	if limit >= 0 && limit < l.c.LeaseLimit() {
		if err := m.takeBack(l); err != nil { // a lowered limit: what is held goes back first
			return 0, err
		}
	}
	start := m.now()
	if refill && start.Sub(l.lostAt) < contended {
		// Other sidecars write the key too: the value last written is most likely
		// stale, and a write with it would cost a lost round trip before the read.
		l.value = nil
	}
	for range maxConflicts {
		v, vrev := l.value, l.valRev
		fresh := v == nil
		if fresh {
			if v, vrev, err = m.read(ctx, b, l.kvKey); err != nil {
				return 0, err
			}
			if v == nil {
				v = newValue(l.key, l.end)
			} else {
				l.value, l.valRev = v, vrev // the bucket's, as read: what an ask consults
			}
			if err := m.reconcile(l, v); err != nil {
				l.value = nil
				return 0, err
			}
		}
		v = v.clone()
		newLimit := limit >= 0 && (rev > v.LimitRevision || vrev == 0) && (v.Limit != limit || v.LimitRevision != rev)
		if newLimit {
			v.Limit, v.LimitRevision = limit, rev
		}
		mine := l.granted - l.pending
		n := max(take(v, mine), 0)
		if n == 0 && refill && !fresh {
			l.value = nil // too little left as last seen: see whether that is still so
			continue
		}
		if n == 0 && l.pending == 0 && (!newLimit || v.Granted == 0) {
			l.setLimit(v, limit)
			return 0, nil // nothing to write
		}
		v.setGrant(m.id, mine+n)
		newRev, err := m.write(ctx, b, l.kvKey, v, vrev, l.end)
		if errors.Is(err, errConflict) {
			m.st.conflicts.Add(1)
			l.value, l.lostAt = nil, m.now()
			continue
		}
		if err != nil {
			l.value = nil // the write may have landed: the next read reconciles
			return 0, err
		}
		l.value, l.valRev = v, newRev
		l.granted = mine + n
		l.setPending(0)
		m.noteRTT(m.now().Sub(start))
		if n > 0 {
			l.size = n
		}
		eff := v.Limit
		if limit >= 0 {
			eff = min(eff, limit)
		}
		l.c.GrantLease(n, m.lowWater(l), eff)
		if err := m.save(l); err != nil {
			m.log.Warn("lease not saved: a restart without NATS would not use it", zap.String("key", l.kvKey), zap.Error(err))
		}
		return n, nil
	}
	return 0, errors.New("quota: too many conflicting writes")
}

// noteRTT folds the duration of a successful refill or return into Manager.rtt.
func (m *Manager) noteRTT(d time.Duration) {
	old := m.rtt.Load()
	switch {
	case old == 0:
		m.rtt.Store(int64(d))
	case int64(d) > old: // quick to rise, slow to fall: the low water errs high
		m.rtt.Store((old + int64(d)) / 2)
	default:
		m.rtt.Store((7*old + int64(d)) / 8)
	}
}

// setLimit refreshes the counter's lease limit after a round that wrote nothing.
func (l *lease) setLimit(v *Value, limit int64) {
	eff := v.Limit
	if limit >= 0 {
		eff = min(eff, limit)
	}
	l.c.GrantLease(0, l.c.LeaseLow(), eff)
}

// reconcile makes the lease agree with this sidecar's grant in a value read from the
// bucket, which is the truth: a grant the sidecar did not hear acknowledged is added
// to the counter's lease; a return that landed clears pending; a grant lower than
// known (the key was purged) takes back what the counter still holds of it. l.mu is
// held.
func (m *Manager) reconcile(l *lease, v *Value) error {
	kv := v.Sidecars[m.id]
	if !l.known {
		l.known, l.granted = true, kv
		if kv == 0 {
			return nil
		}
		// Usage this database lost is not in its counters: count the whole unexplained
		// grant as spent. At worst the fleet under-admits by one lease; it never
		// over-admits.
		l.spent = max(kv-l.c.Held(), 0)
		m.log.Warn("the bucket holds a grant for this sidecar that its database does not know; counting it spent",
			zap.String("key", l.kvKey), zap.Int64("grant", kv), zap.Int64("spent", l.spent))
		return m.save(l)
	}
	switch {
	case kv == l.granted:
		return nil
	case kv > l.granted:
		l.c.GrantLease(kv-l.granted, m.lowWater(l), l.c.LeaseLimit())
	default:
		drop := l.granted - kv
		p := min(drop, l.pending)
		l.setPending(l.pending - p)
		if drop -= p; drop > 0 {
			took := l.c.TakeLease(drop)
			m.log.Warn("the bucket records less quota for this sidecar than it was granted; holding less",
				zap.String("key", l.kvKey), zap.Int64("bucket", kv), zap.Int64("known", l.granted), zap.Int64("taken_back", took))
		}
	}
	l.granted = kv
	return m.save(l)
}

// size is how many units a refill takes when free units are left to the fleet and
// holders sidecars share them (see leaseSize), after folding the use since the last
// refill into the lease's recent rate. l.mu is held.
func (m *Manager) size(l *lease, free, holders, need int64) int64 {
	if free < need || free <= 0 {
		return 0
	}
	now := m.now()
	used := l.c.Held()
	if !l.rateAt.IsZero() {
		if dt := now.Sub(l.rateAt); dt >= time.Millisecond {
			inst := float64(used-l.rateUse) / dt.Seconds()
			if l.rate == 0 {
				l.rate = inst
			} else {
				l.rate = (l.rate + inst) / 2
			}
			l.rateAt, l.rateUse = now, used
		}
	} else {
		l.rateAt, l.rateUse = now, used
	}
	grow := min(m.opts.MaxLease, max(2*l.size, m.opts.MinLease))
	// What the recent rate uses while the next refill is under way: a lease of less
	// would leave this sidecar with less after each refill than before it.
	keep := int64(l.rate * time.Duration(m.rtt.Load()).Seconds())
	return leaseSize(l.rate, m.opts.LeasePeriod, m.opts.MinLease, grow, m.opts.MaxLease, free, holders, need, keep)
}

// farShare is the part of what is left, per sidecar, that a lease takes at least. Far
// from the limit it makes a lease large whatever the rate: a customer with a limit of
// 10^12 and a low rate takes max_lease at once and refills once in 0.75·max_lease
// requests, where a lease sized by its rate alone would stay near min_lease and cost a
// compare-and-set every few requests. It also bounds what the fleet's sidecars sit on
// far from the limit, and so what a SIGKILL loses: about 1/farShare of what is left.
const farShare = 16

// leaseSize is the arithmetic of a refill, in four steps:
//
//  1. by rate: what lasts period at rate, at least minLease and at most grow (grow is
//     twice the last lease within [minLease, max_lease]: a lease follows a rising rate
//     over a few refills, not at once on a rate measured over a few requests);
//  2. by what is left: at least free/(farShare·holders), at most capLease (max_lease);
//     this is the size far from the limit, where it is larger than step 1;
//  3. near the limit: at most free/(2·holders), or keep if more (what the recent
//     rate uses while a refill is under way) within an equal share free/holders; down
//     to 1 unit, so that no sidecar sits on the last units while another is refused;
//     this is smaller than steps 1 and 2 only when what is left is small
//     (free < 2·holders·lease). Without keep, a sidecar whose traffic spends more in
//     a refill's round trip than free/(2·holders) would end each refill holding less
//     than before it, down to nothing, and its requests would wait for the refills;
//  4. at least need, at most free; 0 when free cannot cover need.
//
// The grants of the fleet never add up to more than the limit whatever this returns:
// a grant is raised by compare-and-set only within free.
func leaseSize(rate float64, period time.Duration, minLease, grow, capLease, free, holders, need, keep int64) int64 {
	if free < need || free <= 0 {
		return 0
	}
	holders = max(holders, 1)
	grow = max(grow, minLease)
	n := grow
	if want := rate * period.Seconds(); want < float64(grow) {
		n = max(int64(want), minLease)
	}
	n = max(n, min(free/(farShare*holders), capLease))
	n = min(n, max(free/(2*holders), min(keep, free/holders), 1))
	return min(max(n, need), free)
}

// lowWater is the lease level below which a refill is asked for: LowWaterPercent of
// the last lease, and at least what the recent rate uses in four times the time a
// refill takes, so that near the limit, where leases are small, the next one is on its
// way before this one runs out. l.mu is held.
func (m *Manager) lowWater(l *lease) int64 {
	ahead := int64(l.rate * 4 * time.Duration(m.rtt.Load()).Seconds())
	return max(l.size*int64(m.opts.LowWaterPercent)/100, ahead, 1)
}

// save records the lease in Badger: the grant less what is pending return.
func (m *Manager) save(l *lease) error {
	s := saved{end: l.end, grant: l.granted - l.pending, limit: l.c.LeaseLimit(), spent: l.spent}
	m.mu.Lock()
	s.rev = l.rev
	m.mu.Unlock()
	return m.db.Update(func(txn *badger.Txn) error { return txn.Set(dbKey(l.kvKey), s.encode()) })
}
