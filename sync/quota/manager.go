package quota

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// Defaults of Options.
const (
	DefaultBucket          = "gatehouse_quota"
	DefaultMinLease        = 10
	DefaultMaxLease        = 100_000
	DefaultLeasePeriod     = 2 * time.Second
	DefaultLowWaterPercent = 25
	DefaultWait            = time.Second
	DefaultIdleReturn      = time.Minute
	DefaultRequestTimeout  = 2 * time.Second
	DefaultRetention       = time.Hour
)

// Options configure New. The zero value of each field means its documented default.
type Options struct {
	// JS reaches the bucket; required. Its connection tells whether NATS is reachable.
	JS jetstream.JetStream
	// Store is the process's database: the sidecar id, and the leases under q/. Required.
	Store *store.Store
	// Log receives the manager's messages, under the name "quota"; nil discards them.
	Log *zap.Logger
	// Bucket is the KV bucket of the leases; default gatehouse_quota.
	Bucket string
	// Replicas is the bucket's replication when the manager creates it; default 1.
	Replicas int
	// MinLease and MaxLease bound a lease far from the limit; default 10 and 100,000.
	// Far from the limit a lease is at least 1/16 of what is left per sidecar, up to
	// MaxLease; near the limit it is smaller, down to 1 unit (see the package doc).
	// A sidecar killed with SIGKILL loses what it holds unused until the window ends:
	// at most about 1.25·MaxLease per key (a lease, and what was left of the last).
	MinLease, MaxLease int64
	// LeasePeriod is how long a lease should last at the sidecar's recent rate, when
	// that is more than the share of what is left; default 2s.
	LeasePeriod time.Duration
	// LowWaterPercent is the part of a lease below which it is refilled ahead of need;
	// default 25.
	LowWaterPercent int
	// Wait bounds how long a request waits for a refill; default 1s.
	Wait time.Duration
	// IdleReturn returns a lease no request used for this long; default 1m, negative never.
	IdleReturn time.Duration
	// RequestTimeout bounds one refill or return (its KV reads and writes); default 2s.
	RequestTimeout time.Duration
	// Retention is how long a key outlives its window before the bucket drops it;
	// default 1h. Clocks of the fleet must agree better than this.
	Retention time.Duration
	// Now is the clock; default time.Now.
	Now func() time.Time
}

// Stats describe the leases of this sidecar.
type Stats struct {
	Refills      uint64        // grants of quota to this sidecar since start
	RefillErrors uint64        // refills and returns that failed (NATS away, no leader, timeout)
	Returns      uint64        // returns of unused quota to the fleet since start
	Returned     int64         // units returned since start
	Exhausted    uint64        // refills that found nothing left for this sidecar
	Asks         uint64        // asks to the other holders of a key for their unused quota (want.go)
	Yields       uint64        // returns of unused quota to answer another sidecar's ask
	Conflicts    uint64        // compare-and-set writes that lost to another sidecar's
	RefillTime   time.Duration // how long a refill takes, a moving average
	Leases       int64         // leases that hold quota now
	HeldUnits    int64         // quota held now, all leases together
}

// Manager holds this sidecar's leases of the fleet's hard limits. It implements
// limiter.Quota; Load it, hand it to the limiter, then Start it.
type Manager struct {
	opts Options
	js   jetstream.JetStream
	nc   *nats.Conn
	db   *badger.DB
	log  *zap.Logger
	id   string // sidecar id: this sidecar's entry in every value
	now  func() time.Time

	bucketMu sync.Mutex // protects bkt
	bkt      *bucket

	// mu protects leases, byCustomer, list, and the lease fields marked as guarded by it.
	// It is held only for map and slice updates and a few field reads and writes, never
	// across a walk of every lease (see walk) nor across a network call: Acquire, on the
	// request path, takes it.
	mu         sync.Mutex
	leases     map[limiter.CounterKey]*lease
	byCustomer map[string][]*lease
	list       []*lease // every lease of leases, in no order, for walk; lease.idx indexes it

	refills chan refillReq // Refill's requests, for the refill loop
	// declined are the leases whose ask the refill loop turned down (fleet exhausted,
	// backing off, NATS away): their counters stay asked until the maintenance loop
	// lets them ask again. Guarded by mu.
	declined []*lease
	dropped  atomic.Bool   // an ask found refills full: the next tick lets every lease ask again
	stop     chan struct{} // closed by Close: the loops end
	sem      chan struct{} // bounds the jobs talking to NATS at once

	ctx     context.Context // cancelled by Close, after the last return
	cancel  context.CancelFunc
	loops   sync.WaitGroup     // the refill, maintenance and roster loops
	jobs    sync.WaitGroup     // refills and returns in flight
	fleet   atomic.Int64       // sidecars in the roster, this one included; 0: not known yet
	wantSub *nats.Subscription // asks of other sidecars (want.go); nil: not subscribed
	rtt     atomic.Int64       // how long a refill takes, nanoseconds, a moving average
	started atomic.Bool
	closed  atomic.Bool
	once    sync.Once
	walkBuf []*lease // the maintenance loop's chunk of leases (see walk); only it uses it
	ticks   int      // maintenance ticks so far; only the maintenance loop uses it

	// Tunables; tests shorten them.
	tick        time.Duration // maintenance period: asks turned down may be made again
	walkEvery   int           // ticks per walk of every lease (idle returns, ended windows, retries)
	recheck     time.Duration // after finding the fleet exhausted, answer so without asking for this long
	failBackoff time.Duration // after a failed refill, refills ahead of need wait this long (recheck after one that found nothing)
	wantIdle    time.Duration // asked for unused quota, a lease unused this long is returned (want.go)
	wantBusy    time.Duration // asked for unused quota, a lease still in use after this long is kept

	// afterTake, set by tests only, runs in a refill once it decided how much to take (n)
	// from the value it read, before it writes: what happens there races the refill.
	afterTake func(l *lease, n int64)

	st struct {
		refills, refillErrors, returns, exhausted, conflicts, asks, yields atomic.Uint64
		returned                                                           atomic.Int64
		waits, grantedWaits                                                [len(WaitBuckets) + 1]atomic.Uint64 // grantedWaits: those that ended with quota granted
	}
}

// WaitBuckets are the upper bounds of the buckets of Manager.Waits.
var WaitBuckets = [...]time.Duration{
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond, time.Millisecond,
	2 * time.Millisecond, 5 * time.Millisecond, 10 * time.Millisecond, 25 * time.Millisecond,
	50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond, time.Second,
}

// Waits counts the requests that waited for a refill, by how long they waited: the
// i-th count is of waits up to WaitBuckets[i], the last of longer ones.
func (m *Manager) Waits() []uint64 {
	out := make([]uint64, len(m.st.waits))
	for i := range out {
		out[i] = m.st.waits[i].Load()
	}
	return out
}

func (m *Manager) noteWait(d time.Duration, res limiter.QuotaResult) {
	i := 0
	for i < len(WaitBuckets) && d > WaitBuckets[i] {
		i++
	}
	m.st.waits[i].Add(1)
	if res == limiter.QuotaGranted {
		m.st.grantedWaits[i].Add(1)
	}
}

var _ limiter.Quota = (*Manager)(nil)

// New returns a manager. It reaches NATS only when a lease is needed.
func New(opts Options) (*Manager, error) {
	if opts.JS == nil || opts.Store == nil {
		return nil, errors.New("quota: JS and Store are required")
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	setDefault(&opts.Bucket, DefaultBucket)
	setDefault(&opts.Replicas, 1)
	setDefault(&opts.MinLease, DefaultMinLease)
	setDefault(&opts.MaxLease, max(DefaultMaxLease, opts.MinLease))
	setDefault(&opts.LeasePeriod, DefaultLeasePeriod)
	setDefault(&opts.LowWaterPercent, DefaultLowWaterPercent)
	setDefault(&opts.Wait, DefaultWait)
	setDefault(&opts.IdleReturn, DefaultIdleReturn)
	setDefault(&opts.RequestTimeout, DefaultRequestTimeout)
	setDefault(&opts.Retention, DefaultRetention)
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.MaxLease < opts.MinLease {
		return nil, fmt.Errorf("quota: max lease %d < min lease %d", opts.MaxLease, opts.MinLease)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{
		opts: opts, js: opts.JS, nc: opts.JS.Conn(), db: opts.Store.DB(), log: opts.Log.Named("quota"),
		id: opts.Store.SidecarID(), now: opts.Now,
		leases: map[limiter.CounterKey]*lease{}, byCustomer: map[string][]*lease{},
		refills: make(chan refillReq, 1024), stop: make(chan struct{}), sem: make(chan struct{}, 16),
		ctx: ctx, cancel: cancel,
		tick: 250 * time.Millisecond, walkEvery: 4, recheck: 500 * time.Millisecond, failBackoff: 250 * time.Millisecond,
		wantIdle: defaultWantIdle, wantBusy: defaultWantBusy,
	}
	return m, nil
}

func setDefault[T int | int64 | string | time.Duration](p *T, d T) {
	var zero T
	if *p == zero {
		*p = d
	}
}

// Start announces this sidecar in the fleet roster (see roster.go), waiting at most
// Options.RequestTimeout and never failing for it, subscribes to the asks of other
// sidecars for unused quota (want.go), then starts the refill loop, the maintenance
// loop (idle returns, ended windows, retries) and the roster loop. The manager owns
// them until Close.
func (m *Manager) Start(ctx context.Context) {
	if m.closed.Load() || !m.started.CompareAndSwap(false, true) {
		return
	}
	if m.connected() {
		ctx, cancel := context.WithTimeout(ctx, m.opts.RequestTimeout)
		if err := m.announce(ctx, false); err != nil {
			m.log.Info("could not announce this sidecar in the fleet roster yet; retrying in the background", zap.Error(err))
		}
		cancel()
	}
	m.subscribeWants()
	m.loops.Add(3)
	go m.refillLoop()
	go m.maintainLoop()
	go m.rosterLoop()
}

// Close stops the loops, waits for the refills in flight, then returns every unused
// lease of an open window to the fleet, until ctx is done. Leases it cannot return
// (NATS away) are logged, not an error: they stay saved for the next start. It is safe
// to call twice.
func (m *Manager) Close(ctx context.Context) error {
	m.once.Do(func() {
		m.mu.Lock() // no job starts once closed is set
		m.closed.Store(true)
		m.mu.Unlock()
		close(m.stop)
		m.loops.Wait()
		m.jobs.Wait() // refills, returns and yields: none starts once closed is set
		if m.wantSub != nil {
			_ = m.wantSub.Unsubscribe()
		}
		m.returnAll(ctx)
		m.cancel()
	})
	return nil
}

// returnAll gives back every unused lease of a window still open, a few at a time.
func (m *Manager) returnAll(ctx context.Context) {
	now := m.now().UnixNano()
	var all []*lease
	m.walk(nil, func(l *lease) {
		if now < l.end {
			all = append(all, l)
		}
	})
	var ls []*lease
	for _, l := range all {
		l.mu.Lock()
		if l.c.Lease() > 0 || l.pending > 0 {
			ls = append(ls, l)
		}
		l.mu.Unlock()
	}
	if len(ls) == 0 {
		return
	}
	if !m.connected() {
		m.log.Warn("NATS is away: leases stay with this sidecar, restored at its next start or back to the fleet when their window ends",
			zap.Int("leases", len(ls)))
		return
	}
	var failed atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, cap(m.sem))
	for _, l := range ls {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			if _, err := m.giveBack(ctx, l); err != nil {
				failed.Add(1)
			}
		}()
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		m.log.Warn("some leases could not be returned: restored at this sidecar's next start, or back to the fleet when their window ends",
			zap.Int64("leases", n), zap.Int("of", len(ls)))
		return
	}
	m.log.Info("leases returned", zap.Int("leases", len(ls)))
}

// Stats reports the manager's counters and what it holds now.
func (m *Manager) Stats() Stats {
	s := Stats{
		Refills: m.st.refills.Load(), RefillErrors: m.st.refillErrors.Load(), Returns: m.st.returns.Load(),
		Returned: m.st.returned.Load(), Exhausted: m.st.exhausted.Load(), Conflicts: m.st.conflicts.Load(),
		Asks: m.st.asks.Load(), Yields: m.st.yields.Load(),
		RefillTime: time.Duration(m.rtt.Load()),
	}
	m.walk(nil, func(l *lease) {
		if n := l.c.Lease(); n > 0 {
			s.Leases++
			s.HeldUnits += n
		}
	})
	return s
}

// leaseOf is the lease of a counter, or nil.
func (m *Manager) leaseOf(k limiter.CounterKey) *lease {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.leases[k]
}

// Held is the unused quota this sidecar holds for a counter; ok is false without a lease.
func (m *Manager) Held(k limiter.CounterKey) (int64, bool) {
	l := m.leaseOf(k)
	if l == nil {
		return 0, false
	}
	return max(l.c.Lease(), 0), true
}

// Pending is the quota this sidecar took back from a counter's lease to return to the
// fleet and the bucket has not confirmed yet: a return in flight, or one that failed
// and waits for the maintenance loop to retry it. Neither this sidecar nor any other
// can use those units until the return lands. ok is false without a lease.
func (m *Manager) Pending(k limiter.CounterKey) (int64, bool) {
	l := m.leaseOf(k)
	if l == nil {
		return 0, false
	}
	return l.pendingSeen.Load(), true
}

// Grant is this sidecar's grant for a counter as the manager last knew it from the
// bucket: what it may use in the window, used units included. For tests and
// introspection; ok is false without a lease.
func (m *Manager) Grant(k limiter.CounterKey) (int64, bool) {
	l := m.leaseOf(k)
	if l == nil {
		return 0, false
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.granted, true
}

// SidecarID is the id under which this sidecar's grants are recorded.
func (m *Manager) SidecarID() string { return m.id }

// connected reports whether NATS is reachable as far as the client knows.
func (m *Manager) connected() bool { return m.nc.Status() == nats.CONNECTED }

// Acquire implements limiter.Quota: it refills c's lease, or joins the refill under
// way, and waits for it at most Options.Wait after now.
func (m *Manager) Acquire(s *limiter.Snapshot, f *limiter.Feature, c *limiter.Counter, need int64, now time.Time) limiter.QuotaResult {
	if m.closed.Load() {
		return limiter.QuotaUnreachable
	}
	t := m.now()
	wait := m.opts.Wait
	if since := t.Sub(now); since > 0 {
		wait -= since
	}
	if wait <= 0 {
		return limiter.QuotaUnreachable
	}
	m.mu.Lock()
	l := m.leaseLocked(c)
	l.noteLimit(s, f)
	switch {
	case t.UnixNano() < l.exhaustedUntil && f.Limit <= l.exhaustedLimit:
		m.mu.Unlock()
		return limiter.QuotaExhausted
	case !m.connected():
		m.mu.Unlock()
		return limiter.QuotaUnreachable
	}
	j := m.refillLocked(l, need)
	m.mu.Unlock()

	timer := time.NewTimer(wait)
	defer timer.Stop()
	res := limiter.QuotaUnreachable
	select {
	case <-j.done:
		res = j.res
	case <-timer.C:
	}
	m.noteWait(m.now().Sub(t), res)
	return res
}

// refillReq is a refill asked for ahead of need.
type refillReq struct {
	s *limiter.Snapshot
	f *limiter.Feature
	c *limiter.Counter
}

// Refill implements limiter.Quota: it hands c to the refill loop without blocking or
// allocating.
func (m *Manager) Refill(s *limiter.Snapshot, f *limiter.Feature, c *limiter.Counter) {
	if m.closed.Load() {
		return
	}
	select {
	case m.refills <- refillReq{s, f, c}:
	default: // full: the maintenance loop lets the request path ask again
		m.dropped.Store(true)
	}
}

// refillLoop starts the refills that the request path asked for ahead of need.
func (m *Manager) refillLoop() {
	defer m.loops.Done()
	for {
		var r refillReq
		select {
		case r = <-m.refills:
		case <-m.stop:
			return
		}
		m.mu.Lock()
		l := m.leaseLocked(r.c)
		l.noteLimit(r.s, r.f)
		now := m.now().UnixNano()
		if l.job.Load() == nil && now >= l.exhaustedUntil && now >= l.aheadUntil.Load() && m.connected() {
			m.refillLocked(l, 0)
		} else {
			// A refill under way already tops the lease up; it lets the counter
			// ask again when it ends, unless this ask came after that: the
			// maintenance loop does then.
			m.declined = append(m.declined, l)
		}
		m.mu.Unlock()
	}
}

// OnChange is the replica's hook (replica.Options.OnChange): when a customer's hard
// limit is lowered or gone, its leases are returned to the fleet, and the lease that a
// request may use is checked against the new limit at once (see limiter.Counter.LeaseLimit);
// when it is raised, a refill no longer trusts that the fleet was exhausted.
func (m *Manager) OnChange(old, new *limiter.Snapshot) {
	if old == nil || m.closed.Load() {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, l := range m.byCustomer[old.CustomerID] {
		limit, rev := int64(-1), l.rev
		if new != nil {
			rev = new.Revision
			if f := new.Features[l.key.Feature]; f != nil && hard(f) {
				limit = f.Limit
			}
		}
		if rev < l.rev {
			continue
		}
		before := l.limit.Load()
		l.limit.Store(limit)
		l.rev = rev
		switch {
		case limit < before:
			m.giveBackLocked(l)
		case limit > before:
			l.exhaustedUntil = 0
			l.aheadUntil.Store(0)
		}
	}
}

// hard reports whether f takes leases.
func hard(f *limiter.Feature) bool {
	return f.Enabled && f.Type == limiter.Metered && !f.Unlimited && !f.Soft
}

// leaseLocked returns the lease of c, creating it. m.mu is held.
func (m *Manager) leaseLocked(c *limiter.Counter) *lease {
	if l := m.leases[c.Key]; l != nil && l.c == c {
		return l
	}
	l := &lease{key: c.Key, kvKey: Key(c.Key), end: c.End, c: c}
	l.limit.Store(-1)
	l.idleHeld.Store(c.Held())
	l.idleSince.Store(m.now().UnixNano())
	m.addLocked(l)
	return l
}

func (m *Manager) addLocked(l *lease) {
	if old := m.leases[l.key]; old != nil {
		m.removeLocked(old)
	}
	m.leases[l.key] = l
	m.byCustomer[l.key.Customer] = append(m.byCustomer[l.key.Customer], l)
	l.idx = len(m.list)
	m.list = append(m.list, l)
}

func (m *Manager) removeLocked(l *lease) {
	if m.leases[l.key] == l {
		delete(m.leases, l.key)
	}
	if i := l.idx; i >= 0 && i < len(m.list) && m.list[i] == l {
		last := len(m.list) - 1
		m.list[i] = m.list[last]
		m.list[i].idx = i
		m.list[last] = nil
		m.list = m.list[:last]
		l.idx = -1
	}
	ls := m.byCustomer[l.key.Customer]
	for i, x := range ls {
		if x == l {
			ls = append(ls[:i], ls[i+1:]...)
			break
		}
	}
	if len(ls) == 0 {
		delete(m.byCustomer, l.key.Customer)
	} else {
		m.byCustomer[l.key.Customer] = ls
	}
}

// walkChunk is how many leases walk copies under Manager.mu at a time: short enough
// that a request waiting for the lock waits for a copy of a few hundred pointers, not
// for a walk of every lease.
const walkChunk = 256

// walk calls fn for every lease, without holding Manager.mu while fn runs: it copies
// Manager.list into buf a chunk at a time under the lock, and returns buf for reuse. A
// lease added during the walk may be visited or not; a lease moved by a removal during
// the walk (removeLocked moves the last lease into the hole) may be missed, never
// visited twice. Leases are removed by the maintenance loop, which sees a missed lease
// next tick, and when a new counter of the same key replaces one (addLocked): a walk
// that runs once the maintenance loop stopped (Close) misses a lease only then.
func (m *Manager) walk(buf []*lease, fn func(*lease)) []*lease {
	if buf == nil {
		buf = make([]*lease, 0, walkChunk)
	}
	for i := 0; ; i += walkChunk {
		m.mu.Lock()
		if i >= len(m.list) {
			m.mu.Unlock()
			return buf
		}
		buf = append(buf[:0], m.list[i:min(i+walkChunk, len(m.list))]...)
		m.mu.Unlock()
		for _, l := range buf {
			fn(l)
		}
		clear(buf) // hold no lease past the walk
		// A walk of thousands of leases is milliseconds of work: let the requests
		// queued behind it on this P run between chunks.
		runtime.Gosched()
	}
}
