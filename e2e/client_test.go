package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptrace"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// request is one request of the tests' routes and what it costs.
type request struct {
	method, path string
	customer     string
	tokens       int64 // X-Tokens, for the chat route
	costs        []cost
}

type cost struct {
	feature string
	units   int64
}

func callsReq(c string) request {
	return request{method: "POST", path: "/v1/calls", customer: c, costs: []cost{{fCalls, 1}}}
}

func exportsReq(c string) request {
	return request{method: "POST", path: "/v1/exports", customer: c, costs: []cost{{fExports, 1}}}
}

func chatReq(c string, tokens int64) request {
	return request{method: "POST", path: "/v1/chat", customer: c, tokens: tokens,
		costs: []cost{{fCalls, 1}, {fTokens, tokens}}}
}

func betaReq(c string) request {
	return request{method: "GET", path: "/v1/beta", customer: c}
}

// randomReq is one of the metered requests, for a customer drawn from cs.
func randomReq(rng *rand.Rand, cs []customer) request {
	c := cs[rng.IntN(len(cs))].id
	switch rng.IntN(3) {
	case 0:
		return callsReq(c)
	case 1:
		return exportsReq(c)
	}
	return chatReq(c, 1+rng.Int64N(5))
}

// result is what a client learnt of one request.
type result struct {
	status int
	reason string // the problem body's reason, for refusals
	err    error
	sent   bool // a connection was obtained: the request may have reached the sidecar
}

// do sends r to base. A result with err set and sent false never reached a sidecar.
func do(hc *http.Client, base string, r request) result {
	var sent atomic.Bool
	trace := &httptrace.ClientTrace{GotConn: func(httptrace.GotConnInfo) { sent.Store(true) }}
	ctx := httptrace.WithClientTrace(context.Background(), trace)
	req, err := http.NewRequestWithContext(ctx, r.method, base+r.path, nil)
	if err != nil {
		return result{err: err}
	}
	req.Header.Set("X-Customer-Id", r.customer)
	if r.tokens > 0 {
		req.Header.Set("X-Tokens", strconv.FormatInt(r.tokens, 10))
	}
	resp, err := hc.Do(req)
	if err != nil {
		return result{err: err, sent: sent.Load()}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	res := result{status: resp.StatusCode, sent: true}
	if resp.StatusCode >= 400 {
		var p struct {
			Reason string `json:"reason"`
		}
		_ = json.Unmarshal(body, &p)
		res.reason = p.Reason
	}
	return res
}

// must sends r and fails the test unless the sidecar answers want (and, for a
// refusal, reason).
func (s *runningSidecar) must(t testing.TB, r request, want int, reason string) {
	t.Helper()
	res := do(s.hc, s.base, r)
	if res.err != nil || res.status != want || (reason != "" && res.reason != reason) {
		t.Fatalf("%s %s as %s: status %d reason %q err %v; want %d %q", r.method, r.path, r.customer,
			res.status, res.reason, res.err, want, reason)
	}
}

// decision returns the status and reason a request gets now.
func (s *runningSidecar) decision(r request) (int, string) {
	res := do(s.hc, s.base, r)
	if res.err != nil {
		return 0, res.err.Error()
	}
	return res.status, res.reason
}

// ledger counts units per (customer, feature).
type ledger map[ckey]int64

func (l ledger) add(r request) {
	for _, c := range r.costs {
		l[ckey{r.customer, c.feature}] += c.units
	}
}

// traffic sends random metered requests from several goroutines until stopped and
// counts what was admitted. Every request must be answered 2xx, or, for a hard limit
// whose fleet quota is out of reach (NATS away, the lease spent), 503 quota_unavailable:
// these sidecars are never killed, so any other outcome is a failure.
type traffic struct {
	stopCh   chan struct{}
	wg       sync.WaitGroup
	requests atomic.Int64

	mu           sync.Mutex // protects admitted, quotaRefused and failures
	admitted     ledger
	quotaRefused int
	failures     []string
}

func startTraffic(s *runningSidecar, cs []customer, clients int) *traffic {
	tr := &traffic{stopCh: make(chan struct{}), admitted: ledger{}}
	for i := range clients {
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), uint64(time.Now().UnixNano())))
			for {
				select {
				case <-tr.stopCh:
					return
				default:
				}
				r := randomReq(rng, cs)
				res := do(s.hc, s.base, r)
				tr.mu.Lock()
				if res.err == nil && res.status/100 == 2 {
					tr.admitted.add(r)
				} else if quotaRefusal(cs, r, res) {
					tr.quotaRefused++
				} else if len(tr.failures) < 20 {
					tr.failures = append(tr.failures, fmt.Sprintf("%s %s as %s: status %d reason %q err %v",
						r.method, r.path, r.customer, res.status, res.reason, res.err))
				}
				tr.mu.Unlock()
				tr.requests.Add(1)
			}
		}()
	}
	return tr
}

// waitFor waits until n more requests were answered than when called.
func (tr *traffic) waitFor(t testing.TB, n int64, what string) {
	t.Helper()
	target := tr.requests.Load() + n
	eventually(t, 60*time.Second, what, func() bool { return tr.requests.Load() >= target })
}

// stop stops the clients, fails the test if any request was not admitted, and returns
// what was admitted.
func (tr *traffic) stop(t testing.TB) ledger {
	t.Helper()
	close(tr.stopCh)
	tr.wg.Wait()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.failures) > 0 {
		t.Fatalf("requests not admitted (first %d):\n%s", len(tr.failures), strings.Join(tr.failures, "\n"))
	}
	return tr.admitted
}
