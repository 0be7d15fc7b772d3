package quota

import (
	"context"
	"encoding/json"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"
)

// Asking the fleet for unused quota. Near the limit a sidecar may sit on a few leased
// units that its own traffic no longer spends (a refill landed as its burst ended, a
// refund, a lease sized for a rate that stopped), while another sidecar finds the
// bucket fully granted and refuses the customer. So a refill job that finds too little
// left while requests wait for it, and other sidecars hold grants on the key, asks
// them: it publishes the key on the core NATS subject "gatehouse.quota.<bucket>.want"
// with a reply inbox, waits (at most askWait, well within Options.Wait) until each
// holder answered or enough was returned, then refills once more; if another sidecar
// took what was returned first while some holders had not answered yet, it asks once
// more (maxAskRounds). A sidecar asked for a key's units lately takes no more than its
// waiting requests need when it refills the key (askedLately): the askers' requests
// wait near the limit too. A holder with a
// lease of the key answers at once when it holds nothing unused; otherwise, as soon as
// the lease has gone unused for wantIdle (its traffic stopped), it returns the whole
// unused lease to the bucket, answers with how much, and tells the fleet on
// "gatehouse.quota.<bucket>.freed", which ends every sidecar's exhausted recheck of
// the key; a lease still in use after wantBusy is kept (a hot sidecar keeps spending
// its small lease: the fleet does not under-admit by it) and answered with 0. A refill
// under way on the holder is waited for first: what it brings counts.
//
// Nothing here touches the invariant: a return only lowers a grant, and the asker
// takes what was returned by compare-and-set like any refill. An ask or answer lost
// on the way (core NATS delivers at most once), or a holder that died or cannot hear
// asks, costs only time. An ask that found no unused units anywhere is not repeated
// until the key's value changes (quietRev): a customer that stays exhausted costs one
// read per sidecar and recheck, as before. Far from the limit a refill never finds too
// little left, so nothing is asked: no extra traffic.
const (
	defaultWantIdle = 10 * time.Millisecond  // a lease unused this long is given to an asker
	defaultWantBusy = 50 * time.Millisecond  // a lease still in use after this long is kept
	wantPoll        = 2 * time.Millisecond   // how often a holder looks at its lease meanwhile
	askSlack        = 20 * time.Millisecond  // an asker's wait beyond wantBusy, at least
	askMax          = 250 * time.Millisecond // an asker waits at most this, and Options.Wait/4
	maxAskRounds    = 2                      // asks of one refill job: within Options.Wait/2
	askedLately     = time.Second            // a sidecar asked this recently takes only what waits
)

// wantMsg is the message of an ask; the reply subject receives the answers.
type wantMsg struct {
	Key     string `json:"key"`     // the KV key
	Sidecar string `json:"sidecar"` // the asker's id
}

// answerMsg is a holder's answer to an ask.
type answerMsg struct {
	Sidecar  string `json:"sidecar"`
	Returned int64  `json:"returned"` // units returned to the bucket for the ask
	Kept     int64  `json:"kept"`     // unused units kept, the lease being in use
}

// freedMsg tells the fleet that a sidecar returned units of a key for an ask.
type freedMsg struct {
	Key      string `json:"key"`
	Sidecar  string `json:"sidecar"`
	Returned int64  `json:"returned"`
}

// wantSubject and freedSubject are the subjects of asks and of returns for asks.
func (m *Manager) wantSubject() string  { return m.subjectPrefix() + "want" }
func (m *Manager) freedSubject() string { return m.subjectPrefix() + "freed" }
func (m *Manager) subjectPrefix() string {
	return "gatehouse.quota." + m.opts.Bucket + "."
}

// subscribeWants makes this sidecar answer asks for the keys it holds leases of, and
// hear of units returned for asks.
func (m *Manager) subscribeWants() {
	sub, err := m.nc.Subscribe(m.subjectPrefix()+"*", func(msg *nats.Msg) {
		switch msg.Subject {
		case m.wantSubject():
			m.onWant(msg)
		case m.freedSubject():
			m.onFreed(msg)
		}
	})
	if err != nil {
		m.log.Warn("cannot hear other sidecars ask for unused quota: near a limit this sidecar keeps what it holds until it goes idle",
			zap.String("subject", m.subjectPrefix()+"*"), zap.Error(err))
		return
	}
	m.wantSub = sub
}

// onFreed hears that units of a key went back to the bucket for an ask: a refill no
// longer trusts that the fleet was exhausted, so that what the asker did not take goes
// to whichever sidecar the customer's requests reach next.
func (m *Manager) onFreed(msg *nats.Msg) {
	var f freedMsg
	if json.Unmarshal(msg.Data, &f) != nil || f.Sidecar == m.id || f.Returned <= 0 {
		return
	}
	k, err := ParseKey(f.Key)
	if err != nil {
		return
	}
	m.mu.Lock()
	if l := m.leases[k]; l != nil {
		l.exhaustedUntil = 0
		l.freed++
	}
	m.mu.Unlock()
}

// holdersOf lists the sidecars other than this one that hold grants of l's key, as
// the value last read or written says, and that value's revision: those worth asking,
// unless an ask at that revision found nothing. (A holder that died is asked too, and
// costs the asker its wait: the roster, read every second, would miss the sidecars
// that joined since.) l.mu must not be held.
func (m *Manager) holdersOf(l *lease) (map[string]bool, uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	v, rev := l.value, l.valRev
	if v == nil || v.Limit <= 0 || rev == l.quietRev {
		return nil, rev
	}
	var ids map[string]bool
	for id, g := range v.Sidecars {
		if id == m.id || g <= 0 {
			continue
		}
		if ids == nil {
			ids = map[string]bool{}
		}
		ids[id] = true
	}
	return ids, rev
}

// askWait is how long an asker waits for answers: a busy holder's wantBusy and a
// return's round trip, within Options.Wait/4 so that the requests waiting for the
// refill are answered before their own wait ends.
func (m *Manager) askWait() time.Duration {
	d := m.wantBusy + m.wantIdle + max(4*time.Duration(m.rtt.Load()), askSlack)
	return min(d, askMax, m.opts.Wait/4)
}

// ask asks the holders of l's key for their unused units after a refill found fewer
// than need left, and returns how many they gave back to the bucket, whether any
// answered, and how many holders had not answered when it stopped listening: when
// every holder answered, when need was given back, or after askWait. When no holder
// reported unused units, given back or kept, it records the revision asked at in
// l.quietRev. It runs in a refill's job, holding no lock.
func (m *Manager) ask(l *lease, need int64) (returned int64, answered bool, silent int) {
	ids, rev := m.holdersOf(l)
	if len(ids) == 0 || !m.connected() {
		return 0, false, len(ids)
	}
	var kept int64
	defer func() {
		if returned == 0 && kept == 0 {
			l.mu.Lock()
			l.quietRev = max(l.quietRev, rev)
			l.mu.Unlock()
		}
	}()
	inbox := m.nc.NewInbox()
	sub, err := m.nc.SubscribeSync(inbox)
	if err != nil {
		return 0, false, len(ids)
	}
	defer sub.Unsubscribe()
	data, _ := json.Marshal(wantMsg{Key: l.kvKey, Sidecar: m.id})
	if err := m.nc.PublishMsg(&nats.Msg{Subject: m.wantSubject(), Reply: inbox, Data: data}); err != nil {
		return 0, false, len(ids)
	}
	m.st.asks.Add(1)
	ctx, cancel := context.WithTimeout(m.ctx, m.askWait())
	defer cancel()
	for len(ids) > 0 && returned < max(need, 1) {
		msg, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			break // the wait is over; a holder that did not answer is dead, slow or old
		}
		var a answerMsg
		if json.Unmarshal(msg.Data, &a) != nil {
			continue
		}
		returned += max(a.Returned, 0)
		kept += max(a.Kept, 0)
		answered = true
		delete(ids, a.Sidecar)
	}
	if ce := m.log.Check(zap.DebugLevel, "asked the fleet for unused quota"); ce != nil {
		ce.Write(zap.String("key", l.kvKey), zap.Int64("returned", returned), zap.Int("silent", len(ids)))
	}
	return returned, answered, len(ids)
}

// onWant answers another sidecar's ask: at once when this sidecar holds nothing
// unused of the key, else from a yield job, which the lease's later asks join. It runs
// on the subscription's goroutine and never blocks.
func (m *Manager) onWant(msg *nats.Msg) {
	var w wantMsg
	if msg.Reply == "" || json.Unmarshal(msg.Data, &w) != nil || w.Sidecar == m.id {
		return
	}
	k, err := ParseKey(w.Key)
	if err != nil {
		return
	}
	m.mu.Lock()
	l := m.leases[k]
	if l == nil || m.closed.Load() {
		m.mu.Unlock()
		return // a sidecar with no lease of the key holds nothing of it
	}
	l.askedAt.Store(m.now().UnixNano())
	if !l.yielding && l.c.Lease() <= 0 && !l.refilling.Load() {
		m.mu.Unlock()
		m.answer(msg.Reply, 0, 0)
		return
	}
	l.askers = append(l.askers, msg.Reply)
	if l.yielding {
		m.mu.Unlock()
		return
	}
	l.yielding = true
	m.jobs.Add(1)
	m.mu.Unlock()
	go m.yield(l)
}

// yield gives the lease's unused units back to the bucket once the lease has gone
// unused for wantIdle, waiting at most wantBusy for that, and answers every sidecar
// that asked meanwhile.
func (m *Manager) yield(l *lease) {
	defer m.jobs.Done()
	returned := m.yieldWhenIdle(l)
	var kept int64
	if returned == 0 {
		kept = max(l.c.Lease(), 0)
	}
	m.mu.Lock()
	askers := l.askers
	l.askers, l.yielding = nil, false
	m.mu.Unlock()
	for _, r := range askers {
		m.answer(r, returned, kept)
	}
	if returned > 0 {
		data, _ := json.Marshal(freedMsg{Key: l.kvKey, Sidecar: m.id, Returned: returned})
		_ = m.nc.Publish(m.freedSubject(), data)
	}
}

// yieldWhenIdle waits until the lease is spent, or unused for wantIdle (then returns
// it, and how much it returned), or still in use after wantBusy.
func (m *Manager) yieldWhenIdle(l *lease) int64 {
	start := m.now()
	// The maintenance loop knows since when the counter's usage has not moved.
	held, since := l.idleHeld.Load(), l.idleSince.Load()
	tick := time.NewTicker(wantPoll)
	defer tick.Stop()
	for {
		now := m.now()
		if h := l.c.Held(); h != held {
			held, since = h, now.UnixNano()
		}
		if !l.refilling.Load() { // what a refill under way brings counts
			if l.c.Lease() <= 0 {
				return 0 // spent, or nothing to give
			}
			if now.UnixNano()-since >= int64(m.wantIdle) {
				return m.yieldNow(l)
			}
		}
		if now.Sub(start) >= m.wantBusy {
			return 0 // in use: its own traffic spends it
		}
		select {
		case <-tick.C:
		case <-m.stop:
			return 0
		}
	}
}

// yieldNow returns the lease's unused units for an ask, and how many.
func (m *Manager) yieldNow(l *lease) int64 {
	m.sem <- struct{}{}
	defer func() { <-m.sem }()
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.RequestTimeout)
	defer cancel()
	n, err := m.giveBack(ctx, l)
	if err != nil {
		m.mu.Lock()
		l.retry.Store(true) // the maintenance loop retries
		m.mu.Unlock()
		return 0
	}
	if n > 0 {
		m.st.yields.Add(1)
	}
	return n
}

func (m *Manager) answer(reply string, returned, kept int64) {
	data, _ := json.Marshal(answerMsg{Sidecar: m.id, Returned: returned, Kept: kept})
	if err := m.nc.Publish(reply, data); err != nil {
		if ce := m.log.Check(zap.DebugLevel, "could not answer an ask for unused quota"); ce != nil {
			ce.Write(zap.Error(err))
		}
	}
}

// askAfter is the last step of a refill job that found fewer than need units left
// while requests wait for it: it asks the holders and, if any answered, refills once
// more: with what they gave back, or what another holder gave back to another asker
// between this job's read and its ask (that holder then answers 0: it holds nothing
// any more). When that refill finds nothing (another sidecar took what was given)
// while holders had not answered yet, it asks once more: a holder waits for its lease
// to go unused before it gives, so its units may come after the first ones were taken.
func (m *Manager) askAfter(l *lease, j *job, need, limit int64, rev uint64) limiter.QuotaResult {
	res := limiter.QuotaExhausted
	for range maxAskRounds {
		_, answered, silent := m.ask(l, need)
		if !answered {
			return res
		}
		l.refilling.Store(true)
		res = m.refill(l, j, max(need, j.need.Load()), limit, rev)
		l.refilling.Store(false)
		if res != limiter.QuotaExhausted || silent == 0 || m.closed.Load() {
			return res
		}
	}
	return res
}
