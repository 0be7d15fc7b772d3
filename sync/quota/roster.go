package quota

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"go.uber.org/zap"
)

// The roster is how many sidecars share the bucket: the KV key "fleet" (one token, so
// that it names no counter) holds the sidecars seen recently, each with the time it
// last announced itself. Each sidecar announces itself every rosterEvery, reads the
// roster every rosterRead, and counts those seen within rosterTTL; a lease is never
// more than what is left divided by twice that count (or the count of sidecars holding
// grants on the key, if larger). A sidecar that stops announcing leaves the count
// after rosterTTL.
const (
	rosterKey   = "fleet"
	rosterEvery = 5 * time.Second
	rosterRead  = time.Second
	rosterTTL   = 3 * rosterEvery
)

// readRoster returns the roster and its revision.
func (m *Manager) readRoster(ctx context.Context, b *bucket) (roster, uint64, error) {
	raw, rev, err := m.readRaw(ctx, b, rosterKey)
	if err != nil {
		return roster{}, 0, err
	}
	r := roster{}
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &r); err != nil {
			m.log.Warn("the fleet roster does not decode; starting it anew", zap.Error(err))
		}
	}
	if r.Sidecars == nil {
		r.Sidecars = map[string]time.Time{}
	}
	return r, rev, nil
}

// count records how many sidecars the roster holds, seen within rosterTTL, this one
// included.
func (m *Manager) count(r roster) {
	now := m.now()
	n := 0
	for id, at := range r.Sidecars {
		if id != m.id && now.Sub(at) <= rosterTTL {
			n++
		}
	}
	m.fleet.Store(int64(n + 1))
}

// refreshFleet reads the roster and records its count.
func (m *Manager) refreshFleet(ctx context.Context) error {
	b, err := m.openBucket(ctx)
	if err != nil {
		return err
	}
	r, _, err := m.readRoster(ctx, b)
	if err != nil {
		return err
	}
	m.count(r)
	return nil
}

type roster struct {
	Sidecars map[string]time.Time `json:"sidecars"`
}

// announce adds (or, when leaving, removes) this sidecar in the roster by compare-and-
// set, drops the sidecars not seen within rosterTTL, and records how many remain.
func (m *Manager) announce(ctx context.Context, leaving bool) error {
	b, err := m.openBucket(ctx)
	if err != nil {
		return err
	}
	for range maxConflicts {
		r, rev, err := m.readRoster(ctx, b)
		if err != nil {
			return err
		}
		now := m.now()
		for id, at := range r.Sidecars {
			if now.Sub(at) > rosterTTL {
				delete(r.Sidecars, id)
			}
		}
		if leaving {
			delete(r.Sidecars, m.id)
		} else {
			r.Sidecars[m.id] = now.UTC()
		}
		data, _ := json.Marshal(r)
		_, err = m.writeRaw(ctx, b, rosterKey, data, rev, rosterTTL)
		if errors.Is(err, errConflict) {
			continue
		}
		if err != nil {
			return err
		}
		m.count(r)
		return nil
	}
	return errConflict
}

// rosterLoop announces this sidecar and reads the roster until Close, then takes this
// sidecar off the roster.
func (m *Manager) rosterLoop() {
	defer m.loops.Done()
	t := time.NewTimer(rosterEvery)
	defer t.Stop()
	read := time.NewTicker(rosterRead)
	defer read.Stop()
	for {
		select {
		case <-m.stop:
			ctx, cancel := context.WithTimeout(context.Background(), m.opts.RequestTimeout)
			defer cancel()
			if m.connected() {
				_ = m.announce(ctx, true)
			}
			return
		case <-read.C:
			ctx, cancel := context.WithTimeout(m.ctx, m.opts.RequestTimeout)
			_ = m.refreshFleet(ctx) // the count stays as it was
			cancel()
		case <-t.C:
			ctx, cancel := context.WithTimeout(m.ctx, m.opts.RequestTimeout)
			err := m.announce(ctx, false)
			cancel()
			next := rosterEvery
			if err != nil {
				next = time.Second
				if ce := m.log.Check(zap.DebugLevel, "could not announce this sidecar in the fleet roster"); ce != nil {
					ce.Write(zap.Error(err))
				}
			}
			t.Reset(next)
		}
	}
}
