package flexprice

import (
	"container/heap"
	"context"
	"time"

	"go.uber.org/zap"
)

// Clock is the bridge's source of time for what it schedules: the re-fetch at the start
// or end of an override or a billing period. Tests inject a fake one to step over those
// instants without sleeping.
type Clock interface {
	Now() time.Time
	// Until returns a channel that delivers once the clock reads t or later.
	Until(t time.Time) <-chan time.Time
}

type wallClock struct{}

func (wallClock) Now() time.Time                     { return time.Now() }
func (wallClock) Until(t time.Time) <-chan time.Time { return time.After(time.Until(t)) }

// result is the outcome of one run of a customer's refresh.
type result struct {
	done chan struct{} // closed when the run ends
	err  error         // set before done is closed
}

// job is a customer's place in the refresh queue. Runs of one customer never overlap,
// so that an older answer can never overwrite a newer one in KV.
type job struct {
	queued  bool
	running bool
	wait    *result // the run that will start after the latest request; nil when none
}

// request asks for a customer's snapshot to be re-fetched and returns the run that will
// do it: one that starts after this call. Requests for a customer that is queued and not
// yet running share that run. It never blocks.
func (s *syncer) request(id string) *result {
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobs[id]
	if j == nil {
		j = &job{}
		s.jobs[id] = j
	}
	if j.wait == nil {
		j.wait = &result{done: make(chan struct{})}
	}
	if !j.queued && !j.running {
		j.queued = true
		s.queue = append(s.queue, id)
		signal(s.work)
	}
	return j.wait
}

// next takes the next customer off the queue, waiting for one until ctx ends.
func (s *syncer) next(ctx context.Context) (string, *result, bool) {
	for {
		s.mu.Lock()
		if len(s.queue) > 0 {
			id := s.queue[0]
			s.queue[0] = ""
			s.queue = s.queue[1:]
			if len(s.queue) == 0 {
				s.queue = nil // let the backing array go
			} else {
				signal(s.work) // wake another worker
			}
			j := s.jobs[id]
			j.queued, j.running = false, true
			r := j.wait
			j.wait = nil
			s.mu.Unlock()
			return id, r, true
		}
		s.mu.Unlock()
		select {
		case <-s.work:
		case <-ctx.Done():
			return "", nil, false
		}
	}
}

// finish ends a run, and queues the customer again if it was asked for meanwhile.
func (s *syncer) finish(id string, r *result, err error) {
	r.err = err
	close(r.done)
	s.mu.Lock()
	defer s.mu.Unlock()
	j := s.jobs[id]
	j.running = false
	if j.wait != nil {
		j.queued = true
		s.queue = append(s.queue, id)
		signal(s.work)
	} else {
		delete(s.jobs, id)
	}
}

// worker runs refreshes until ctx ends.
func (s *syncer) worker(ctx context.Context) {
	for {
		id, r, ok := s.next(ctx)
		if !ok {
			return
		}
		err := s.refresh(ctx, id)
		if err != nil && ctx.Err() == nil {
			s.log.Warn("customer refresh failed; retrying later", zap.String("customer", id), zap.Error(err))
			s.retryLater(id, err)
		}
		s.finish(id, r, err)
	}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// schedule holds, per customer, the instant its snapshot is next due to change.
type schedule struct {
	at map[string]time.Time
	h  timeHeap // may hold stale entries; at is the truth
}

type timed struct {
	t  time.Time
	id string
}

type timeHeap []timed

func (h timeHeap) Len() int           { return len(h) }
func (h timeHeap) Less(i, j int) bool { return h[i].t.Before(h[j].t) }
func (h timeHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *timeHeap) Push(x any)        { *h = append(*h, x.(timed)) }
func (h *timeHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// setDue records when a customer must be re-fetched; the zero time clears it. The caller
// holds s.mu.
func (s *syncer) setDue(id string, t time.Time) {
	sc := &s.sched
	if old, ok := sc.at[id]; ok && old.Equal(t) {
		return
	}
	if t.IsZero() {
		delete(sc.at, id)
		return
	}
	sc.at[id] = t
	heap.Push(&sc.h, timed{t, id})
	if len(sc.h) > 2*len(sc.at)+64 { // drop stale entries
		sc.h = sc.h[:0]
		for id, t := range sc.at {
			sc.h = append(sc.h, timed{t, id})
		}
		heap.Init(&sc.h)
	}
	signal(s.schedWake)
}

// scheduler requests each customer's refresh when it falls due, until ctx ends.
func (s *syncer) scheduler(ctx context.Context) {
	for {
		s.mu.Lock()
		var due []string
		var wake time.Time
		now := s.clock.Now()
		for len(s.sched.h) > 0 {
			top := s.sched.h[0]
			if t, ok := s.sched.at[top.id]; !ok || !t.Equal(top.t) {
				heap.Pop(&s.sched.h) // stale
				continue
			}
			if top.t.After(now) {
				wake = top.t
				break
			}
			heap.Pop(&s.sched.h)
			delete(s.sched.at, top.id)
			due = append(due, top.id)
		}
		s.mu.Unlock()
		for _, id := range due {
			s.m.scheduledRefresh.Inc()
			s.request(id)
		}
		var timer <-chan time.Time
		if !wake.IsZero() {
			timer = s.clock.Until(wake)
		}
		select {
		case <-timer:
		case <-s.schedWake:
		case <-ctx.Done():
			return
		}
	}
}
