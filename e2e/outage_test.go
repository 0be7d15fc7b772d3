package e2e

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/sidecar"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/sync/replica"
	"github.com/gatehouse-dev/gatehouse/sync/usage"
	"github.com/nats-io/nats.go/jetstream"
)

// TestUsageExactlyOnceAcrossNATSOutages keeps traffic flowing through a sidecar while its
// external NATS goes away twice, each time for longer than the usage stream's duplicate
// window (pre-created at 1s, so that message ids alone could not prevent a double
// count), and comes back on the same port and data. Requests keep being admitted from
// the replica throughout, and once the sidecar has flushed, the published totals equal
// the admitted usage exactly. An entitlement change pushed after NATS returns is
// enforced: the replica caught up.
//
// cust_h's api_calls has a (non-binding) hard limit, which takes fleet leases from NATS
// (DESIGN.md section 6): while NATS is away its requests are admitted up to the lease
// this sidecar holds, then refused with 503 quota_unavailable; such refusals are not
// usage. The other customers' api_calls are unlimited, so that they are admitted
// throughout.
func TestUsageExactlyOnceAcrossNATSOutages(t *testing.T) {
	n := testutil.StartNATS(t)
	js := connectJS(t, n.URL())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: usage.Stream, Subjects: []string{usage.SubjectPrefix + ">"},
		Storage: jetstream.FileStorage, Discard: jetstream.DiscardNew, Duplicates: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	w := newWindows(time.Now())
	cs := []customer{
		{id: "cust_a", callsLimit: unlimitedCalls, softLimit: 30, beta: true},
		{id: "cust_b", callsLimit: unlimitedCalls, softLimit: 1 << 20, beta: true},
		{id: "cust_h", callsLimit: 1 << 40, softLimit: 1 << 20, beta: true},
	}
	flag := customer{id: "cust_flag", callsLimit: 10, softLimit: 10, beta: true}
	log, _ := testLogger(t)
	sc := startSidecar(t, sidecarConfig(t, testutil.Echo(t), filepath.Join(t.TempDir(), "data"), n.URL(), ""),
		log, w.snapshots(t, append(cs, flag)...))
	sc.waitReady(t)
	sc.must(t, betaReq(flag.id), 200, "")

	tr := startTraffic(sc, cs, 4)
	tr.waitFor(t, 200, "traffic before the outage")
	for i := range 2 {
		n.Shutdown()
		down, before := time.Now(), tr.requests.Load()
		eventually(t, 60*time.Second, fmt.Sprintf("outage %d: 3s and 100 requests", i+1), func() bool {
			return time.Since(down) >= 3*time.Second && tr.requests.Load() >= before+100
		})
		n.Restart()
		tr.waitFor(t, 200, fmt.Sprintf("traffic after outage %d", i+1))
	}

	// An entitlement change made after NATS returned reaches the decisions.
	flag.beta = false
	pushSnapshots(t, js, w.snapshots(t, flag))
	eventually(t, 60*time.Second, "beta switched off for cust_flag", func() bool {
		st, reason := sc.decision(betaReq(flag.id))
		return st == 403 && reason == "feature_not_entitled"
	})

	admitted := tr.stop(t)
	sc.flush(t)
	assertPublishedExactly(t, published(t, js), admitted, w, cs)
	st := sc.Usage.Stats()
	t.Logf("admitted %v, %d refused quota_unavailable; recorder: %d messages published, %d publish errors, %d recovered, %d conflicts, %d rebaselines",
		admitted, tr.quotaRefused, st.Published, st.PublishErrors, st.Recovered, st.Conflicts, st.Rebaselines)
	if st.Conflicts != 0 || st.Rebaselines != 0 {
		t.Errorf("recorder stats %+v", st)
	}
}

// TestOutboxPublishedAfterRestartDuringOutage admits requests while NATS is down, closes
// the sidecar gracefully with its outbox undrained, brings NATS back and starts a new
// sidecar on the same data directory: everything is published exactly once, the hard
// limit survived the restart (exactly the rest of the limit is admitted: neither the
// usage counter nor the fleet lease, which the close could not return to the unreachable
// bucket, was lost), and a third start publishes nothing again.
func TestOutboxPublishedAfterRestartDuringOutage(t *testing.T) {
	n := testutil.StartNATS(t)
	js := connectJS(t, n.URL())
	w := newWindows(time.Now())
	cs := []customer{
		{id: "cust_hard", callsLimit: 50, softLimit: 1000, beta: true},
		{id: "cust_soft", callsLimit: unlimitedCalls, softLimit: 10, beta: true},
	}
	upstream, data := testutil.Echo(t), filepath.Join(t.TempDir(), "data")
	log, _ := testLogger(t)
	cfg := sidecarConfig(t, upstream, data, n.URL(), "")
	a := startSidecar(t, cfg, log, w.snapshots(t, cs...))
	a.waitReady(t)

	admitted := ledger{}
	send := func(s *runningSidecar, r request, times int) {
		t.Helper()
		for range times {
			s.must(t, r, 200, "")
			admitted.add(r)
		}
	}
	// Some usage published before the outage: the subject is not empty. The hard limit
	// is used while NATS is up, so that its fleet lease is taken.
	send(a, chatReq("cust_soft", 3), 5)
	send(a, callsReq("cust_hard"), 30)
	a.flush(t)
	assertPublishedExactly(t, published(t, js), admitted, w, cs)

	n.Shutdown()
	send(a, exportsReq("cust_hard"), 4)
	send(a, exportsReq("cust_soft"), 15) // 5 over the soft limit
	send(a, chatReq("cust_soft", 4), 7)
	if st := a.Usage.Stats(); st.OutboxRecords == 0 && st.PendingSeq == 0 {
		t.Fatalf("outbox empty while NATS is down: %+v", st)
	}
	a.closeUnreachable(t, 2*time.Second) // the outbox cannot drain
	n.Restart()

	b := startSidecar(t, cfg, log, nil)
	b.waitReady(t)
	b.flush(t)
	assertPublishedExactly(t, published(t, js), admitted, w, cs)

	// The hard limit came back, its usage counter and its fleet lease (which the close
	// could not return): exactly the 20 left are admitted.
	send(b, callsReq("cust_hard"), 20)
	b.must(t, callsReq("cust_hard"), 429, "usage_limit_exceeded")
	b.flush(t)
	b.close(t, 10*time.Second)

	c := startSidecar(t, cfg, log, nil)
	c.waitReady(t)
	c.flush(t)
	got := published(t, js)
	assertPublishedExactly(t, got, admitted, w, cs)
	c.must(t, callsReq("cust_hard"), 429, "usage_limit_exceeded")
	if q := got[tkey{"cust_hard", fCalls, w.of(fCalls)}].Quantity; q != 50 {
		t.Fatalf("cust_hard published %d api_calls, want its limit 50", q)
	}
}

// TestOutboxAtBoundAcrossOutageAndRestart runs an outage long enough for the usage
// outbox to reach a small max_outbox_bytes, where it is folded into per-key totals
// (admission and counting go on, nothing is dropped); the sidecar is closed and started
// again while NATS is still away, takes more traffic, and once NATS is back everything
// admitted by both runs is published exactly once.
func TestOutboxAtBoundAcrossOutageAndRestart(t *testing.T) {
	n := testutil.StartNATS(t)
	js := connectJS(t, n.URL())
	w := newWindows(time.Now())
	cs := []customer{
		{id: "cust_a", callsLimit: unlimitedCalls, softLimit: 30, beta: true},
		{id: "cust_b", callsLimit: unlimitedCalls, softLimit: 1 << 20, beta: true},
		{id: "cust_c", callsLimit: 1 << 40, softLimit: 500, beta: true},
	}
	log, _ := testLogger(t)
	cfg := sidecarConfig(t, testutil.Echo(t), filepath.Join(t.TempDir(), "data"), n.URL(), "")
	cfg.Usage.MaxOutboxBytes = 4096
	a := startSidecar(t, cfg, log, w.snapshots(t, cs...))
	a.waitReady(t)
	tr := startTraffic(a, cs, 4)
	tr.waitFor(t, 200, "traffic before the outage")
	n.Shutdown()
	eventually(t, 60*time.Second, "the outbox folded at its bound", func() bool { return a.Usage.Stats().Compactions > 0 })
	tr.waitFor(t, 200, "traffic with the outbox at its bound")
	admitted := tr.stop(t)
	a.closeUnreachable(t, time.Second)

	b := startSidecar(t, cfg, log, nil)
	tr = startTraffic(b, cs, 4)
	tr.waitFor(t, 500, "traffic after a restart during the outage")
	n.Restart()
	tr.waitFor(t, 200, "traffic after the outage")
	for k, v := range tr.stop(t) {
		admitted[k] += v
	}
	b.flush(t)
	assertPublishedExactly(t, published(t, js), admitted, w, cs)
	st := b.Usage.Stats()
	t.Logf("admitted %v; restarted recorder: %d compactions, %d messages published", admitted, st.Compactions, st.Published)
}

// TestReplicaServesWhileNATSDown checks the replica at sidecar level: while NATS is down
// every kind of decision is served from the replica (admit, boolean refusal, unknown
// customer, a hard limit used up before the outage), also by a sidecar started anew
// during the outage; once NATS is back, changes pushed to the bucket (a feature switched
// on, another off, a customer revoked) reach the decisions, and the usage admitted
// during the outage is published.
func TestReplicaServesWhileNATSDown(t *testing.T) {
	n := testutil.StartNATS(t)
	js := connectJS(t, n.URL())
	w := newWindows(time.Now())
	on := customer{id: "cust_on", callsLimit: 5, softLimit: 100, beta: true}
	off := customer{id: "cust_off", callsLimit: 100, softLimit: 100, beta: false}
	gone := customer{id: "cust_gone", callsLimit: 100, softLimit: 100, beta: true}
	cs := []customer{on, off, gone}
	log, _ := testLogger(t)
	cfg := sidecarConfig(t, testutil.Echo(t), filepath.Join(t.TempDir(), "data"), n.URL(), "")
	a := startSidecar(t, cfg, log, w.snapshots(t, cs...))
	a.waitReady(t)
	// The hard limit is used up while NATS is up (its fleet quota is reachable).
	for range 5 {
		a.must(t, callsReq(on.id), 200, "")
	}
	a.must(t, callsReq(on.id), 429, "usage_limit_exceeded")

	n.Shutdown()
	decisions := func(s *runningSidecar) {
		t.Helper()
		s.must(t, betaReq(on.id), 200, "")
		s.must(t, betaReq(off.id), 403, "feature_not_entitled")
		s.must(t, betaReq(gone.id), 200, "")
		s.must(t, betaReq("cust_nobody"), 403, "customer_unknown")
		for range 3 {
			s.must(t, exportsReq(on.id), 200, "")
		}
		// Known locally to be used up: over the limit, not a quota outage.
		s.must(t, callsReq(on.id), 429, "usage_limit_exceeded")
	}
	decisions(a)
	a.closeUnreachable(t, time.Second)

	// A sidecar started while NATS is still down serves its Badger replica at once.
	b := startSidecar(t, cfg, log, nil)
	if !b.Replica.Ready() {
		t.Fatal("a restarted sidecar's replica is not ready while NATS is down")
	}
	decisions(b)

	n.Restart()
	on.beta, off.beta = false, true
	pushSnapshots(t, js, w.snapshots(t, on, off))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kv, err := replica.EnsureBucket(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	if err := replica.Delete(ctx, kv, gone.id); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "the changes made after NATS returned enforced", func() bool {
		s1, r1 := b.decision(betaReq(on.id))
		s2, _ := b.decision(betaReq(off.id))
		s3, r3 := b.decision(betaReq(gone.id))
		return s1 == 403 && r1 == "feature_not_entitled" && s2 == 200 && s3 == 403 && r3 == "customer_unknown"
	})
	b.must(t, callsReq(on.id), 429, "usage_limit_exceeded")
	b.flush(t)
	assertPublishedExactly(t, published(t, js), ledger{{on.id, fCalls}: 5, {on.id, fExports}: 6}, w, cs)
}

// TestRestartWithSeedServesDuringOutage restarts a sidecar configured with seed
// snapshots (entitlements.file, as `gatehouse serve` runs) while NATS is down. Its
// Badger replica is ready at once, so it must serve from it while NATS is away
// (DESIGN.md section 9) and not only once pushing the seed into the bucket has given up.
//
// Were Sidecar.Start to push the seed synchronously, for up to seedTimeout (10s), before
// it serves the proxy and the admin listener, the bound listener would accept
// connections and leave them hanging. The order is checked, not a duration: the request
// must be answered before the warning that the push gave up is logged.
func TestRestartWithSeedServesDuringOutage(t *testing.T) {
	n := testutil.StartNATS(t)
	w := newWindows(time.Now())
	on := customer{id: "cust_on", callsLimit: 5, softLimit: 100, beta: true}
	log, logs := testLogger(t)
	cfg := sidecarConfig(t, testutil.Echo(t), filepath.Join(t.TempDir(), "data"), n.URL(), "")
	a := startSidecar(t, cfg, log, w.snapshots(t, on))
	a.waitReady(t)
	a.close(t, 5*time.Second)
	n.Shutdown()

	sc, err := sidecar.New(sidecar.Options{Config: cfg, Log: log, Snapshots: w.snapshots(t, on)})
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan error, 1)
	go func() { started <- sc.Start(context.Background()) }()
	t.Cleanup(func() {
		if err := <-started; err != nil {
			t.Errorf("Start: %v", err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		sc.Close(ctx)
	})
	hc := &http.Client{Timeout: 60 * time.Second}
	res := do(hc, "http://"+sc.Addr().String(), betaReq(on.id))
	if res.err != nil || res.status != 200 {
		t.Fatalf("beta for %s: status %d err %v", on.id, res.status, res.err)
	}
	if strings.Contains(logs.String(), "could not push entitlements into the bucket") {
		t.Fatal("the restarted sidecar served its replica only after pushing the seed into the unreachable bucket gave up")
	}
}
