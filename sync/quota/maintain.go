package quota

import (
	"context"
	"fmt"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"go.uber.org/zap"
)

// Load restores the leases saved in Badger onto lim's counters, before any request is
// decided. The unused part of a lease is its grant less the counter's held usage, which
// the usage recorder restored before: a restarted sidecar (same id) never spends twice
// what the fleet granted it, and its first refill reconciles with the bucket. When the
// counters are not durable (durable false), every saved grant counts as spent. Leases
// of windows that ended more than Options.Retention ago are dropped.
func (m *Manager) Load(lim *limiter.Limiter, durable bool) error {
	now := m.now().UnixNano()
	type entry struct {
		key limiter.CounterKey
		kv  string
		s   saved
	}
	var keep []entry
	var drop [][]byte
	err := m.db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(store.PrefixQuota)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			item := it.Item()
			kvKey := string(item.Key()[len(store.PrefixQuota):])
			k, err := ParseKey(kvKey)
			if err != nil {
				m.log.Warn("dropping a saved lease with a bad key", zap.String("key", kvKey), zap.Error(err))
				drop = append(drop, item.KeyCopy(nil))
				continue
			}
			var s saved
			if err := item.Value(func(v []byte) (err error) { s, err = decodeSaved(v); return err }); err != nil {
				m.log.Warn("dropping a saved lease with a bad value", zap.String("key", kvKey), zap.Error(err))
				drop = append(drop, item.KeyCopy(nil))
				continue
			}
			if s.end != limiter.NeverEnds && now >= s.end+int64(m.opts.Retention) {
				drop = append(drop, item.KeyCopy(nil))
				continue
			}
			keep = append(keep, entry{k, kvKey, s})
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("quota: load leases: %w", err)
	}
	if len(drop) > 0 {
		if err := m.db.Update(func(txn *badger.Txn) error {
			for _, k := range drop {
				if err := txn.Delete(k); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return fmt.Errorf("quota: drop old leases: %w", err)
		}
	}
	var units int64
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, e := range keep {
		c := lim.Counter(e.key, e.s.end)
		l := &lease{key: e.key, kvKey: e.kv, end: c.End, c: c, rev: e.s.rev,
			granted: e.s.grant, spent: e.s.spent, known: true}
		l.limit.Store(e.s.limit)
		l.idleHeld.Store(c.Held())
		l.idleSince.Store(now)
		var avail int64
		if durable {
			avail = max(e.s.grant-e.s.spent-c.Held(), 0)
		}
		l.size = avail
		c.GrantLease(avail, m.lowWater(l), e.s.limit)
		units += avail
		m.addLocked(l)
	}
	if len(keep) > 0 {
		m.log.Info("leases restored", zap.Int("leases", len(keep)), zap.Int64("units", units), zap.Bool("durable_counters", durable))
	}
	return nil
}

// maintainLoop runs maintain every tick until Close.
func (m *Manager) maintainLoop() {
	defer m.loops.Done()
	t := time.NewTicker(m.tick)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
			m.maintain()
		}
	}
}

// maintain lets the request path ask for refills again where the refill loop turned
// an ask down, and, every walkEvery ticks, returns the leases that sat idle for
// Options.IdleReturn, those of windows that ended and those a lowered limit no longer
// covers, retries returns that failed, and forgets leases Options.Retention after their
// window ended (deleting their keys when the bucket has no TTL).
//
// Far from the limits no lease asks, so a tick between walks touches no lease: a walk
// reads every lease's counter, a cache miss each, which the request path then pays
// for too. A walk takes no Manager.mu while it runs (see walk): what it reads is atomic,
// immutable or its own, and it takes the lock only for a lease it acts on, so that
// Acquire on the request path never waits behind a walk of thousands of leases.
func (m *Manager) maintain() {
	now := m.now()
	n := now.UnixNano()
	m.letAsk(n)
	m.ticks++
	all := m.dropped.Swap(false) // asks were lost: any counter may be waiting
	if !all && m.ticks%max(m.walkEvery, 1) != 0 {
		return
	}
	var forget, give []*lease
	m.walkBuf = m.walk(m.walkBuf, func(l *lease) {
		if all && l.job.Load() == nil && n >= l.aheadUntil.Load() {
			l.c.RefillDone()
		}
		held := l.c.Held()
		if held != l.idleHeld.Load() {
			l.idleHeld.Store(held)
			l.idleSince.Store(n)
		}
		lease := l.c.Lease()
		switch {
		case l.end != limiter.NeverEnds && n >= l.end+int64(m.opts.Retention):
			forget = append(forget, l)
		case n >= l.end && lease > 0,
			l.retry.Load(),
			l.limit.Load() < l.c.LeaseLimit() && lease > 0,
			m.opts.IdleReturn > 0 && n-l.idleSince.Load() >= int64(m.opts.IdleReturn) && lease > 0:
			give = append(give, l)
		}
	})
	for _, l := range give {
		m.mu.Lock()
		m.giveBackLocked(l)
		m.mu.Unlock()
	}
	for i := 0; i < len(forget); i += walkChunk {
		m.mu.Lock()
		for _, l := range forget[i:min(i+walkChunk, len(forget))] {
			m.removeLocked(l)
		}
		m.mu.Unlock()
	}
	if len(forget) > 0 {
		m.forget(forget)
	}
}

// letAsk lets the counters of the leases whose ask was turned down ask again, once
// no refill is under way and the backoff after the last one has passed.
func (m *Manager) letAsk(n int64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	keep := m.declined[:0]
	for _, l := range m.declined {
		if l.job.Load() == nil && n >= l.aheadUntil.Load() {
			l.c.RefillDone()
		} else {
			keep = append(keep, l)
		}
	}
	clear(m.declined[len(keep):])
	m.declined = keep
}

// forget deletes the saved leases of windows long over, and their keys when the bucket
// does not expire them itself.
func (m *Manager) forget(ls []*lease) {
	err := m.db.Update(func(txn *badger.Txn) error {
		for _, l := range ls {
			if err := txn.Delete(dbKey(l.kvKey)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		m.log.Warn("could not drop saved leases of past windows", zap.Error(err))
	}
	m.bucketMu.Lock()
	b := m.bkt
	m.bucketMu.Unlock()
	if b == nil || b.ttl {
		return
	}
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.RequestTimeout)
	defer cancel()
	for _, l := range ls {
		if err := b.kv.Purge(ctx, l.kvKey); err != nil {
			m.log.Debug("could not delete the key of a past window", zap.String("key", l.kvKey), zap.Error(err))
		}
	}
}
