package replica

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

func TestHitAllocatesNothing(t *testing.T) { // not parallel: AllocsPerRun counts the whole process
	e := newEnv(t)
	e.put("cust_acme", doc("cust_acme", 10, "key-1"))
	r := e.start()
	e.waitCaughtUp()
	id, sum, unknown := []byte("cust_acme"), keySum("key-1"), []byte("nobody")
	r.Customer(id)
	r.CustomerByKey(sum)
	r.Customer(unknown)
	for name, f := range map[string]func(){
		"Customer":         func() { r.Customer(id) },
		"CustomerByKey":    func() { r.CustomerByKey(sum) },
		"unknown customer": func() { r.Customer(unknown) },
	} {
		if n := testing.AllocsPerRun(1000, f); n != 0 {
			t.Errorf("%s hit: %v allocations, want 0", name, n)
		}
	}
	if r.Customer(id) == nil || r.CustomerByKey(sum) == nil || r.Customer(unknown) != nil {
		t.Fatal("wrong answers from the cache")
	}
}

func TestLRUEvictionReadsBackFromBadger(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.cacheSize = 10
	r := e.start()
	e.waitReady()
	for i := range 50 {
		e.put(fmt.Sprintf("c%d", i), doc(fmt.Sprintf("c%d", i), i, fmt.Sprintf("k%d", i)))
	}
	e.waitCaughtUp()
	for i := range 50 {
		if got := e.limitOf(fmt.Sprintf("c%d", i)); got != int64(i) {
			t.Fatalf("c%d: %d", i, got)
		}
	}
	st := r.Stats()
	if st.CacheLen != 10 || st.Loads != 50 {
		t.Fatalf("after 50 reads with room for 10: cache %d (want 10), loads %d (want 50)", st.CacheLen, st.Loads)
	}
	// c0 was evicted: read back from Badger, right.
	if got := e.limitOf("c0"); got != 0 {
		t.Fatalf("c0 after eviction: %d", got)
	}
	if got := r.Stats().Loads; got != 51 {
		t.Errorf("loads %d after reading an evicted customer, want 51", got)
	}
	// c49 is recent: no read.
	e.limitOf("c49")
	if got := r.Stats().Loads; got != 51 {
		t.Errorf("loads %d after reading a cached customer, want 51", got)
	}
	// The API key of an evicted customer resolves too.
	if s := r.CustomerByKey(keySum("k3")); s == nil || s.CustomerID != "c3" {
		t.Errorf("api key of an evicted customer: %v", s)
	}
	// An update of an evicted customer is seen on the next read.
	e.put("c5", doc("c5", 555))
	waitFor(t, "update of an evicted customer", func() bool { return e.limitOf("c5") == 555 })
}

func TestUnknownCustomersReadBadgerOnce(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	r := e.start()
	e.waitReady()
	for range 10 {
		for i := range 100 {
			if r.Customer(fmt.Appendf(nil, "ghost%d", i)) != nil {
				t.Fatal("ghost found")
			}
			if r.CustomerByKey(keySum(fmt.Sprintf("ghostkey%d", i))) != nil {
				t.Fatal("ghost key found")
			}
		}
	}
	if got := r.Stats().Loads; got != 200 {
		t.Errorf("loads %d for 100 unknown ids and 100 unknown keys read 10 times, want 200", got)
	}
	// Invalidated when the customer appears.
	e.put("ghost7", doc("ghost7", 7, "ghostkey7"))
	waitFor(t, "ghost7", func() bool { return e.limitOf("ghost7") == 7 })
	if s := r.CustomerByKey(keySum("ghostkey7")); s == nil {
		t.Error("a key cached as unknown was not invalidated by the snapshot that lists it")
	}
}

func TestHotCustomerSurvivesChurn(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.cacheSize = 100
	r := e.start()
	e.waitReady()
	var keys []string
	var vals [][]byte
	for i := range 1000 {
		id := fmt.Sprintf("c%d", i)
		keys, vals = append(keys, KeyFor(id)), append(vals, []byte(doc(id, i)))
	}
	e.putMany(keys, vals)
	e.waitCaughtUp()
	hot := []byte("c0")
	r.Customer(hot)
	for i := 1; i < 1000; i++ {
		r.Customer(fmt.Appendf(nil, "c%d", i))
		if r.Customer(hot) == nil {
			t.Fatal("hot customer lost")
		}
	}
	if got := r.Stats().Loads; got != 1000 {
		t.Errorf("loads %d: the hot customer was evicted and read again (want 1000)", got)
	}
}

func TestConcurrentReadersSeeEveryUpdate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.cacheSize = 8 // force misses and evictions alongside updates
	r := e.start()
	e.waitReady()
	const ids, versions = 20, 30
	var stop atomic.Bool
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := g; !stop.Load(); i++ {
				id := fmt.Appendf(nil, "c%d", i%ids)
				r.Customer(id)
				r.CustomerByKey(keySum(fmt.Sprintf("k%d", i%ids)))
			}
		})
	}
	var keys []string
	var vals [][]byte
	for v := 1; v <= versions; v++ {
		for i := range ids {
			id := fmt.Sprintf("c%d", i)
			keys, vals = append(keys, KeyFor(id)), append(vals, []byte(doc(id, v, fmt.Sprintf("k%d", i))))
		}
	}
	e.putMany(keys, vals)
	e.waitCaughtUp()
	stop.Store(true)
	wg.Wait()
	for i := range ids {
		if got := e.limitOf(fmt.Sprintf("c%d", i)); got != versions {
			t.Errorf("c%d: limit %d, want %d", i, got, versions)
		}
		if s := r.CustomerByKey(keySum(fmt.Sprintf("k%d", i))); s == nil || s.Feature("api_calls").Limit != versions {
			t.Errorf("k%d: %v", i, s)
		}
	}
}

// A miss that read Badger before a change must not cache what it read.
func TestFillAfterChangeIsRefused(t *testing.T) {
	t.Parallel()
	tab := newTable(10, 10)
	old, cur := &limiter.Snapshot{CustomerID: "a"}, &limiter.Snapshot{CustomerID: "a"}
	gen := tab.gen("a")
	tab.changed("a", cur, nil)
	if _, ok := tab.fill("a", gen, old); ok {
		t.Fatal("fill with a stale generation was accepted")
	}
	gen = tab.gen("a")
	e, ok := tab.fill("a", gen, cur)
	if !ok || e.snap.Load() != cur {
		t.Fatal("fill refused")
	}
	if s, hit := tab.get([]byte("a")); !hit || s != cur {
		t.Fatal("not cached")
	}
	// A revocation drops it from the map and the LRU.
	tab.changed("a", nil, nil)
	if _, hit := tab.get([]byte("a")); hit || tab.len() != 0 {
		t.Fatal("revoked customer still cached")
	}
}

// TestIDMapCollisions: ids whose hashes collide share a chain, and each is found,
// replaced and removed on its own. Real collisions of 64-bit hashes are too rare to
// meet, so the test gives every id the same hash.
func TestIDMapCollisions(t *testing.T) {
	var m idMap
	const h = 42
	long := strings.Repeat("x", inlineID+1) // held outside the entry
	ids := []string{"cust_a", "cust_b", long, "cust_c"}
	for _, id := range ids {
		m.put(h, newEntry(id, false))
	}
	check := func(want ...string) {
		t.Helper()
		for _, id := range ids {
			e := m.get(h, []byte(id))
			if found := e != nil; found != slices.Contains(want, id) {
				t.Fatalf("%s: found %v, want %v", id[:min(len(id), 8)], found, !found)
			}
			if e != nil && (e.id != id || m.getString(h, id) != e) {
				t.Fatalf("%s: entry of %q", id, e.id)
			}
		}
		n := 0
		for e := m.head(h); e != nil; e = e.next {
			n++
		}
		if n != len(want) || (n == 0) != (m.len() == 0) {
			t.Fatalf("chain of %d (map of %d), want %d", n, m.len(), len(want))
		}
	}
	check(ids...)
	b2 := newEntry("cust_b", true)
	m.put(h, b2) // replaces cust_b in the middle of the chain
	if m.getString(h, "cust_b") != b2 {
		t.Fatal("cust_b not replaced")
	}
	check(ids...)
	m.remove(h, newEntry("cust_a", false)) // another entry of the same id: not there
	check(ids...)
	m.remove(h, m.getString(h, "cust_c")) // the head
	check("cust_a", "cust_b", long)
	m.remove(h, b2) // the middle
	check("cust_a", long)
	m.remove(h, m.getString(h, "cust_a")) // the tail
	check(long)
	m.remove(h, m.getString(h, long)) // the last
	check()
}

// TestIDMapProbing checks the open-addressing table against a Go map through random
// puts, replacements and removals, with few distinct hashes whose probe paths overlap
// (so that removals move slots back) and some ids sharing a hash (chains), while the
// table grows from empty to hundreds of slots and shrinks back to nothing.
func TestIDMapProbing(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	var m idMap
	want := map[string]*entry{}
	hashOf := func(id string) uint64 {
		n, _ := strconv.Atoi(id[1:])
		// Hashes 0..499 <<8 start their probes at slots that crowd together; every fifth
		// id shares its hash with another.
		return uint64(n/5*4+n%5%2) << 8
	}
	ids := make([]string, 600)
	for i := range ids {
		ids[i] = fmt.Sprintf("c%d", i)
	}
	check := func(step int) {
		t.Helper()
		hashes := map[uint64]bool{}
		for _, id := range ids {
			h := hashOf(id)
			if got := m.getString(h, id); got != want[id] {
				t.Fatalf("step %d: %s: entry %p, want %p", step, id, got, want[id])
			}
			if want[id] != nil {
				hashes[h] = true
			}
		}
		if m.len() != len(hashes) {
			t.Fatalf("step %d: %d chains, want %d", step, m.len(), len(hashes))
		}
		if len(m.slots) > 0 && m.n*4 > len(m.slots)*3 {
			t.Fatalf("step %d: %d of %d slots in use", step, m.n, len(m.slots))
		}
	}
	for step := range 20000 {
		id := ids[rng.IntN(len(ids))]
		h := hashOf(id)
		// Fill for the first half, empty for the second: the table grows, then drains.
		if rng.IntN(20000) >= step && rng.IntN(3) > 0 {
			e := newEntry(id, false)
			m.put(h, e)
			want[id] = e
		} else if cur := want[id]; cur != nil {
			m.remove(h, cur)
			delete(want, id)
		} else {
			m.remove(h, newEntry(id, false)) // not there: nothing changes
		}
		if step%97 == 0 {
			check(step)
		}
	}
	for id, e := range want {
		m.remove(hashOf(id), e)
		delete(want, id)
	}
	check(-1)
	if m.len() != 0 {
		t.Fatalf("%d chains left", m.len())
	}
}
