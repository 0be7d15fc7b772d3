package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/HdrHistogram/hdrhistogram-go"
	"github.com/valyala/fasthttp"
	"golang.org/x/sys/unix"
)

// The load generator. It keeps one TCP connection per worker, writes pre-built request
// bytes (no pipelining: one request in flight per connection), parses responses with
// fasthttp's Response.Read into a reused Response, and records latency in a per-worker
// HDR histogram, so the request loop allocates nothing.
//
// Closed loop: every worker sends its next request as soon as the previous one is
// answered; throughput is what the target sustains. Open loop: a dispatcher puts the
// intended send time of every request on a fixed timeline (rate r: request k is due at
// k/r) and workers take them in order; latency is measured from the intended time, so a
// stalled target is charged for every request it delayed (no coordinated omission).

// workload is a set of pre-built requests and the order they are sent in.
type workload struct {
	reqs  [][]byte // request bytes, by template
	uses  [][]unit // what one admitted request of each template costs (usage check)
	order []uint32 // template sequence; each worker walks it from its own offset
	// shared: the workers take order[] together, once, through one cursor, and the run
	// ends when it is used up (exhaust); otherwise they loop over it until time is up.
	shared bool
	track  bool // count 2xx and 429 per template
}

// runSpec says how to load a target.
type runSpec struct {
	open     bool
	rate     float64 // open loop: requests per second
	conns    int
	warmup   time.Duration // not recorded; shared workloads have none
	duration time.Duration // recorded; shared workloads: an upper bound
	drain    time.Duration // open loop: how long queued requests may take after the last is due
	// segments splits an open-loop run's recorded phase at these offsets from its start
	// (by intended send time), each part with its own counts and latency: the outage
	// scenario's before, during and after.
	segments []time.Duration
	// slow, when set, gets every recorded open-loop request slower than its threshold,
	// under label.
	slow  *slowLog
	label string
	// edge, when set, is called at both edges of the recorded phase: before the CPU
	// sample at its start and after the one at its end, so that what it costs the
	// target stays out of the target's CPU figure.
	edge func()
}

// loadTarget is one address the workers connect to. admitted, when set, counts the 2xx
// answers it gave per template, in every phase (the usage check).
type loadTarget struct {
	addr     string
	admitted []atomic.Int64
}

// segment is one part of an open-loop run (runSpec.segments).
type segment struct {
	requests, errors, unsent int64
	status                   [6]int64
	hist                     *hdrhistogram.Histogram // latency, µs, 2 significant digits
}

func (s *segment) add(o *segment) {
	s.requests += o.requests
	s.errors += o.errors
	s.unsent += o.unsent
	for i := range s.status {
		s.status[i] += o.status[i]
	}
	s.hist.Merge(o.hist)
}

func newSegments(n int) []*segment {
	out := make([]*segment, n)
	for i := range out {
		out[i] = &segment{hist: hdrhistogram.New(1, histMax, 2)}
	}
	return out
}

// loadResult is what one run measured.
type loadResult struct {
	requests  int64 // answered in the recorded phase
	errors    int64 // transport errors (connect, read, write)
	unsent    int64 // open loop: due but never sent before the drain deadline
	status    [6]int64
	noRetry   int64 // 429s without Retry-After
	elapsed   time.Duration
	hist      *hdrhistogram.Histogram // latency, µs
	lag       *hdrhistogram.Histogram // open loop: actual send time minus intended, µs
	ok        []int64                 // per template: 2xx (track)
	refused   []int64                 // per template: 429 (track)
	segments  []*segment              // open loop: runSpec.segments' parts, in order
	cpuBefore sample
	cpuAfter  sample
}

const histMax = 60_000_000 // µs

func newHist() *hdrhistogram.Histogram { return hdrhistogram.New(1, histMax, 3) }

// Workers' histograms are reused from run to run, so that a run allocates next to
// nothing and the generator's garbage collector stays quiet while it measures.
var (
	histMu   sync.Mutex // protects histFree
	histFree []*hdrhistogram.Histogram
)

func getHist() *hdrhistogram.Histogram {
	histMu.Lock()
	defer histMu.Unlock()
	if n := len(histFree); n > 0 {
		h := histFree[n-1]
		histFree = histFree[:n-1]
		h.Reset()
		return h
	}
	return newHist()
}

func putHist(hs ...*hdrhistogram.Histogram) {
	histMu.Lock()
	defer histMu.Unlock()
	for _, h := range hs {
		if h != nil {
			histFree = append(histFree, h)
		}
	}
}

type phase = int32

const (
	phaseWarm phase = iota
	phaseMeasure
	phaseStop
)

// worker is one connection and its private counters; only its goroutine touches it
// until the run ends.
type worker struct {
	addr     string
	admitted []atomic.Int64 // the target's 2xx per template, shared by its workers; may be nil
	conn     net.Conn
	br       *bufio.Reader
	resp     fasthttp.Response
	hist     *hdrhistogram.Histogram
	lag      *hdrhistogram.Histogram
	status   [6]int64
	n        int64
	errs     int64
	unsent   int64
	noRetry  int64
	ok       []int64
	refused  []int64
	segs     []*segment // open loop with segments
}

func (w *worker) dial() error {
	if w.conn != nil {
		w.conn.Close()
	}
	c, err := net.DialTimeout("tcp", w.addr, 3*time.Second)
	if err != nil {
		w.conn = nil
		return err
	}
	w.conn = c
	if w.br == nil {
		w.br = bufio.NewReaderSize(c, 16<<10)
	} else {
		w.br.Reset(c)
	}
	return nil
}

// do sends one request and reads its answer. It returns the status (0 on a transport
// error, after which the connection is redialled).
func (w *worker) do(req []byte) int {
	if w.conn == nil {
		if err := w.dial(); err != nil {
			return 0
		}
	}
	if _, err := w.conn.Write(req); err != nil {
		w.dial()
		return 0
	}
	w.resp.Reset()
	if err := w.resp.Read(w.br); err != nil {
		w.dial()
		return 0
	}
	status := w.resp.StatusCode()
	if status == fasthttp.StatusTooManyRequests && len(w.resp.Header.Peek("Retry-After")) == 0 {
		w.noRetry++
	}
	if w.resp.ConnectionClose() {
		w.dial()
	}
	return status
}

// count records the outcome of one recorded request.
func (w *worker) count(tpl uint32, status int, latency time.Duration) {
	w.n++
	if status == 0 {
		w.errs++
	} else if c := status / 100; c >= 1 && c <= 5 {
		w.status[c]++
	}
	if w.ok != nil {
		switch {
		case status >= 200 && status < 300:
			w.ok[tpl]++
		case status == fasthttp.StatusTooManyRequests:
			w.refused[tpl]++
		}
	}
	us := latency.Microseconds()
	if us > histMax {
		us = histMax
	}
	w.hist.RecordValue(us)
}

// answered counts a 2xx for the usage check, in every phase.
func (w *worker) answered(tpl uint32, status int) {
	if w.admitted != nil && status >= 200 && status < 300 {
		w.admitted[tpl].Add(1)
	}
}

// countSegment records a recorded open-loop request in the segment of its intended
// send time (offset from the start of the recorded phase).
func (w *worker) countSegment(bounds []time.Duration, at time.Duration, status int, latency time.Duration, unsent bool) {
	if w.segs == nil {
		return
	}
	i := 0
	for i < len(bounds) && at >= bounds[i] {
		i++
	}
	s := w.segs[i]
	s.requests++
	switch {
	case unsent:
		s.unsent++
	case status == 0:
		s.errors++
	case status/100 >= 1 && status/100 <= 5:
		s.status[status/100]++
	}
	s.hist.RecordValue(min(histMax, latency.Microseconds()))
}

// runLoad loads targets as spec says: worker i connects to targets[i % len(targets)],
// so that a closed loop over several sidecars spreads its connections evenly. cpu is
// called at the edges of the recorded phase.
func runLoad(ctx context.Context, targets []loadTarget, wl *workload, spec runSpec, cpu func() sample) (*loadResult, error) {
	ws := make([]*worker, spec.conns)
	defer func() {
		for _, w := range ws {
			if w != nil {
				putHist(w.hist, w.lag)
			}
		}
	}()
	for i := range ws {
		t := targets[i%len(targets)]
		w := &worker{addr: t.addr, admitted: t.admitted, hist: getHist()}
		if spec.open {
			w.lag = getHist()
			if len(spec.segments) > 0 {
				w.segs = newSegments(len(spec.segments) + 1)
			}
		}
		if wl.track {
			w.ok, w.refused = make([]int64, len(wl.reqs)), make([]int64, len(wl.reqs))
		}
		if err := w.dial(); err != nil {
			closeAll(ws)
			return nil, fmt.Errorf("connect %s: %w", t.addr, err)
		}
		ws[i] = w
	}
	defer closeAll(ws)
	if spec.edge != nil {
		sampleCPU, calls := cpu, 0 // cpu is called twice, one call after the other
		cpu = func() sample {
			if calls++; calls == 1 {
				spec.edge()
				return sampleCPU()
			}
			s := sampleCPU()
			spec.edge()
			return s
		}
	}
	runtime.GC() // now rather than while measuring
	var res *loadResult
	if spec.open {
		res = runOpen(ctx, ws, wl, spec, cpu)
	} else {
		res = runClosed(ctx, ws, wl, spec, cpu)
	}
	res.hist, res.lag = newHist(), nil
	if spec.open {
		res.lag = newHist()
	}
	if wl.track {
		res.ok, res.refused = make([]int64, len(wl.reqs)), make([]int64, len(wl.reqs))
	}
	if spec.open && len(spec.segments) > 0 {
		res.segments = newSegments(len(spec.segments) + 1)
	}
	for _, w := range ws {
		for i, s := range w.segs {
			res.segments[i].add(s)
		}
		res.hist.Merge(w.hist)
		if w.lag != nil {
			res.lag.Merge(w.lag)
		}
		res.requests += w.n
		res.errors += w.errs
		res.unsent += w.unsent
		res.noRetry += w.noRetry
		for i, n := range w.status {
			res.status[i] += n
		}
		for i := range w.ok {
			res.ok[i] += w.ok[i]
			res.refused[i] += w.refused[i]
		}
	}
	return res, ctx.Err()
}

func closeAll(ws []*worker) {
	for _, w := range ws {
		if w != nil && w.conn != nil {
			w.conn.Close()
		}
	}
}

func runClosed(ctx context.Context, ws []*worker, wl *workload, spec runSpec, cpu func() sample) *loadResult {
	var ph atomic.Int32
	var cursor atomic.Int64
	var wg sync.WaitGroup
	res := &loadResult{}
	if wl.shared {
		ph.Store(phaseMeasure)
		res.cpuBefore = cpu()
	}
	start := time.Now()
	for i, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pos := i * len(wl.order) / len(ws)
			for {
				p := ph.Load()
				if p == phaseStop {
					return
				}
				var tpl uint32
				if wl.shared {
					k := cursor.Add(1) - 1
					if k >= int64(len(wl.order)) {
						return
					}
					tpl = wl.order[k]
				} else {
					tpl = wl.order[pos]
					if pos++; pos == len(wl.order) {
						pos = 0
					}
				}
				t0 := time.Now()
				status := w.do(wl.reqs[tpl])
				w.answered(tpl, status)
				if p == phaseMeasure {
					w.count(tpl, status, time.Since(t0))
				}
			}
		}()
	}
	if !wl.shared {
		sleepCtx(ctx, spec.warmup)
		res.cpuBefore = cpu()
		start = time.Now()
		ph.Store(phaseMeasure)
		sleepCtx(ctx, spec.duration)
		ph.Store(phaseStop)
		res.elapsed = time.Since(start)
		res.cpuAfter = cpu()
		wg.Wait()
		return res
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	case <-time.After(spec.duration):
	}
	ph.Store(phaseStop)
	res.elapsed = time.Since(start)
	res.cpuAfter = cpu()
	<-done
	return res
}

// slowLog is -slow-log: the slow requests of open-loop runs, with their intended send
// times, to see whether they come in bursts and when.
type slowLog struct {
	mu   sync.Mutex
	f    *bufio.Writer
	c    io.Closer
	over time.Duration
}

func (l *slowLog) add(due time.Time, lat time.Duration, label string) {
	l.mu.Lock()
	fmt.Fprintf(l.f, "%d %d %s\n", due.UnixMicro(), lat.Microseconds(), label)
	l.mu.Unlock()
}

func (l *slowLog) close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return errors.Join(l.f.Flush(), l.c.Close())
}

// runOpen sends at a fixed rate. The dispatcher queues intended send times (ns since
// base); a worker that takes one sends at once and charges the request from its
// intended time.
func runOpen(ctx context.Context, ws []*worker, wl *workload, spec runSpec, cpu func() sample) *loadResult {
	res := &loadResult{}
	q := make(chan int64, 1<<16)
	base := time.Now()
	measureFrom := int64(spec.warmup)
	end := int64(spec.warmup + spec.duration)
	var abort atomic.Bool
	var wg sync.WaitGroup
	for i, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pos := i * len(wl.order) / len(ws)
			for due := range q {
				tpl := wl.order[pos]
				if pos++; pos == len(wl.order) {
					pos = 0
				}
				if abort.Load() {
					// Never sent: charge it the time it has waited so far, a lower bound.
					if due >= measureFrom {
						waited := time.Since(base) - time.Duration(due)
						w.unsent++
						w.n++
						w.hist.RecordValue(min(histMax, waited.Microseconds()))
						w.countSegment(spec.segments, time.Duration(due-measureFrom), 0, waited, true)
					}
					continue
				}
				sent := time.Since(base)
				status := w.do(wl.reqs[tpl])
				w.answered(tpl, status)
				if due >= measureFrom {
					lat := time.Since(base) - time.Duration(due)
					if spec.slow != nil && lat > spec.slow.over {
						spec.slow.add(base.Add(time.Duration(due)), lat, spec.label)
					}
					w.count(tpl, status, lat)
					w.lag.RecordValue(max(0, (sent - time.Duration(due)).Microseconds()))
					w.countSegment(spec.segments, time.Duration(due-measureFrom), status, lat, false)
				}
			}
		}()
	}
	var before sample
	started := make(chan struct{})
	go func() {
		// The edge of the recorded phase, for CPU sampling.
		sleepCtx(ctx, spec.warmup)
		before = cpu()
		close(started)
	}()
	dispatch(ctx, q, base, spec.rate, end)
	<-started
	res.cpuBefore = before
	res.cpuAfter = cpu()
	res.elapsed = time.Duration(end - measureFrom)
	close(q)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(spec.drain):
		abort.Store(true)
		for _, w := range ws {
			if w.conn != nil {
				w.conn.SetDeadline(time.Now())
			}
		}
		<-done
	}
	return res
}

// dispatch queues the due times k/rate for k = 0, 1, ... until end (ns since base).
// It sleeps on a timerfd through the runtime's poller, which wakes it within
// microseconds; time.Sleep would oversleep by up to a millisecond when the process is
// otherwise idle (the poller's epoll timeout is in whole milliseconds).
func dispatch(ctx context.Context, q chan<- int64, base time.Time, rate float64, end int64) {
	interval := float64(time.Second) / rate
	t := newPreciseTimer()
	defer t.close()
	for k := int64(0); ctx.Err() == nil; {
		due := int64(float64(k) * interval)
		if due >= end {
			return
		}
		if wait := due - int64(time.Since(base)); wait > 0 {
			t.sleep(time.Duration(wait))
			continue
		}
		q <- due
		k++
	}
}

// preciseTimer sleeps with nanosecond resolution without holding a thread.
type preciseTimer struct {
	f   *os.File // a timerfd, registered with the runtime's poller; nil: fall back to time.Sleep
	fd  int      // f's descriptor (f.Fd() would switch it to blocking mode)
	buf [8]byte
}

func newPreciseTimer() *preciseTimer {
	fd, err := unix.TimerfdCreate(unix.CLOCK_MONOTONIC, unix.TFD_NONBLOCK|unix.TFD_CLOEXEC)
	if err != nil {
		return &preciseTimer{}
	}
	return &preciseTimer{f: os.NewFile(uintptr(fd), "timerfd"), fd: fd}
}

func (t *preciseTimer) sleep(d time.Duration) {
	if t.f == nil {
		time.Sleep(d)
		return
	}
	spec := unix.ItimerSpec{Value: unix.NsecToTimespec(int64(d))}
	if err := unix.TimerfdSettime(t.fd, 0, &spec, nil); err != nil {
		time.Sleep(d)
		return
	}
	t.f.Read(t.buf[:])
}

func (t *preciseTimer) close() {
	if t.f != nil {
		t.f.Close()
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-ctx.Done():
	case <-tm.C:
	}
}
