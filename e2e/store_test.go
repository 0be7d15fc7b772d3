package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
)

// TestRestartAfterKillMidOpenKeepsData restarts a sidecar whose Badger directory holds
// a file that a SIGKILL leaves behind, made directly so that the outcome does not depend
// on timing (the crash test hits each with its kills):
//   - the empty memtable WAL or value log file of a kill while Badger opens (every open
//     creates the next of each: os.OpenFile(O_CREATE), then truncate and header; a kill
//     between the two leaves 0 bytes). Badger v4.9.6 refuses to open over one
//     (dgraph-io/badger#2207); sync/store removes it first.
//   - the half-written table of a kill while Badger flushes a memtable or compacts: the
//     file is sized first and filled after, and listed in the MANIFEST only once
//     complete. Badger deletes such a file on open; sync/store's own check of the table
//     files before Badger opens them (Badger panics on a damaged one) must pass it by.
//
// None of these holds data, so the database must open with everything in it: the
// unpublished outbox and the hard limit's counter. Were it moved aside and started
// empty, the usage not yet published would be lost and the hard limit handed out again.
func TestRestartAfterKillMidOpenKeepsData(t *testing.T) {
	for _, tc := range []struct {
		name    string
		pattern *regexp.Regexp
		format  string
		content []byte
	}{
		{"memtable WAL", regexp.MustCompile(`^(\d+)\.mem$`), "%05d.mem", nil},
		{"value log", regexp.MustCompile(`^(\d+)\.vlog$`), "%06d.vlog", nil},
		// Sized, never filled: the footer reads as an empty index.
		{"table", regexp.MustCompile(`^(\d+)\.sst$`), "%06d.sst", make([]byte, 64<<10)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := testutil.StartNATS(t)
			js := connectJS(t, n.URL())
			w := newWindows(time.Now())
			hard := customer{id: "cust_hard", callsLimit: 10, softLimit: 100, beta: true}
			cs := []customer{hard}
			log, _ := testLogger(t)
			data := filepath.Join(t.TempDir(), "data")
			cfg := sidecarConfig(t, testutil.Echo(t), data, n.URL(), "")
			a := startSidecar(t, cfg, log, w.snapshots(t, cs...))
			a.waitReady(t)
			admitted := ledger{}
			for range 10 {
				a.must(t, callsReq(hard.id), 200, "")
				admitted.add(callsReq(hard.id))
			}
			a.must(t, callsReq(hard.id), 429, "usage_limit_exceeded")
			n.Shutdown()
			for range 3 {
				a.must(t, exportsReq(hard.id), 200, "") // left in the outbox
				admitted.add(exportsReq(hard.id))
			}
			a.closeUnreachable(t, time.Second)

			// The file a kill leaves: the next id, created, never filled.
			dir := filepath.Join(data, "badger")
			entries, err := os.ReadDir(dir)
			if err != nil {
				t.Fatal(err)
			}
			next := 1
			for _, e := range entries {
				if m := tc.pattern.FindStringSubmatch(e.Name()); m != nil {
					fid, _ := strconv.Atoi(m[1])
					next = max(next, fid+1)
				}
			}
			writeFile(t, dir, fmt.Sprintf(tc.format, next), tc.content)
			n.Restart()

			b := startSidecar(t, cfg, log, nil)
			b.waitReady(t)
			if b.Store.Rebuilt() {
				t.Errorf("the store was moved aside and rebuilt empty because of an empty %s file", tc.name)
			}
			b.must(t, callsReq(hard.id), 429, "usage_limit_exceeded")
			b.flush(t)
			assertPublishedExactly(t, published(t, js), admitted, w, cs)
		})
	}
}

// TestRebuiltStoreNeverOverAdmits uses up a hard limit, stops the sidecar, and moves
// its Badger database aside, as sync/store does with a database it cannot open (the
// sidecar id, kept beside it, stays). The usage counters are gone with it, but the fleet
// quota in NATS still holds this sidecar's grant, used in full: the restarted sidecar
// must not admit one more unit (DESIGN.md section 6: the fleet never over-admits; a
// sidecar that lost its state may under-admit, never over-admit).
//
// The quota manager must not take its grant in the bucket, which includes the used
// units, for quota it may spend again, less a restored usage that is now 0.
func TestRebuiltStoreNeverOverAdmits(t *testing.T) {
	const limit = 10
	n := testutil.StartNATS(t)
	w := newWindows(time.Now())
	hard := customer{id: "cust_hard", callsLimit: limit, softLimit: 100, beta: true}
	log, _ := testLogger(t)
	data := filepath.Join(t.TempDir(), "data")
	cfg := sidecarConfig(t, testutil.Echo(t), data, n.URL(), "")
	a := startSidecar(t, cfg, log, w.snapshots(t, hard))
	a.waitReady(t)
	for range limit {
		a.must(t, callsReq(hard.id), 200, "")
	}
	a.must(t, callsReq(hard.id), 429, "usage_limit_exceeded")
	a.close(t, 5*time.Second)
	dir := filepath.Join(data, "badger")
	if err := os.Rename(dir, dir+".corrupt-e2e"); err != nil {
		t.Fatal(err)
	}

	b := startSidecar(t, cfg, log, nil)
	b.waitReady(t)
	more := 0
	for ; more < 5*limit; more++ {
		if st, _ := b.decision(callsReq(hard.id)); st != 200 {
			break
		}
	}
	if more > 0 {
		t.Fatalf("after its database was rebuilt the sidecar admitted %d more api_calls over the used-up hard limit %d", more, limit)
	}
	b.must(t, callsReq(hard.id), 429, "usage_limit_exceeded")
}
