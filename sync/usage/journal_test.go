package usage

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/limiter"
)

// smallSegments makes the log's segments small, so that a test crosses many of them.
func smallSegments(t *testing.T) {
	old := segmentSize
	segmentSize = 128 << 10
	t.Cleanup(func() { segmentSize = old })
}

// logDir is the usage log's directory of e's data directory.
func (e *env) logDir() string { return filepath.Join(e.dir, logDirPrefix+e.st.Epoch()) }

func segmentFiles(t *testing.T, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*.log"))
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// restoreSums restores a limiter from a recorder built on e's store and returns its
// counters.
func restoreSums(t *testing.T, e *env) map[limiter.CounterKey]int64 {
	t.Helper()
	r := e.build(hourly)
	defer r.Close(expired())
	l := limiter.New()
	if err := r.Restore(l); err != nil {
		t.Fatal(err)
	}
	got := map[limiter.CounterKey]int64{}
	l.Counters("", func(c *limiter.Counter) { got[c.Key] = c.Committed() })
	return got
}

func sameSums(t *testing.T, got, want map[limiter.CounterKey]int64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("restored %d counters, want %d", len(got), len(want))
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("counter %v restored as %d, want %d", k, got[k], v)
		}
	}
}

// recordMany records n requests of two usages each over 50 customers with names of
// varied length, so that records end segments at varied offsets.
func recordMany(t *testing.T, r *Recorder, want *ledger, sums map[limiter.CounterKey]int64, n int) {
	t.Helper()
	for i := range n {
		c := fmt.Sprintf("cust_%s%d", strings.Repeat("x", i%23), i%50)
		us := []limiter.Usage{use(c, "api_calls", -1, int64(1+i%3), int64(i%2)), use(c, "tokens", -1, int64(i%100), 0)}
		if err := r.Record(us); err != nil {
			t.Fatal(err)
		}
		want.add(us...)
		for _, u := range us {
			sums[u.Key] += u.Quantity
		}
	}
}

// The log spans many segments: a restart before anything is published restores every
// counter from it exactly; publishing takes all of it once, and the segments below the
// floor are deleted.
func TestLogAcrossSegments(t *testing.T) {
	smallSegments(t)
	e := newEnv(t)
	r := e.recorder(hourly)
	want, sums := newLedger(), map[limiter.CounterKey]int64{}
	recordMany(t, r, want, sums, 20000)
	if n := len(segmentFiles(t, e.logDir())); n < 10 {
		t.Fatalf("%d segments for 20,000 records of %d KiB segments", n, segmentSize>>10)
	}
	r.Close(expired())
	e.reopen()
	sameSums(t, restoreSums(t, e), sums)

	r2 := e.recorder(hourly)
	if s := r2.Stats(); s.OutboxRecords != 20000 {
		t.Fatalf("outbox records after the restart %d, want 20000", s.OutboxRecords)
	}
	recordMany(t, r2, want, sums, 3000)
	flush(t, r2)
	checkOnce(t, e.js)
	checkTotals(t, e.js, want)
	eventually(t, "published segments deleted", func() bool { return len(segmentFiles(t, e.logDir())) <= 2 })
	if s := r2.Stats(); s.OutboxRecords != 0 || s.OutboxBytes != 0 {
		t.Fatalf("outbox after publishing everything: %+v", s)
	}
	r2.Close(expired())
	e.reopen()
	sameSums(t, restoreSums(t, e), sums)
}

// A record whose copy a crash interrupted is not part of the log: neither an absent
// length over a partial payload, nor a length whose payload fails its checksum. The
// bytes are cleared, so that what is appended after the restart is read back, and the
// stale bytes never are, even where they look like a record (a payload holds customer
// names, which callers choose).
func TestInterruptedRecord(t *testing.T) {
	ghost := frame(appendRecord(nil, window0.UnixNano(), []limiter.Usage{use("ghost", "api_calls", -1, 1000, 0)}))
	for _, tc := range []struct {
		name   string
		damage func(b []byte) // b: the log from its end
	}{
		{"payload without length", func(b []byte) { copy(b[frameHeader:], "\x01partial payload of a record") }},
		{"length with a bad checksum", func(b []byte) {
			binary.LittleEndian.PutUint32(b, 40)
			binary.LittleEndian.PutUint32(b[4:], 12345)
			copy(b[frameHeader:], "\x01payload that was being copied, forty by")
		}},
		{"length past the segment", func(b []byte) { binary.LittleEndian.PutUint32(b, 0x7fffffff) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			r := e.recorder(hourly)
			want, sums := newLedger(), map[limiter.CounterKey]int64{}
			recordMany(t, r, want, sums, 500)
			end := r.j.end.Load()
			r.Close(expired())
			e.reopen()

			// Damage the bytes at the end, as a crash in the middle of a copy leaves
			// them, with a record-like frame inside the partial payload, where the next
			// append (the first of recordMany's) will end.
			next := []limiter.Usage{use("cust_0", "api_calls", -1, 1, 0), use("cust_0", "tokens", -1, 0, 0)}
			at := len(frame(appendRecord(nil, 0, next)))
			b := make([]byte, at+len(ghost))
			tc.damage(b)
			copy(b[at:], ghost)
			path := filepath.Join(e.logDir(), segmentName(end-end%segmentSize))
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(b, int64(end%segmentSize)); err != nil {
				t.Fatal(err)
			}
			f.Close()

			sameSums(t, restoreSums(t, e), sums)
			r2 := e.recorder(hourly)
			recordMany(t, r2, want, sums, 1)
			r2.Close(expired())
			e.reopen()
			sameSums(t, restoreSums(t, e), sums)
			r3 := e.recorder(hourly)
			flush(t, r3)
			checkOnce(t, e.js)
			checkTotals(t, e.js, want)
		})
	}
}

// frame is payload framed as the log stores it.
func frame(payload []byte) []byte {
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(payload)))
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(payload, castagnoli))
	b = append(b, payload...)
	return append(b, make([]byte, align8(uint64(len(b)))-uint64(len(b)))...)
}

// A segment past the log's end that holds data (a machine crash can leave one) is moved
// aside, not counted; an empty one is deleted.
func TestSegmentPastTheEnd(t *testing.T) {
	e := newEnv(t)
	r := e.recorder(hourly)
	want, sums := newLedger(), map[limiter.CounterKey]int64{}
	recordMany(t, r, want, sums, 100)
	r.Close(expired())
	e.reopen()
	dir := e.logDir()
	stray := filepath.Join(dir, segmentName(5*segmentSize))
	empty := filepath.Join(dir, segmentName(6*segmentSize))
	data := make([]byte, segmentSize)
	copy(data, "\x20\x00\x00\x00junk")
	if err := os.WriteFile(stray, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(empty, make([]byte, segmentSize), 0o644); err != nil {
		t.Fatal(err)
	}
	sameSums(t, restoreSums(t, e), sums)
	if _, err := os.Stat(stray + ".damaged"); err != nil {
		t.Fatalf("stray segment not moved aside: %v", err)
	}
	if _, err := os.Stat(empty); !os.IsNotExist(err) {
		t.Fatalf("empty segment past the end not deleted: %v", err)
	}
	r2 := e.recorder(hourly)
	flush(t, r2)
	checkTotals(t, e.js, want)
}

// appendBatchHeader and appendBatchEntry encode a batch as an earlier version wrote it
// (see decodeBatch), to test migrateBatches.
func appendBatchHeader(b []byte, at int64, n int) []byte {
	b = append(b, batchVersion)
	b = binary.BigEndian.AppendUint64(b, uint64(at))
	return binary.AppendUvarint(b, uint64(n))
}

func appendBatchEntry(b []byte, k *limiter.CounterKey, d *delta) []byte {
	b = appendCK(b, k)
	b = binary.BigEndian.AppendUint64(b, uint64(d.end))
	b = binary.AppendUvarint(b, uint64(d.records))
	b = binary.AppendVarint(b, d.quantity)
	return binary.AppendVarint(b, d.overage)
}

// Outbox batches that an earlier version kept in Badger (u/o/b/) move into folded
// totals at New, once: they are restored, published once, and deleted.
func TestMigrateBatches(t *testing.T) {
	e := newEnv(t)
	want, sums := newLedger(), map[limiter.CounterKey]int64{}
	db := e.st.DB()
	// Batches 1-3 are below the floor (in a message already): not counted again.
	err := db.Update(func(txn *badger.Txn) error {
		for seq := uint64(1); seq <= 40; seq++ {
			us := []limiter.Usage{use(fmt.Sprintf("cust_%d", seq%6), "api_calls", -1, int64(seq), int64(seq%2))}
			if seq > 3 {
				want.add(us...)
				sums[us[0].Key] += us[0].Quantity
			}
			v := appendBatchHeader(nil, window0.UnixNano(), 1)
			d := delta{end: us[0].End, records: 1, quantity: us[0].Quantity, overage: us[0].Overage}
			v = appendBatchEntry(v, &us[0].Key, &d)
			if err := txn.Set(batchKey(nil, seq), v); err != nil {
				return err
			}
		}
		return txn.Set([]byte(keyFloor), encodeU64(4))
	})
	if err != nil {
		t.Fatal(err)
	}
	sameSums(t, restoreSums(t, e), sums)
	err = db.View(func(txn *badger.Txn) error {
		it := txn.NewIterator(badger.IteratorOptions{Prefix: []byte(prefixBatch)})
		defer it.Close()
		for it.Rewind(); it.Valid(); it.Next() {
			return fmt.Errorf("batch %x left after the migration", it.Item().Key())
		}
		if _, err := txn.Get([]byte(keyFloor)); err != badger.ErrKeyNotFound {
			return fmt.Errorf("batch floor left after the migration: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	r := e.recorder(hourly)
	recordMany(t, r, want, sums, 10)
	flush(t, r)
	checkOnce(t, e.js)
	checkTotals(t, e.js, want)
}
