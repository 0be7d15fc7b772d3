package quota

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/testutil"
	"github.com/gatehouse-dev/gatehouse/limiter"
	natsgo "github.com/nats-io/nats.go"
)

// TestConverge: four members share one customer's hard limit and admit until it is
// near; then the load moves: one member stops receiving requests for the customer,
// holding a lease that its own traffic no longer spends, while the three others keep
// asking. The fleet admits exactly the limit (the idle member gives its units to those
// that are refused), never more, and ends with every grant used. The deadline is only
// a timeout: the test times nothing.
func TestConverge(t *testing.T) {
	const (
		limit    = 1000
		members  = 4
		deadline = 10 * time.Second
	)
	for _, tc := range []struct {
		name  string
		first int // admitted by all four before the load moves
	}{
		{"near the limit", 900},
		{"a few units left", 960},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nats := testutil.StartNATS(t)
			var ms []*member
			var snaps []*limiter.Snapshot
			for range members {
				ms = append(ms, newMember(t, nats, nil))
				snaps = append(snaps, snap(t, "cust_move", limit, 1))
			}
			// All four admit until the customer is near its limit. (Hot members keep
			// their small leases: a few of these attempts may be refused while
			// another member holds units it is about to spend.)
			got := hammer(t, ms, snaps, 16, tc.first)
			if sum(got) > limit || sum(got) < int64(tc.first)-50 {
				t.Fatalf("before the load moved: admitted %v = %d of %d attempts", got, sum(got), tc.first)
			}
			k := ms[0].counter(snaps[0]).Key
			settle(t, ms)
			idle := ms[members-1]
			held, _ := idle.m.Held(k)
			if held == 0 {
				// The member that goes idle must sit on units for the test to mean
				// anything: one more request there takes a lease ahead of need, once
				// the asks of the first phase are forgotten (a member asked lately
				// takes only what its waiting requests need).
				idle.m.mu.Lock()
				idle.m.leases[k].askedAt.Store(0)
				idle.m.mu.Unlock()
				for held == 0 && idle.do(snaps[members-1], 1, false).Reason == limiter.OK {
					got[members-1]++
					settle(t, ms)
					held, _ = idle.m.Held(k)
				}
			}
			t.Logf("admitted %v before the load moved; the idle member holds %d unused", got, held)
			if held == 0 {
				t.Fatal("the idle member holds nothing: the scenario did not happen")
			}

			// The load moves to the three others, which ask until the fleet has
			// admitted the limit (or the deadline passes), then some more.
			admitted := sum(got)
			stop := time.Now().Add(deadline)
			var after atomic.Int64
			var wg sync.WaitGroup
			for w := range 12 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					i := w % (members - 1)
					for admitted+after.Load() < limit && time.Now().Before(stop) {
						switch d := ms[i].do(snaps[i], 1, false); d.Reason {
						case limiter.OK:
							after.Add(1)
						case limiter.UsageLimitExceeded:
							time.Sleep(time.Millisecond) // refused: ask again soon
						default:
							t.Errorf("member %d: %+v", i, d)
							return
						}
					}
				}()
			}
			wg.Wait()
			extra := hammer(t, ms[:members-1], snaps[:members-1], 8, 300)
			total := admitted + after.Load() + sum(extra)
			v := ms[0].value(k)
			t.Logf("after the load moved: %d admitted, then %v more; bucket granted %d of %d; stats of the idle member %+v",
				after.Load(), extra, v.Granted, v.Limit, idle.m.Stats())
			if total != limit {
				t.Errorf("the fleet admitted %d, want exactly the limit %d", total, limit)
			}
			if v.Granted != limit {
				t.Errorf("bucket %+v: want every unit of the limit granted, and no more", v)
			}
			if h, _ := idle.m.Held(k); h != 0 {
				t.Errorf("the idle member still holds %d unused", h)
			}
		})
	}
}

// TestConvergeMany is the bench harness's fleet exhaust phase in process: 200 customers,
// each with its own hard limit of 0 to 250, are sent their limit plus 5 + limit/5 more
// requests, in bursts of up to 64 concurrent requests per customer spread over four
// members, the bursts of all customers shuffled. No customer is ever admitted more
// than its limit. Then the customers still short of their limit (none, on a machine
// that keeps up: the bursts themselves fill every limit) keep being sent requests on
// every member until each is admitted exactly its limit: no member sits on the last
// units of a customer while another refuses it. The deadline is only a timeout.
func TestConvergeMany(t *testing.T) {
	const (
		members   = 4
		customers = 200
		conns     = 64
		deadline  = 20 * time.Second
	)
	nats := testutil.StartNATS(t)
	var ms []*member
	for range members {
		ms = append(ms, newMember(t, nats, func(o *Options) { o.Wait = 3 * time.Second }))
	}
	limits := make([]int64, customers)
	snaps := make([][]*limiter.Snapshot, members) // each member its own copy, as each replica has
	for c := range limits {
		limits[c] = int64(c*37) % 251
		for i := range ms {
			snaps[i] = append(snaps[i], snap(t, fmt.Sprintf("cust_many_%03d", c), limits[c], 1))
		}
	}
	type burst struct{ c, n int }
	var bursts []burst
	var sent int64
	for c, l := range limits {
		for left := int(l + 5 + l/5); left > 0; left -= conns {
			bursts = append(bursts, burst{c, min(left, conns)})
			sent += int64(min(left, conns))
		}
	}
	rng := rand.New(rand.NewPCG(3, 4))
	rng.Shuffle(len(bursts), func(a, b int) { bursts[a], bursts[b] = bursts[b], bursts[a] })
	var order []int
	for _, b := range bursts {
		for range b.n {
			order = append(order, b.c)
		}
	}

	admitted := make([]atomic.Int64, customers)
	do := func(i, c int) {
		switch d := ms[i].do(snaps[i][c], 1, false); d.Reason {
		case limiter.OK:
			admitted[c].Add(1)
		case limiter.UsageLimitExceeded:
		default:
			t.Errorf("member %d, customer %d: %+v", i, c, d)
		}
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := next.Add(1) - 1; n < int64(len(order)); n = next.Add(1) - 1 {
				do(int(n%members), order[n])
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	// check reports the customers over and under their limits, with what each member
	// holds unused of those under.
	check := func() (total int64, under, over []string) {
		for c, l := range limits {
			a := admitted[c].Load()
			total += a
			switch {
			case a > l:
				over = append(over, fmt.Sprintf("customer %d: %d of %d", c, a, l))
			case a < l:
				k := ms[0].counter(snaps[0][c]).Key
				var held []int64
				for _, mb := range ms {
					h, _ := mb.m.Held(k)
					held = append(held, h)
				}
				under = append(under, fmt.Sprintf("customer %d: %d of %d, held unused %v", c, a, l, held))
			}
		}
		return total, under, over
	}
	total, under, over := check()
	var asks, yields, refills uint64
	for _, mb := range ms {
		s := mb.m.Stats()
		asks, yields, refills = asks+s.Asks, yields+s.Yields, refills+s.Refills
	}
	var sumLimits int64
	for _, l := range limits {
		sumLimits += l
	}
	t.Logf("%d requests in %v: admitted %d of the summed limits %d; %d customers under, %d over; refills %d, asks %d, yields %d",
		sent, elapsed.Round(time.Millisecond), total, sumLimits, len(under), len(over), refills, asks, yields)
	if len(under) > 0 {
		t.Logf("short after the bursts (load stopped before the fleet converged): %v", under)
	}
	if len(over) > 0 {
		t.Fatalf("over their limit: %v", over)
	}

	// The customers still short keep asking, on every member, until each is admitted
	// exactly its limit.
	stop := time.Now().Add(deadline)
	rounds := 0
	for ; len(under) > 0 && time.Now().Before(stop); rounds++ {
		for c, l := range limits {
			if admitted[c].Load() < l {
				for i := range ms {
					wg.Add(1)
					go func() { defer wg.Done(); do(i, c) }()
				}
			}
		}
		wg.Wait()
		time.Sleep(10 * time.Millisecond)
		_, under, over = check()
		if len(over) > 0 {
			t.Fatalf("over their limit: %v", over)
		}
	}
	if len(under) > 0 {
		t.Fatalf("after %d more rounds of requests, still under their limit: %v", rounds, under)
	}
	// And not one more.
	for c := range limits {
		for i := range ms {
			wg.Add(1)
			go func() { defer wg.Done(); do(i, c) }()
		}
	}
	wg.Wait()
	total, under, over = check()
	t.Logf("after %d more rounds for the customers short, and one more request per customer on every member: admitted %d of %d",
		rounds, total, sumLimits)
	if len(over) > 0 || len(under) > 0 || total != sumLimits {
		t.Errorf("over their limit: %v; under: %v", over, under)
	}
}

// settle waits until no member has a refill in flight.
func settle(t testing.TB, ms []*member) {
	t.Helper()
	eventually(t, "the refills in flight to settle", func() bool {
		busy := false
		for _, mb := range ms {
			mb.m.walk(nil, func(l *lease) { busy = busy || l.job.Load() != nil })
		}
		return !busy
	})
}

// TestConvergeHot: a member whose own steady traffic keeps spending its lease near
// the limit keeps it when another member, refused, asks for unused units: it answers
// that it keeps what it holds and gives nothing back (no yield: it is not slowed
// down), and since it spends what it holds, the fleet still admits exactly the limit.
func TestConvergeHot(t *testing.T) {
	const limit = 3000
	nats := testutil.StartNATS(t)
	var ms []*member
	var snaps []*limiter.Snapshot
	for range 2 {
		mb := newMember(t, nats, nil)
		// "In use" is generous here, so that a scheduling pause of the steady member
		// under -race does not read as idle; a refused member asks again soon.
		mb.m.wantIdle, mb.m.wantBusy, mb.m.recheck = 100*time.Millisecond, 150*time.Millisecond, 20*time.Millisecond
		ms = append(ms, mb)
		snaps = append(snaps, snap(t, "cust_hot", limit, 1))
	}
	steady, other := ms[0], ms[1]
	// Listen to the answers, as a third party on the same NATS.
	nc, err := natsgo.Connect(nats.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	var kept atomic.Int64
	sub, err := nc.Subscribe("_INBOX.>", func(msg *natsgo.Msg) {
		var a answerMsg
		if json.Unmarshal(msg.Data, &a) == nil && a.Sidecar == steady.m.SidecarID() && a.Kept > 0 {
			kept.Add(1)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}

	var admitted [2]atomic.Int64
	// The steady member takes its lease first, while quota is plentiful.
	if d := steady.do(snaps[0], 1, false); d.Reason != limiter.OK {
		t.Fatalf("steady member: %+v", d)
	}
	admitted[0].Add(1)
	settle(t, ms)
	held, _ := steady.m.Held(steady.counter(snaps[0]).Key)
	t.Logf("the steady member holds %d", held)
	var wg sync.WaitGroup
	// The steady member: a request every 10ms, until refused 10 times.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for refused := 0; refused < 10; time.Sleep(10 * time.Millisecond) {
			switch d := steady.do(snaps[0], 1, false); d.Reason {
			case limiter.OK:
				admitted[0].Add(1)
			case limiter.UsageLimitExceeded:
				refused++
			default:
				t.Errorf("steady member: %+v", d)
				return
			}
		}
	}()
	// The other: as fast as it is answered, until the steady member is done.
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for done := false; !done; {
				switch d := other.do(snaps[1], 1, false); d.Reason {
				case limiter.OK:
					admitted[1].Add(1)
				case limiter.UsageLimitExceeded:
					time.Sleep(time.Millisecond)
					done = admitted[0].Load()+admitted[1].Load() >= limit
				default:
					t.Errorf("other member: %+v", d)
					return
				}
			}
		}()
	}
	wg.Wait()
	total := admitted[0].Load() + admitted[1].Load()
	ss, os := steady.m.Stats(), other.m.Stats()
	t.Logf("admitted %d + %d = %d of %d; the steady member answered %d asks keeping its lease; steady member %+v; other member %+v",
		admitted[0].Load(), admitted[1].Load(), total, limit, kept.Load(), ss, os)
	if total != limit {
		t.Errorf("the fleet admitted %d, want exactly the limit %d", total, limit)
	}
	if ss.Yields != 0 {
		t.Errorf("the steady member gave its lease back %d times while using it", ss.Yields)
	}
	if kept.Load() == 0 {
		t.Errorf("the steady member was never asked while it held units: the test did not test")
	}
}

// TestAskQuiet: once an ask found no unused units anywhere, a customer that stays
// exhausted is not asked about again while its key does not change, however many
// refused requests and rechecks follow: no traffic for nothing.
func TestAskQuiet(t *testing.T) {
	nats := testutil.StartNATS(t)
	var ms []*member
	var snaps []*limiter.Snapshot
	for range 3 {
		mb := newMember(t, nats, nil)
		mb.m.recheck = 10 * time.Millisecond
		ms = append(ms, mb)
		snaps = append(snaps, snap(t, "cust_quiet", 300, 1))
	}
	if got := hammer(t, ms, snaps, 8, 600); sum(got) != 300 {
		t.Fatalf("admitted %v = %d, want 300", got, sum(got))
	}
	asks := func() (n uint64) {
		for _, mb := range ms {
			n += mb.m.Stats().Asks
		}
		return n
	}
	// Every member sees the customer exhausted once more, past its recheck, asks,
	// and finds nothing.
	time.Sleep(15 * time.Millisecond)
	for i, mb := range ms {
		if d := mb.do(snaps[i], 1, false); d.Reason != limiter.UsageLimitExceeded {
			t.Fatalf("member %d after exhaustion: %+v", i, d)
		}
	}
	settle(t, ms)
	before := asks()
	for range 30 {
		for i, mb := range ms {
			if d := mb.do(snaps[i], 1, false); d.Reason != limiter.UsageLimitExceeded {
				t.Fatalf("member %d after exhaustion: %+v", i, d)
			}
		}
		time.Sleep(15 * time.Millisecond) // past the recheck: each refusal refills again
	}
	settle(t, ms)
	var exhausted uint64
	for _, mb := range ms {
		exhausted += mb.m.Stats().Exhausted
	}
	t.Logf("asks %d before, %d after 90 refused requests; refills that found nothing %d", before, asks(), exhausted)
	if after := asks(); after != before {
		t.Errorf("%d asks about a customer exhausted at an unchanged key", after-before)
	}
}
