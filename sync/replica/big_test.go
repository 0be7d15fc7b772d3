package replica

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/sync/store"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// TestBigReplica measures a replica of a million customers (GATEHOUSE_BIG=1; the count
// can be changed with GATEHOUSE_BIG_N):
//
//	GATEHOUSE_BIG=1 go test ./sync/replica -run TestBigReplica -v -timeout 30m
//
// The parent process runs nats-server and fills the bucket; each phase runs in a child
// process (this test binary again) so that its memory is the sidecar's alone: first the
// initial sync into an empty Badger, then a restart over that replica until ready,
// followed by reads of 200,000 random customers through an LRU of 100,000.
func TestBigReplica(t *testing.T) {
	if os.Getenv("GATEHOUSE_BIG") != "1" {
		t.Skip("set GATEHOUSE_BIG=1 to run (a million customers, a few minutes, ~2 GB of disk)")
	}
	if mode := os.Getenv("GATEHOUSE_BIG_MODE"); mode != "" {
		bigChild(t, mode)
		return
	}
	n := 1_000_000
	if s := os.Getenv("GATEHOUSE_BIG_N"); s != "" {
		n, _ = strconv.Atoi(s)
	}
	nsrv := testutil.StartNATS(t)
	nc, err := nats.Connect(nsrv.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(8192))
	if _, err := EnsureBucket(context.Background(), js); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	for i := range n {
		id := fmt.Sprintf("cust_%07d", i)
		if _, err := js.PublishAsync("$KV."+DefaultBucket+"."+KeyFor(id), []byte(doc(id, i, "key-"+id))); err != nil {
			t.Fatal(err)
		}
		if i%8000 == 7999 {
			<-js.PublishAsyncComplete()
		}
	}
	<-js.PublishAsyncComplete()
	t.Logf("filled the bucket with %d snapshots of ~%d bytes in %v", n, len(doc("cust_0000000", 0, "key-cust_0000000")), time.Since(t0).Round(time.Millisecond))

	dir := t.TempDir()
	for _, mode := range []string{"sync", "restart"} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestBigReplica$", "-test.v", "-test.timeout=30m")
		cmd.Env = append(os.Environ(), "GATEHOUSE_BIG_MODE="+mode, "GATEHOUSE_BIG_DIR="+dir,
			"GATEHOUSE_BIG_NATS="+nsrv.URL(), "GATEHOUSE_BIG_N="+strconv.Itoa(n))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if line, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "BIGRESULT "); ok {
				t.Logf("%s: %s", mode, line)
			} else if strings.Contains(sc.Text(), "FAIL") || strings.Contains(sc.Text(), "big_test.go") {
				t.Log(sc.Text())
			}
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("%s phase: %v", mode, err)
		}
	}
}

func bigChild(t *testing.T, mode string) {
	dir, url := os.Getenv("GATEHOUSE_BIG_DIR"), os.Getenv("GATEHOUSE_BIG_NATS")
	n, _ := strconv.Atoi(os.Getenv("GATEHOUSE_BIG_N"))
	res := map[string]any{}
	log, _ := zap.NewProduction(zap.IncreaseLevel(zap.WarnLevel))
	prof := os.Getenv("GATEHOUSE_BIG_PROF")
	if prof != "" {
		f, err := os.Create(filepath.Join(prof, "cpu-"+mode+".prof"))
		if err != nil {
			t.Fatal(err)
		}
		pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	t0 := time.Now()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	st, err := store.Open(store.Options{Dir: dir, Log: log, GCInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	r, err := New(Options{JS: js, Store: st, Log: log})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	progress := make(chan struct{})
	defer close(progress)
	go func() {
		tick := time.NewTicker(10 * time.Second)
		defer tick.Stop()
		for {
			select {
			case <-progress:
				return
			case <-tick.C:
			}
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			fmt.Printf("BIGRESULT progress %v: %d customers, heap inuse %d MiB, rss %v\n",
				time.Since(t0).Round(time.Second), r.Stats().Customers, ms.HeapInuse>>20, rssMiB())
			if prof != "" {
				h, _ := os.Create(filepath.Join(prof, "heap-"+mode+".prof"))
				pprof.WriteHeapProfile(h)
				h.Close()
			}
		}
	}()
	if err := r.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	res["ready_after"] = time.Since(t0).Round(time.Millisecond).String()
	for {
		s := r.Stats()
		if s.CaughtUp && s.Customers == n {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("not caught up: %+v", s)
		}
		time.Sleep(10 * time.Millisecond)
	}
	res["caught_up_after"] = time.Since(t0).Round(time.Millisecond).String()
	s := r.Stats()
	res["applied"], res["customers"], res["resyncs"] = s.Applied, s.Customers, s.Resyncs
	if mode == "sync" {
		lsm, vlog := st.DB().Size()
		var apparent, allocated int64
		filepath.WalkDir(filepath.Join(dir, "badger"), func(_ string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				if fi, err := d.Info(); err == nil {
					apparent += fi.Size()
					if st, ok := fi.Sys().(*syscall.Stat_t); ok {
						allocated += st.Blocks * 512
					}
				}
			}
			return nil
		})
		res["badger_lsm_MiB"], res["badger_vlog_MiB"] = lsm>>20, vlog>>20
		res["badger_dir_MiB"], res["badger_dir_allocated_MiB"] = apparent>>20, allocated>>20
		res["rss_MiB"] = rssMiB()
	} else {
		// Let the compactions left over from the bulk sync finish: steady state is what
		// a restarted sidecar lives in.
		t1 := time.Now()
		for !compacted(st) && time.Since(t1) < 3*time.Minute {
			time.Sleep(100 * time.Millisecond)
		}
		res["compaction_settled_in"] = time.Since(t1).Round(time.Millisecond).String()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		res["heap_inuse_before_reads_MiB"] = ms.HeapInuse >> 20
		// Reads through the LRU: 200,000 random customers, twice the cache.
		rng := rand.New(rand.NewPCG(1, 2))
		t1 = time.Now()
		for range 200_000 {
			id := fmt.Appendf(nil, "cust_%07d", rng.IntN(n))
			if r.Customer(id) == nil {
				t.Fatalf("%s unknown", id)
			}
		}
		res["200k_random_reads"] = time.Since(t1).Round(time.Millisecond).String()
		// Hits on one hot customer.
		hot := []byte("cust_0000001")
		r.Customer(hot)
		t1 = time.Now()
		for range 1_000_000 {
			r.Customer(hot)
		}
		res["hit_ns"] = time.Since(t1).Nanoseconds() / 1_000_000
		runtime.GC()
		runtime.ReadMemStats(&ms)
		s = r.Stats()
		res["cache_len"], res["loads"] = s.CacheLen, s.Loads
		res["heap_inuse_MiB"], res["go_sys_MiB"] = ms.HeapInuse>>20, ms.Sys>>20
		res["rss_MiB"] = rssMiB()
	}
	b, _ := json.Marshal(res)
	fmt.Println("BIGRESULT " + string(b))
}

// compacted reports whether Badger has no compaction to do.
func compacted(st *store.Store) bool {
	for _, l := range st.DB().Levels() {
		if l.Level == 0 && l.NumTables >= 4 || l.Score >= 1 {
			return false
		}
	}
	return true
}

// rssMiB reads VmRSS (and its anonymous and file-backed parts) from /proc/self/status.
func rssMiB() map[string]int {
	out := map[string]int{}
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return out
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		for _, k := range []string{"VmRSS", "RssAnon", "RssFile", "VmHWM"} {
			if v, ok := strings.CutPrefix(line, k+":"); ok {
				f := strings.Fields(v)
				if kb, err := strconv.Atoi(f[0]); err == nil {
					out[k] = kb >> 10
				}
			}
		}
	}
	return out
}
