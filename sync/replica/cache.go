package replica

import (
	"crypto/sha256"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// table is the replica's memory: the customers read recently, decoded, in sharded maps
// that the request path reads under a shard's read lock (held for one map lookup, never
// across work), with golang-lru deciding which of them to keep.
//
// A hit touches no LRU: the LRU is told about a hot entry only when it may be at risk,
// once it has seen more than size/4 insertions since it was last told (see touch), so a
// customer read at least that often is never evicted and a hit costs two atomic loads
// beyond the map lookup. Unknown customers and API keys are remembered in separate,
// smaller LRUs (negative entries), so that a flood of unknown ids costs one Badger read
// per id, not one per request, and cannot push known customers out.
//
// Staleness: every change the replica applies bumps the generation of the customer's
// shard after it is committed to Badger; a miss that read Badger before the change
// notices the new generation and reads again instead of caching what it read.
type table struct {
	seed maphash.Seed
	ids  [nShards]idShard
	keys [nShards]keyShard

	lruMu   sync.Mutex // protects lru, neg and negKeys
	lru     *simplelru.LRU[string, *entry]
	neg     *simplelru.LRU[string, *entry]
	negKeys *simplelru.LRU[[sha256.Size]byte, struct{}]

	size, negSize int
	promoteAfter  uint64
	ticks         atomic.Uint64 // insertions into lru: the clock that touch compares with
}

const nShards = 64

type idShard struct {
	mu  sync.RWMutex // protects m, gen and the entries' next
	m   idMap
	gen uint64         // bumped after every committed change of a customer in this shard
	_   [128 - 64]byte // a shard to itself: no false sharing of mu between shards
}

// idMap finds entries by the 64-bit hash of their customer id, the same hash that
// chose the shard. Entries whose ids share a hash are chained through next.
//
// It is an open-addressing table of (hash, entry) slots with linear probing, not a Go
// map: with 10,000 customers and more, the request path reads most customers' data from
// memory, and a lookup here reads one slot (a cache line holds four) and then the entry,
// which holds its id. A Go map reads its header, directory, table and group first, each
// a cache miss of its own, and a map keyed by the id string would read the key's bytes
// from a third place. The zero idMap is empty and ready to use.
type idMap struct {
	slots []idSlot // a power of two long, at most 3/4 full; nil when empty
	n     int      // slots in use
}

type idSlot struct {
	h uint64
	e *entry // nil: the slot is free
}

// minIDSlots is the size of a shard's table once it holds anything.
const minIDSlots = 16

// home is where a chain of hash h starts its probe. The shard took h's low bits.
func (m *idMap) home(h uint64) int { return int(h>>8) & (len(m.slots) - 1) }

// find returns the slot of hash h, or -1.
func (m *idMap) find(h uint64) int {
	if m.n == 0 {
		return -1
	}
	mask := len(m.slots) - 1
	for i := m.home(h); ; i = (i + 1) & mask {
		sl := &m.slots[i]
		if sl.e == nil {
			return -1
		}
		if sl.h == h {
			return i
		}
	}
}

// head returns the chain of hash h.
func (m *idMap) head(h uint64) *entry {
	if i := m.find(h); i >= 0 {
		return m.slots[i].e
	}
	return nil
}

func (m *idMap) get(h uint64, id []byte) *entry {
	for e := m.head(h); e != nil; e = e.next {
		if e.id == string(id) {
			return e
		}
	}
	return nil
}

func (m *idMap) getString(h uint64, id string) *entry {
	for e := m.head(h); e != nil; e = e.next {
		if e.id == id {
			return e
		}
	}
	return nil
}

// put adds e, in place of an entry of the same id.
func (m *idMap) put(h uint64, e *entry) {
	i := m.find(h)
	if i < 0 {
		m.insert(h, e)
		return
	}
	sl := &m.slots[i]
	var prev *entry
	for cur := sl.e; cur != nil; prev, cur = cur, cur.next {
		if cur.id == e.id {
			e.next = cur.next
			if prev == nil {
				sl.e = e
			} else {
				prev.next = e
			}
			cur.next = nil
			return
		}
	}
	e.next = sl.e
	sl.e = e
}

// insert puts the chain e of hash h, which has no slot, in a free slot.
func (m *idMap) insert(h uint64, e *entry) {
	if (m.n+1)*4 > len(m.slots)*3 {
		m.grow()
	}
	mask := len(m.slots) - 1
	i := m.home(h)
	for m.slots[i].e != nil {
		i = (i + 1) & mask
	}
	m.slots[i] = idSlot{h: h, e: e}
	m.n++
}

// grow doubles the table. Readers hold the shard's read lock, so they never see it.
func (m *idMap) grow() {
	old := m.slots
	m.slots, m.n = make([]idSlot, max(2*len(old), minIDSlots)), 0
	for _, sl := range old {
		if sl.e != nil {
			m.insert(sl.h, sl.e)
		}
	}
}

// remove takes e out, if it is there.
func (m *idMap) remove(h uint64, e *entry) {
	i := m.find(h)
	if i < 0 {
		return
	}
	sl := &m.slots[i]
	var prev *entry
	for cur := sl.e; cur != nil; prev, cur = cur, cur.next {
		if cur != e {
			continue
		}
		switch {
		case prev != nil:
			prev.next = cur.next
		case cur.next != nil:
			sl.e = cur.next
		default:
			m.free(i)
		}
		cur.next = nil
		return
	}
}

// free empties slot i and moves back the slots after it that probing would no longer
// reach (backward-shift deletion: the table needs no tombstones).
func (m *idMap) free(i int) {
	mask := len(m.slots) - 1
	for j := (i + 1) & mask; m.slots[j].e != nil; j = (j + 1) & mask {
		// The slot at j may move to i when i lies on its probe path, from its home to j.
		if (j-m.home(m.slots[j].h))&mask >= (j-i)&mask {
			m.slots[i] = m.slots[j]
			i = j
		}
	}
	m.slots[i] = idSlot{}
	m.n--
}

// len is the number of chains (distinct hashes) in the table.
func (m *idMap) len() int { return m.n }

type keyShard struct {
	mu  sync.RWMutex                 // protects m and gen
	m   map[[sha256.Size]byte]*entry // a nil entry: the key is known to be unknown
	gen uint64
	_   [128 - 40]byte
}

// entry is one customer in memory.
type entry struct {
	snap    atomic.Pointer[limiter.Snapshot] // nil for negative and dropped entries
	touched atomic.Uint64                    // table.ticks when the LRU last heard of it
	next    *entry                           // the next entry whose id has the same hash
	id      string                           // in idb when it fits
	neg     bool                             // a negative entry: the customer is unknown
	idb     [inlineID]byte
}

// inlineID is the longest customer id an entry holds in itself.
const inlineID = 48

func newEntry(id string, neg bool) *entry {
	e := &entry{neg: neg}
	if len(id) > 0 && len(id) <= inlineID {
		n := copy(e.idb[:], id)
		e.id = unsafe.String(&e.idb[0], n)
	} else {
		e.id = id
	}
	return e
}

func newTable(size, negSize int) *table {
	t := &table{seed: maphash.MakeSeed(), size: size, negSize: negSize, promoteAfter: uint64(size / 4)}
	for i := range t.ids {
		t.keys[i].m = make(map[[sha256.Size]byte]*entry)
	}
	t.lru, _ = simplelru.NewLRU[string, *entry](size, nil)
	t.neg, _ = simplelru.NewLRU[string, *entry](negSize, nil)
	t.negKeys, _ = simplelru.NewLRU[[sha256.Size]byte, struct{}](negSize, nil)
	return t
}

// idShard returns id's shard and the hash that finds it there.
func (t *table) idShard(id []byte) (*idShard, uint64) {
	h := maphash.Bytes(t.seed, id)
	return &t.ids[h%nShards], h
}

func (t *table) idShardString(id string) (*idShard, uint64) {
	h := maphash.String(t.seed, id)
	return &t.ids[h%nShards], h
}

func (t *table) keyShard(sum *[sha256.Size]byte) *keyShard {
	return &t.keys[sum[0]%nShards]
}

// get is the request path: it allocates nothing. hit is false when Badger must be asked.
func (t *table) get(id []byte) (s *limiter.Snapshot, hit bool) {
	sh, h := t.idShard(id)
	sh.mu.RLock()
	e := sh.m.get(h, id)
	sh.mu.RUnlock()
	if e == nil {
		return nil, false
	}
	if e.neg {
		return nil, true
	}
	if s = e.snap.Load(); s == nil {
		return nil, false // dropped while we looked
	}
	t.touch(e)
	return s, true
}

// getKey is the request path for API keys: it allocates nothing.
func (t *table) getKey(sum *[sha256.Size]byte) (s *limiter.Snapshot, hit bool) {
	ks := t.keyShard(sum)
	ks.mu.RLock()
	e, ok := ks.m[*sum]
	ks.mu.RUnlock()
	if !ok {
		return nil, false
	}
	if e == nil {
		return nil, true
	}
	if s = e.snap.Load(); s == nil || !hasKey(s, sum) {
		return nil, false
	}
	t.touch(e)
	return s, true
}

func hasKey(s *limiter.Snapshot, sum *[sha256.Size]byte) bool {
	for i := range s.APIKeys {
		if s.APIKeys[i] == *sum {
			return true
		}
	}
	return false
}

// touch tells the LRU that e is in use, but only once it has aged by size/4 insertions.
func (t *table) touch(e *entry) {
	now := t.ticks.Load()
	if now-e.touched.Load() <= t.promoteAfter {
		return
	}
	e.touched.Store(now)
	t.lruMu.Lock()
	t.lru.Get(e.id)
	t.lruMu.Unlock()
}

// gen returns the generation of id's shard, to pass to fill.
func (t *table) gen(id string) uint64 {
	sh, _ := t.idShardString(id)
	sh.mu.RLock()
	defer sh.mu.RUnlock()
	return sh.gen
}

// fill caches what a miss read from Badger (s nil: the customer is unknown), unless the
// customer's shard changed since gen was read: then ok is false and the caller reads
// again. It returns the entry in the table, which may be one another miss put there.
func (t *table) fill(id string, gen uint64, s *limiter.Snapshot) (e *entry, ok bool) {
	sh, h := t.idShardString(id)
	sh.mu.Lock()
	if sh.gen != gen {
		sh.mu.Unlock()
		return nil, false
	}
	if cur := sh.m.getString(h, id); cur != nil && (cur.neg || cur.snap.Load() != nil) {
		sh.mu.Unlock()
		return cur, true
	}
	e = newEntry(id, s == nil)
	e.snap.Store(s)
	sh.m.put(h, e)
	sh.mu.Unlock()

	var evicted [2]*entry
	n := 0
	t.lruMu.Lock()
	l, size := t.lru, t.size
	if e.neg {
		l, size = t.neg, t.negSize
	} else {
		e.touched.Store(t.ticks.Add(1))
	}
	if l.Len() >= size {
		if _, old, ok := l.RemoveOldest(); ok {
			evicted[n] = old
			n++
		}
	}
	if old, ok := l.Peek(id); ok && old != e {
		evicted[n] = old
		n++
	}
	l.Add(id, e)
	t.lruMu.Unlock()
	for _, old := range evicted[:n] {
		t.drop(old)
	}
	return e, true
}

// fillKey caches an API key lookup (e nil: the key is unknown), unless the key's shard
// changed since gen.
func (t *table) fillKey(sum *[sha256.Size]byte, gen uint64, e *entry) {
	ks := t.keyShard(sum)
	ks.mu.Lock()
	if ks.gen != gen {
		ks.mu.Unlock()
		return
	}
	ks.m[*sum] = e
	ks.mu.Unlock()
	if e != nil {
		return // bounded by its customer's entry: dropped with it
	}
	t.lruMu.Lock()
	var old [sha256.Size]byte
	evict := t.negKeys.Len() >= t.negSize
	if evict {
		old, _, evict = t.negKeys.RemoveOldest()
	}
	t.negKeys.Add(*sum, struct{}{})
	t.lruMu.Unlock()
	if evict {
		ks := t.keyShard(&old)
		ks.mu.Lock()
		if e, ok := ks.m[old]; ok && e == nil {
			delete(ks.m, old)
		}
		ks.mu.Unlock()
	}
}

func (t *table) keyGen(sum *[sha256.Size]byte) uint64 {
	ks := t.keyShard(sum)
	ks.mu.RLock()
	defer ks.mu.RUnlock()
	return ks.gen
}

// drop removes an entry that left the LRU, and the API keys that point to it.
func (t *table) drop(e *entry) {
	sh, h := t.idShardString(e.id)
	sh.mu.Lock()
	sh.m.remove(h, e)
	sh.mu.Unlock()
	if s := e.snap.Load(); s != nil {
		for i := range s.APIKeys {
			ks := t.keyShard(&s.APIKeys[i])
			ks.mu.Lock()
			if ks.m[s.APIKeys[i]] == e {
				delete(ks.m, s.APIKeys[i])
			}
			ks.mu.Unlock()
		}
	}
}

// changed records a committed change of customer id: s is its new snapshot, nil when it
// was revoked. oldKeys are the API keys of its previous snapshot. It returns the
// snapshot the table held, if any.
func (t *table) changed(id string, s *limiter.Snapshot, oldKeys [][sha256.Size]byte) (prev *limiter.Snapshot) {
	for i := range oldKeys {
		t.keyChanged(&oldKeys[i])
	}
	if s != nil {
		for i := range s.APIKeys {
			t.keyChanged(&s.APIKeys[i])
		}
	}
	sh, h := t.idShardString(id)
	sh.mu.Lock()
	e := sh.m.getString(h, id)
	var gone *entry
	if e != nil {
		if !e.neg && s != nil {
			prev = e.snap.Swap(s)
		} else {
			sh.m.remove(h, e)
			if !e.neg {
				prev = e.snap.Swap(nil)
				gone = e
			}
		}
	}
	sh.gen++
	sh.mu.Unlock()
	if gone != nil {
		t.lruMu.Lock()
		if cur, ok := t.lru.Peek(id); ok && cur == gone {
			t.lru.Remove(id)
		}
		t.lruMu.Unlock()
	}
	return prev
}

func (t *table) keyChanged(sum *[sha256.Size]byte) {
	ks := t.keyShard(sum)
	ks.mu.Lock()
	delete(ks.m, *sum)
	ks.gen++
	ks.mu.Unlock()
}

// len is the number of known customers held.
func (t *table) len() int {
	t.lruMu.Lock()
	defer t.lruMu.Unlock()
	return t.lru.Len()
}
