package replica

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// position is where the replica stands, stored under m/replica in the same Badger
// transaction as the changes it accounts for.
type position struct {
	Bucket        string    `json:"bucket"`
	StreamCreated time.Time `json:"stream_created"` // identifies the bucket's stream
	Revision      uint64    `json:"revision"`       // every retained KV message up to here is applied
	Subjects      uint64    `json:"subjects"`       // s/ records: KV keys with a retained message
	Customers     uint64    `json:"customers"`      // e/ records
	CaughtUp      bool      `json:"caught_up"`      // caught up with this bucket at least once
	FullPending   bool      `json:"full_pending"`   // a full sync began and has not finished
	// StaleRevisions: the revisions in s/ records may come from an earlier stream of the
	// bucket (a full sync over a recreated bucket has not finished).
	StaleRevisions bool      `json:"stale_revisions"`
	LastContact    time.Time `json:"last_contact"` // when the replica was last known current
}

func loadPosition(db *badger.DB) (position, error) {
	var p position
	err := db.View(func(txn *badger.Txn) error {
		item, err := txn.Get([]byte(store.KeyReplica))
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		return item.Value(func(v []byte) error { return json.Unmarshal(v, &p) })
	})
	if err != nil {
		return position{}, fmt.Errorf("load position: %w", err)
	}
	return p, nil
}

func setPosition(txn *badger.Txn, p *position) error {
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	return txn.Set([]byte(store.KeyReplica), b)
}

// savePosition writes the position alone.
func (r *Replica) savePosition() error {
	return r.db.Update(func(txn *badger.Txn) error { return setPosition(txn, &r.pos) })
}

// item is one KV entry on its way into Badger.
type item struct {
	e     jetstream.KeyValueEntry
	skip  bool   // already applied (a full sync over the same stream)
	id    string // customer id from the key; "" when the key names none
	idErr error
	snap  *limiter.Snapshot // decoded value of a put
	err   error             // why the value is rejected
}

func (it *item) put() bool { return it.e.Operation() == jetstream.KeyValuePut }

// effect is what a committed item does to memory.
type effect struct {
	id       string
	snap     *limiter.Snapshot // nil: revoked
	oldKeys  [][sha256.Size]byte
	oldRaw   []byte // previous snapshot JSON, for OnChange when the table lacks it
	hadOld   bool
	swept    bool // removed by a full sync's sweep, not by a KV entry
	rejected *item
}

// applyBatch writes a batch of KV entries, in order, and the position after them, in one
// Badger transaction (split in two when Badger finds it too big). trusted says that
// stored revisions belong to the bucket's current stream, so entries at or below them
// were applied before and are skipped.
func (r *Replica) applyBatch(entries []jetstream.KeyValueEntry, trusted bool) error {
	items := make([]item, len(entries))
	for i, e := range entries {
		items[i].e = e
	}
	if trusted {
		if err := r.markApplied(items); err != nil {
			return err
		}
	}
	decode(items)
	return r.commit(items)
}

// markApplied flags the items whose key already holds this revision or a later one.
func (r *Replica) markApplied(items []item) error {
	return r.db.View(func(txn *badger.Txn) error {
		for i := range items {
			st, ok, err := getSubj(txn, items[i].e.Key())
			if err != nil {
				return err
			}
			items[i].skip = ok && st.rev >= items[i].e.Revision()
		}
		return nil
	})
}

// decode parses the values of the batch, in parallel for large batches.
func decode(items []item) {
	one := func(it *item) {
		if it.skip {
			return
		}
		it.id, it.idErr = CustomerIDFromKey(it.e.Key())
		if !it.put() {
			return
		}
		if it.idErr != nil {
			it.err = it.idErr
			return
		}
		s, err := limiter.ParseSnapshot(it.e.Value())
		switch {
		case err != nil:
			it.err = err
		case s.CustomerID != it.id:
			it.err = fmt.Errorf("customer_id %q does not match key %q (customer %q)", s.CustomerID, it.e.Key(), it.id)
		default:
			s.Revision = it.e.Revision()
			it.snap = s
		}
	}
	n := runtime.GOMAXPROCS(0)
	if len(items) < 64 || n == 1 {
		for i := range items {
			one(&items[i])
		}
		return
	}
	var wg sync.WaitGroup
	for w := range n {
		wg.Go(func() {
			for i := w; i < len(items); i += n {
				one(&items[i])
			}
		})
	}
	wg.Wait()
}

func (r *Replica) commit(items []item) error {
	pos := r.pos
	var effects []effect
	txn := r.db.NewTransaction(true)
	defer txn.Discard()
	err := func() error {
		for i := range items {
			it := &items[i]
			if it.skip {
				continue
			}
			ef, err := r.write(txn, it, &pos)
			if err != nil {
				return err
			}
			effects = append(effects, ef)
			pos.Revision = max(pos.Revision, it.e.Revision())
		}
		pos.LastContact = time.Now()
		if err := setPosition(txn, &pos); err != nil {
			return err
		}
		return txn.Commit()
	}()
	if errors.Is(err, badger.ErrTxnTooBig) && len(items) > 1 {
		txn.Discard()
		if err := r.commit(items[:len(items)/2]); err != nil {
			return err
		}
		return r.commit(items[len(items)/2:])
	}
	if err != nil {
		return fmt.Errorf("apply %d entries: %w", len(items), err)
	}
	r.pos = pos
	for i := range effects {
		r.effect(&effects[i])
	}
	r.publish() // after the effects: a reader that sees the revision sees its changes
	return nil
}

// write puts one item's changes into txn and accounts for them in pos.
func (r *Replica) write(txn *badger.Txn, it *item, pos *position) (effect, error) {
	key, rev := it.e.Key(), it.e.Revision()
	_, known, err := getSubj(txn, key)
	if err != nil {
		return effect{}, err
	}
	if !known {
		pos.Subjects++
	}
	ef := effect{id: it.id}
	var oldRaw []byte
	if it.idErr == nil {
		oldRaw, err = getEnt(txn, it.id)
		if err != nil {
			return effect{}, err
		}
		ef.hadOld = oldRaw != nil
		ef.oldRaw = oldRaw
		ef.oldKeys = apiKeysOf(oldRaw)
	}
	kind := kindDeleted
	switch {
	case it.put() && it.err != nil:
		kind = kindRejected
		ef.rejected = it
	case it.put():
		kind = kindLive
		if err := txn.Set(entKey(it.id), encodeEnt(rev, it.e.Value())); err != nil {
			return effect{}, err
		}
		if err := r.reindex(txn, it.id, ef.oldKeys, it.snap.APIKeys); err != nil {
			return effect{}, err
		}
		if !ef.hadOld {
			pos.Customers++
		}
		ef.snap = it.snap
	case ef.hadOld: // delete or purge of a known customer
		if err := txn.Delete(entKey(it.id)); err != nil {
			return effect{}, err
		}
		if err := r.reindex(txn, it.id, ef.oldKeys, nil); err != nil {
			return effect{}, err
		}
		pos.Customers--
	}
	if err := txn.Set(subjKey(key), subjState{kind: kind, rev: rev}.encode()); err != nil {
		return effect{}, err
	}
	return ef, nil
}

// reindex moves customer id's API key index entries from old to new.
func (r *Replica) reindex(txn *badger.Txn, id string, old, new [][sha256.Size]byte) error {
	for i := range old {
		if containsKey(new, &old[i]) {
			continue
		}
		k := apiKeyKey(&old[i])
		owner, err := getValue(txn, k)
		if err != nil {
			return err
		}
		if string(owner) == id { // another customer may list the same key now
			if err := txn.Delete(k); err != nil {
				return err
			}
		}
	}
	for i := range new {
		if err := txn.Set(apiKeyKey(&new[i]), []byte(id)); err != nil {
			return err
		}
	}
	return nil
}

func containsKey(keys [][sha256.Size]byte, k *[sha256.Size]byte) bool {
	for i := range keys {
		if keys[i] == *k {
			return true
		}
	}
	return false
}

// effect applies a committed change to memory, counts it and tells OnChange.
func (r *Replica) effect(ef *effect) {
	if it := ef.rejected; it != nil {
		r.rejected.Add(1)
		r.rej.reject(it.e.Key(), it.e.Revision(), it.err)
		return
	}
	if !ef.swept {
		r.applied.Add(1)
	}
	if ef.id == "" || (ef.snap == nil && !ef.hadOld) {
		return // a delete of a key that named no known customer
	}
	if ef.snap == nil {
		r.deleted.Add(1)
	}
	prev := r.tab.changed(ef.id, ef.snap, ef.oldKeys)
	if r.onChange == nil {
		return
	}
	if prev == nil && ef.hadOld {
		prev, _ = limiter.ParseSnapshot(entRaw(ef.oldRaw))
	}
	r.onChange(prev, ef.snap)
}

func entRaw(v []byte) []byte {
	_, raw, err := decodeEnt(v)
	if err != nil {
		return nil
	}
	return raw
}

// apiKeysOf reads the API key hashes of a stored e/ value without decoding the rest.
func apiKeysOf(v []byte) [][sha256.Size]byte {
	if v == nil {
		return nil
	}
	var doc struct {
		Keys []string `json:"api_keys_sha256"`
	}
	if json.Unmarshal(entRaw(v), &doc) != nil {
		return nil
	}
	out := make([][sha256.Size]byte, 0, len(doc.Keys))
	for _, h := range doc.Keys {
		var sum [sha256.Size]byte
		if len(h) == 2*sha256.Size {
			if _, err := hex.Decode(sum[:], []byte(h)); err == nil {
				out = append(out, sum)
			}
		}
	}
	return out
}

func getValue(txn *badger.Txn, k []byte) ([]byte, error) {
	item, err := txn.Get(k)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return item.ValueCopy(nil)
}

func getEnt(txn *badger.Txn, id string) ([]byte, error) { return getValue(txn, entKey(id)) }

func getSubj(txn *badger.Txn, kvKey string) (subjState, bool, error) {
	v, err := getValue(txn, subjKey(kvKey))
	if err != nil || v == nil {
		return subjState{}, false, err
	}
	st, err := decodeSubj(v)
	return st, err == nil, err
}

// rejectLog logs rejected values without flooding the log: at most 20 lines per 10s,
// then one line saying how many were not logged.
type rejectLog struct {
	log        *zap.Logger
	mu         sync.Mutex // protects the fields below
	windowFrom time.Time
	logged     int
	suppressed int
}

func (l *rejectLog) reject(key string, rev uint64, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if now.Sub(l.windowFrom) > 10*time.Second {
		if l.suppressed > 0 {
			l.log.Warn("rejected snapshots not logged", zap.Int("count", l.suppressed))
		}
		l.windowFrom, l.logged, l.suppressed = now, 0, 0
	}
	if l.logged >= 20 {
		l.suppressed++
		return
	}
	l.logged++
	msg := err.Error()
	if len(msg) > 1000 {
		msg = msg[:1000] + "…"
	}
	l.log.Warn("snapshot rejected; the last good one stays in force",
		zap.String("key", key), zap.Uint64("revision", rev), zap.String("error", msg))
}
