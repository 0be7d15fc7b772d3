package usage

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
)

// recordRound records n usages over customers offset..offset+39 (three features, varied
// quantities) into want and sums.
func recordRound(t *testing.T, r *Recorder, offset, n int, want *ledger, sums map[limiter.CounterKey]int64) {
	t.Helper()
	for i := range n {
		u := use(fmt.Sprintf("cust_%03d", offset+i%40), []string{"api_calls", "tokens", "exports"}[i%3], -1, int64(1+i%5), int64(i%2))
		if err := r.Record([]limiter.Usage{u}); err != nil {
			t.Fatal(err)
		}
		want.add(u)
		sums[u.Key] += u.Quantity
	}
}

// counterVersions counts the versions Badger holds of each counter key: a settling pass
// writes each key once, however many messages it merges.
func counterVersions(t *testing.T, e *env) map[string]int {
	t.Helper()
	vs := map[string]int{}
	err := e.st.DB().View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefixCounter), AllVersions: true})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			vs[string(it.Item().Key())]++
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return vs
}

// Three acknowledged messages settle in one merged pass that writes each counter key
// once; a crash in the middle of the pass leaves every counter restorable exactly, and
// the restarted recorder finishes the same pass, not a different one.
func TestMergedSettleCrash(t *testing.T) {
	e := newEnv(t)
	r := e.build(hourly)
	r.settleMessages, r.settleAfter, r.settleChunk = 3, time.Hour, 7
	steps := 0
	r.hooks.afterSettle = func() bool { steps++; return steps == 3 }
	e.start(r)
	want, sums := newLedger(), map[limiter.CounterKey]int64{}
	for round := range 3 {
		recordRound(t, r, round*20, 300, want, sums) // customers overlap between rounds
		if round < 2 {
			flush(t, r)
			if s := r.Stats(); s.Unsettled != int64(round+1) {
				t.Fatalf("after message %d: %d unsettled messages, want %d (no pass before 3)", round+1, s.Unsettled, round+1)
			}
		}
	}
	flush(t, r) // the third message: the pass starts, and crashes at its third step
	eventually(t, "the crash in the middle of the pass", r.crashed.Load)
	if s := r.Stats(); s.Unsettled != 3 {
		t.Fatalf("unsettled messages %d at the crash, want 3", s.Unsettled)
	}
	r.Close(expired())
	e.reopen()
	sameSums(t, restoreSums(t, e), sums)

	r2 := e.build(hourly)
	r2.settleMessages, r2.settleAfter = 1, time.Hour // would settle one message at a time
	if err := r2.Restore(limiter.New()); err != nil {
		t.Fatal(err)
	}
	e.start(r2)
	eventually(t, "the pass finished after the restart", func() bool { return r2.Stats().Unsettled == 0 })
	flush(t, r2)
	checkOnce(t, e.js)
	checkTotals(t, e.js, want)
	for k, n := range counterVersions(t, e) {
		if n != 1 {
			t.Fatalf("counter %q written %d times by one pass", k, n)
		}
	}
	r2.Close(expired())
	e.reopen()
	sameSums(t, restoreSums(t, e), sums)
}

// A settle mark of the first version (message seq settled up to index, one message at a
// time) reads the same: Restore counts the rest of that message once, and the
// recorder settles the rest of it.
func TestVersion1SettleMark(t *testing.T) {
	e := newEnv(t)
	r := e.build(hourly)
	r.settleAfter = time.Hour
	e.start(r)
	want, sums := newLedger(), map[limiter.CounterKey]int64{}
	recordRound(t, r, 0, 300, want, sums)
	flush(t, r)
	r.Close(expired())

	// Settle the first 10 deltas of message 1 as the first version did.
	const index = 10
	err := e.st.DB().Update(func(txn *badger.Txn) error {
		item, err := txn.Get(pendingKey(1))
		if err != nil {
			return err
		}
		v, err := item.ValueCopy(nil)
		if err != nil {
			return err
		}
		mv, err := decodeMessageValue(v)
		if err != nil {
			return err
		}
		for _, en := range mv.entries[:index] {
			c := counter{end: en.d.end, quantity: en.d.quantity, overage: en.d.overage}
			if err := txn.Set(appendCK([]byte(prefixCounter), &en.k), appendCounter(nil, c)); err != nil {
				return err
			}
		}
		v1 := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, 1), index) // seq | index
		return txn.Set([]byte(keySettled), v1)
	})
	if err != nil {
		t.Fatal(err)
	}
	e.reopen()
	sameSums(t, restoreSums(t, e), sums)
	r2 := e.build(hourly)
	if err := r2.Restore(limiter.New()); err != nil {
		t.Fatal(err)
	}
	e.start(r2)
	eventually(t, "settling after the restart", func() bool { return r2.Stats().Unsettled == 0 })
	r2.Close(expired())
	e.reopen()
	sameSums(t, restoreSums(t, e), sums)
	checkTotals(t, e.js, want)
}

// The publisher reads the log ahead of the cut, into memory only: a cut publishes what
// was read ahead and what came after exactly once, and a crash loses nothing read ahead
// (the records are still in the log) nor counts it twice.
func TestReadAhead(t *testing.T) {
	for _, crashFirst := range []bool{false, true} {
		t.Run(fmt.Sprintf("crash=%v", crashFirst), func(t *testing.T) {
			e := newEnv(t)
			r := e.build(hourly)
			r.readAheadEvery = 2 * time.Millisecond
			e.start(r)
			want, sums := newLedger(), map[limiter.CounterKey]int64{}
			recordRound(t, r, 0, 500, want, sums)
			eventually(t, "the log read ahead", func() bool { return r.st.readAhead.Load() == 500 })
			recordRound(t, r, 10, 200, want, sums) // maybe read ahead, maybe left to the cut
			if crashFirst {
				r.Close(expired())
				e.reopen()
				sameSums(t, restoreSums(t, e), sums)
				r = e.build(hourly)
				if err := r.Restore(limiter.New()); err != nil {
					t.Fatal(err)
				}
				e.start(r)
			}
			flush(t, r)
			checkOnce(t, e.js)
			checkTotals(t, e.js, want)
			eventually(t, "settling", func() bool { return r.Stats().Unsettled == 0 })
			r.Close(expired())
			e.reopen()
			sameSums(t, restoreSums(t, e), sums)
		})
	}
}

// sortEntries (runs and merges, yielding between them) orders like a plain sort, at
// every length around its run size.
func TestSortEntries(t *testing.T) {
	for _, n := range []int{0, 1, 2, sortRun - 1, sortRun, sortRun + 1, 3*sortRun + 7, 5000} {
		es := make([]batchEntry, n)
		for i := range es {
			x := (i*7919 + 13) % (n + 1)
			es[i] = batchEntry{k: limiter.CounterKey{Customer: fmt.Sprintf("c%d", x%97), Feature: fmt.Sprintf("f%d", x%5), WindowStart: int64(x)}, d: delta{quantity: int64(i)}}
		}
		want := slices.Clone(es)
		slices.SortStableFunc(want, func(a, b batchEntry) int { return compareKeys(&a.k, &b.k) })
		sortEntries(es, nil)
		for i := range es {
			if compareKeys(&es[i].k, &want[i].k) != 0 {
				t.Fatalf("n=%d: position %d holds %v, want %v", n, i, es[i].k, want[i].k)
			}
		}
		seen := map[int64]bool{}
		for _, e := range es {
			seen[e.d.quantity] = true
		}
		if len(seen) != n {
			t.Fatalf("n=%d: %d distinct deltas after sorting", n, len(seen))
		}
	}
}

// The pages ahead of the appends are written to before the appends reach them, and
// that leaves every record intact, appends racing with it included.
func TestPrefault(t *testing.T) {
	e := newEnv(t)
	r := e.recorder(hourly)
	want, sums := newLedger(), map[limiter.CounterKey]int64{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 2000 {
				u := use(fmt.Sprintf("cust_%03d", (g*2000+i)%300), "api_calls", -1, int64(1+i%7), 0)
				if err := r.Record([]limiter.Usage{u}); err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				want.add(u)
				sums[u.Key] += u.Quantity
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	end := r.j.end.Load()
	eventually(t, "pages prefaulted ahead of the appends", func() bool { return r.j.prefaulted.Load() >= end+prefaultAhead/2 })
	r.Close(expired())
	e.reopen()
	sameSums(t, restoreSums(t, e), sums)
	r2 := e.recorder(hourly)
	flush(t, r2)
	checkTotals(t, e.js, want)
}

// sortByRank orders a cut's deltas as sortEntries does, over cuts that bring new keys
// (ranked as they come, among the old ones) and old keys in any subset; it declines,
// leaving the deltas as they were, a delta without a slot of the table's epoch.
func TestSortByRank(t *testing.T) {
	var kt keyTable
	kt.newSet()
	slotOf := func(k limiter.CounterKey) *keySlot {
		d := decoder{b: appendCK(nil, &k)}
		s := kt.slot(&d)
		if d.err != nil || len(d.b) != 0 {
			t.Fatalf("slot of %v: %v, %d bytes left", k, d.err, len(d.b))
		}
		return s
	}
	rnd := rand.New(rand.NewPCG(1, 2))
	key := func(x int) limiter.CounterKey {
		return limiter.CounterKey{Customer: fmt.Sprintf("c%d", x%311), Feature: []string{"api_calls", "tokens", "a"}[x%3], WindowStart: int64(x % 7)}
	}
	for round, keys := range []int{1, 50, 2000, 2500, 2600, 6000} {
		seen := map[limiter.CounterKey]bool{}
		var es []batchEntry
		for range keys {
			k := key(rnd.IntN(keys * 2))
			if !seen[k] {
				seen[k] = true
				es = append(es, batchEntry{k: k, slot: slotOf(k), d: delta{quantity: int64(len(es))}})
			}
		}
		want := slices.Clone(es)
		sortEntries(want, nil)
		if !sortByRank(&kt, es, nil) {
			t.Fatalf("round %d: declined deltas that all have slots", round)
		}
		for i := range es {
			if es[i].k != want[i].k || es[i].d != want[i].d {
				t.Fatalf("round %d: position %d holds %v (%d), want %v (%d)", round, i, es[i].k, es[i].d.quantity, want[i].k, want[i].d.quantity)
			}
		}
	}

	es := []batchEntry{{k: key(1), slot: slotOf(key(1))}, {k: key(0)}} // key(0): a folded total's
	before := slices.Clone(es)
	if sortByRank(&kt, es, nil) || !slices.Equal(es, before) {
		t.Fatal("sorted deltas of which one has no slot")
	}
	kt.max = 1
	kt.newSet() // the table forgets its keys
	es = es[:1]
	if sortByRank(&kt, es, nil) {
		t.Fatal("sorted by the rank of a slot of a forgotten epoch")
	}
}

// The publisher's key table forgets its keys only between delta sets: a message never
// holds two deltas of one key, however many keys it holds, and every unit arrives once.
func TestKeyTableForgetsBetweenSets(t *testing.T) {
	e := newEnv(t)
	r := e.build(hourly)
	r.readAheadEvery = time.Millisecond
	r.p.keys.max = 5 // the rounds below bring 120 keys
	e.start(r)
	want, sums := newLedger(), map[limiter.CounterKey]int64{}
	for range 4 {
		recordRound(t, r, 0, 300, want, sums)
		time.Sleep(5 * time.Millisecond) // read-ahead steps within the set
		recordRound(t, r, 0, 300, want, sums)
		flush(t, r)
	}
	checkOnce(t, e.js)
	checkTotals(t, e.js, want)
	eventually(t, "settling", func() bool { return r.Stats().Unsettled == 0 })
	r.Close(expired())
	if r.p.keys.epoch < 3 {
		t.Fatalf("the key table forgot its keys %d times, want several", r.p.keys.epoch-1)
	}
	e.reopen()
	sameSums(t, restoreSums(t, e), sums)
}

// TestMergeEntries merges random lists of deltas, as a settling pass merges its
// messages, and checks the result against sums kept in a map: key order, one entry per
// key, every field summed (from the earliest, to the latest, end the latest). Empty lists
// and a single non-empty list are merged too.
func TestMergeEntries(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	for round := range 200 {
		parts := make([][]batchEntry, rng.IntN(17))
		want := map[limiter.CounterKey]delta{}
		for i := range parts {
			if rng.IntN(5) == 0 {
				continue // an empty list
			}
			seen := map[limiter.CounterKey]bool{}
			for range rng.IntN(300) {
				k := limiter.CounterKey{Customer: fmt.Sprintf("c%03d", rng.IntN(120)), Feature: []string{"api_calls", "searches"}[rng.IntN(2)], WindowStart: int64(rng.IntN(2))}
				if seen[k] {
					continue
				}
				seen[k] = true
				from := rng.Int64N(1000)
				d := delta{end: rng.Int64N(50), from: from, to: from + rng.Int64N(100), records: 1 + rng.Int64N(3), quantity: rng.Int64N(9), overage: rng.Int64N(2)}
				parts[i] = append(parts[i], batchEntry{k: k, d: d})
				w, ok := want[k]
				if !ok {
					w = d
				} else {
					w.add(&d)
				}
				want[k] = w
			}
			slices.SortFunc(parts[i], func(a, b batchEntry) int { return compareKeys(&a.k, &b.k) })
		}
		got := mergeEntries(slices.Clone(parts), nil)
		if len(got) != len(want) {
			t.Fatalf("round %d: %d merged entries over %d lists, want %d keys", round, len(got), len(parts), len(want))
		}
		for i := range got {
			if i > 0 && compareKeys(&got[i-1].k, &got[i].k) >= 0 {
				t.Fatalf("round %d: entries %d and %d out of key order: %v, %v", round, i-1, i, got[i-1].k, got[i].k)
			}
			if w := want[got[i].k]; got[i].d != w {
				t.Fatalf("round %d: %v merged to %+v, want %+v", round, got[i].k, got[i].d, w)
			}
		}
	}
}

// TestKeyTable: the table gives one slot per distinct encoded key, the same slot every
// time, through growth from its first size to thousands of keys, and new slots after
// forget.
func TestKeyTable(t *testing.T) {
	var kt keyTable
	kt.newSet()
	const n = 5000
	enc := make([][]byte, n)
	for i := range enc {
		k := limiter.CounterKey{Customer: fmt.Sprintf("cust_%d", i%1700), Feature: fmt.Sprintf("f%d", i/1700), WindowStart: int64(i % 3)}
		enc[i] = appendCK(nil, &k)
	}
	slotOf := func(b []byte) *keySlot {
		d := decoder{b: append(append([]byte{}, b...), 0xee)} // a byte after the key: slot reads only the key
		s := kt.slot(&d)
		if d.err != nil || len(d.b) != 1 || s == nil {
			t.Fatalf("slot: err %v, %d bytes left", d.err, len(d.b))
		}
		return s
	}
	first := map[*keySlot]int{}
	for round := range 2 {
		for i, b := range enc {
			s := slotOf(b)
			if j, seen := first[s]; seen && j != i {
				t.Fatalf("keys %d and %d share a slot", j, i)
			}
			first[s] = i
			if s.raw != string(b) {
				t.Fatalf("key %d: slot of another key", i)
			}
			if got := appendCK(nil, &s.k); string(got) != string(b) {
				t.Fatalf("key %d: decoded %+v", i, s.k)
			}
		}
		if len(first) != n || kt.n != n {
			t.Fatalf("round %d: %d slots, table of %d, want %d", round, len(first), kt.n, n)
		}
	}
	old := slotOf(enc[0])
	kt.forget()
	if s := slotOf(enc[0]); s == old || s.epoch == old.epoch {
		t.Fatal("forget kept the slot")
	}
}
