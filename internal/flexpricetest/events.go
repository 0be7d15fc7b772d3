package flexpricetest

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"
)

// Event is one usage event as POST /v1/events/bulk takes it.
type Event struct {
	EventID            string         `json:"event_id"`
	EventName          string         `json:"event_name"`
	ExternalCustomerID string         `json:"external_customer_id"`
	CustomerID         string         `json:"customer_id,omitempty"`
	Timestamp          string         `json:"timestamp,omitempty"`
	Source             string         `json:"source,omitempty"`
	Properties         map[string]any `json:"properties,omitempty"`
}

// MaxBulkEvents and MaxBulkBytes bound one bulk request, as Flexprice does.
const (
	MaxBulkEvents = 1000
	MaxBulkBytes  = 32 << 20
)

// eventLog records accepted events. Flexprice de-duplicates on (event_id, timestamp);
// the log keeps each such pair once and counts every receipt, so that tests can count
// distinct events and duplicates.
type eventLog struct {
	distinct  map[string]Event  // event_id + "|" + timestamp -> event
	order     []string          // keys of distinct in first-seen order
	ids       map[string]string // event_id -> first timestamp
	conflicts []string          // event ids seen with a second timestamp
	received  int
	reject    func(Event) bool
}

func newEventLog() eventLog {
	return eventLog{distinct: map[string]Event{}, ids: map[string]string{}}
}

// Events returns the distinct accepted events in the order first accepted.
func (s *Server) Events() []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Event, 0, len(s.ev.order))
	for _, k := range s.ev.order {
		out = append(out, s.ev.distinct[k])
	}
	return out
}

// DistinctEvents is the number of distinct (event_id, timestamp) pairs accepted.
func (s *Server) DistinctEvents() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.ev.order)
}

// Received is the number of events accepted, duplicates included.
func (s *Server) Received() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ev.received
}

// Conflicts returns the event ids that arrived with two different timestamps: the same
// id naming two events, which a correct client never sends.
func (s *Server) Conflicts() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.ev.conflicts)
}

// RejectEvents makes the server answer 400 on the first event of a bulk request for
// which bad returns true, after accepting the events before it. Nil clears it.
func (s *Server) RejectEvents(bad func(Event) bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ev.reject = bad
}

// Fault is an injected failure. The first fault whose Path matches a request applies to
// it, Times times.
type Fault struct {
	Path       string        // e.g. "/v1/events/bulk"; empty: every path
	Times      int           // requests it applies to; default 1
	Delay      time.Duration // wait before answering, so that a client times out
	Status     int           // answer with this status and an error body; 0: answer normally
	RetryAfter string        // Retry-After header sent with Status
	// BadEvent, on a bulk request, is the 1-based position of an event to reject with
	// 400 after accepting the events before it; 0 for none.
	BadEvent int
}

// Inject adds a fault.
func (s *Server) Inject(f Fault) {
	if f.Times == 0 {
		f.Times = 1
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = append(s.faults, &f)
}

// FailNext makes the next n requests on path answer status.
func (s *Server) FailNext(path string, n, status int) {
	s.Inject(Fault{Path: path, Times: n, Status: status})
}

// RateLimitNext makes the next n requests on path answer 429 with Retry-After.
func (s *Server) RateLimitNext(path string, n int, retryAfter string) {
	s.Inject(Fault{Path: path, Times: n, Status: http.StatusTooManyRequests, RetryAfter: retryAfter})
}

// SlowNext delays the next n answers on path by d; the request is still processed, as
// when a server accepts and the answer is lost to a client timeout.
func (s *Server) SlowNext(path string, n int, d time.Duration) {
	s.Inject(Fault{Path: path, Times: n, Delay: d})
}

// RejectNextAt makes the next bulk request answer 400 on its event at 0-based index k,
// after accepting the events before it (when it has more than k events).
func (s *Server) RejectNextAt(k int) {
	s.Inject(Fault{Path: "/v1/events/bulk", BadEvent: k + 1})
}

// PendingFaults is the number of injected fault uses not consumed yet.
func (s *Server) PendingFaults() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, f := range s.faults {
		n += f.Times
	}
	return n
}

func (s *Server) takeFault(path string) *Fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, f := range s.faults {
		if f.Path != "" && f.Path != path {
			continue
		}
		f.Times--
		if f.Times <= 0 {
			s.faults = slices.Delete(s.faults, i, i+1)
		}
		c := *f
		return &c
	}
	return nil
}

// apply delays and answers; it reports whether the request is answered.
func (f *Fault) apply(w http.ResponseWriter, r *http.Request) bool {
	if f.Delay > 0 {
		t := time.NewTimer(f.Delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
		}
	}
	if f.Status == 0 {
		return false
	}
	if f.RetryAfter != "" {
		w.Header().Set("Retry-After", f.RetryAfter)
	}
	writeError(w, f.Status, "injected", fmt.Sprintf("injected fault %d", f.Status), nil)
	return true
}

// bulkEvents serves POST /v1/events/bulk. bad is an index to reject, or -1.
func (s *Server) bulkEvents(w http.ResponseWriter, body []byte, bad int) int {
	if len(body) > MaxBulkBytes {
		writeError(w, http.StatusRequestEntityTooLarge, "validation_error", "body larger than 32 MiB", nil)
		return 0
	}
	var req struct {
		Events []json.RawMessage `json:"events"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		writeError(w, http.StatusBadRequest, "validation_error", "invalid request body: "+err.Error(), nil)
		return 0
	}
	if len(req.Events) == 0 || len(req.Events) > MaxBulkEvents {
		writeError(w, http.StatusBadRequest, "validation_error", "events must hold 1 to 1000 events", nil)
		return 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, raw := range req.Events {
		var e Event
		problem := ""
		if err := json.Unmarshal(raw, &e); err != nil {
			problem = "invalid event: " + err.Error()
		} else {
			problem = s.checkEvent(e)
		}
		if problem == "" && i == bad {
			problem = "injected rejection"
		}
		if problem != "" {
			if s.opts.HideBadIndex {
				writeError(w, http.StatusBadRequest, "validation_error", "invalid event: "+problem, nil)
			} else {
				writeError(w, http.StatusBadRequest, "validation_error",
					fmt.Sprintf("event at index %d: %s", i, problem),
					map[string]any{"index": i, "event_id": e.EventID})
			}
			return len(req.Events)
		}
		s.record(e)
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"message": "Events accepted for processing"})
	return len(req.Events)
}

func (s *Server) checkEvent(e Event) string {
	switch {
	case strings.TrimSpace(e.EventName) == "":
		return "event_name is required"
	case e.ExternalCustomerID == "" && e.CustomerID == "":
		return "external_customer_id or customer_id is required"
	}
	if e.Timestamp != "" {
		if _, err := time.Parse(time.RFC3339Nano, e.Timestamp); err != nil {
			return "timestamp must be RFC 3339"
		}
	}
	if s.ev.reject != nil && s.ev.reject(e) {
		return "rejected"
	}
	return ""
}

// record keeps an accepted event. The caller holds s.mu.
func (s *Server) record(e Event) {
	l := &s.ev
	l.received++
	if e.EventID == "" {
		e.EventID = fmt.Sprintf("gen_%d", l.received)
	}
	if ts, ok := l.ids[e.EventID]; !ok {
		l.ids[e.EventID] = e.Timestamp
	} else if ts != e.Timestamp && !slices.Contains(l.conflicts, e.EventID) {
		l.conflicts = append(l.conflicts, e.EventID)
	}
	k := e.EventID + "|" + e.Timestamp
	if _, ok := l.distinct[k]; !ok {
		l.distinct[k] = e
		l.order = append(l.order, k)
	}
}

func readBody(r *http.Request) []byte {
	b, _ := io.ReadAll(io.LimitReader(r.Body, MaxBulkBytes+1))
	return b
}
