package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Entitlement changes go in the way an operator's do: `gatehouse push -config FILE -f
// SNAPSHOTS` against the sidecar's NATS (its own server, or another's), one process
// per push. A push validates every snapshot and writes only those whose meaning changed.

// pushResult is one `gatehouse push`.
type pushResult struct {
	written int           // snapshots the bucket took (changed ones)
	took    time.Duration // start to exit: process start, NATS connect, reads and writes
	cpu     time.Duration // the process's user+system time
}

// push runs `gatehouse push` for snaps, written to file first, with the configuration
// of sidecar p (so it reaches p's NATS). It does not take a context: a push under way
// finishes (it is bounded by the command's own 30 s client timeout), so that a stopped
// churn never leaves a half-counted push.
func (e *env) push(p *proc, file string, snaps []snapshotDoc) (pushResult, error) {
	if err := writeSnapshots(file, snaps); err != nil {
		return pushResult{}, err
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(e.bin.gatehouse, "push", "-config", p.config, "-f", file)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	res := pushResult{took: time.Since(start)}
	if st := cmd.ProcessState; st != nil {
		res.cpu = st.UserTime() + st.SystemTime()
	}
	if err != nil {
		return res, fmt.Errorf("gatehouse push: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	var out struct{ Written int }
	if err := json.Unmarshal(bytes.TrimSpace(stdout.Bytes()), &out); err != nil {
		return res, fmt.Errorf("gatehouse push printed %q: %w", stdout.String(), err)
	}
	res.written = out.Written
	return res, nil
}

// probe is one measured change: a snapshot that turns the probe customer's
// advanced_analytics on or off is pushed, and the sidecar is asked, about once a
// millisecond, until its answer on the analytics route shows the change.
type probe struct {
	When     string  `json:"when"`               // which run or moment it was taken in
	Enable   bool    `json:"enable"`             // the change: enabled (200 expected) or disabled (403)
	PushMs   float64 `json:"push_command_ms"`    // the push command, start to exit
	Enforced float64 `json:"enforced_ms"`        // push start to the first answer showing the change; -1: never
	Error    string  `json:"error,omitempty"`    // the push failed
	Polls    int     `json:"polls"`              // requests it took
	Status   int     `json:"last_status"`        // the last answer seen
	Timeout  float64 `json:"timeout_s,omitzero"` // how long it waited when never enforced
}

const probeCustomer = "probe-0"

// probeSnapshot is the probe customer's snapshot: entitled to everything the steady
// routes use, with advanced_analytics as enable says.
func probeSnapshot(enable bool) snapshotDoc {
	s := steadySnapshot(0)
	s.CustomerID = probeCustomer
	s.Features["advanced_analytics"] = featureDoc{Type: "boolean", IsEnabled: ptr(enable)}
	return s
}

// probeChange pushes the probe customer's snapshot with advanced_analytics = enable
// through sidecar p's NATS and polls p until it answers the analytics route with 200
// (enabled) or 403 (disabled), for at most timeout.
// It also returns the push process's CPU time.
func (e *env) probeChange(ctx context.Context, p *proc, enable bool, timeout time.Duration) (probe, time.Duration) {
	want := 403
	if enable {
		want = 200
	}
	pr := probe{Enable: enable, Enforced: -1}
	req := request("GET", "/v1/analytics/probe", probeCustomer)
	start := time.Now()
	seen := make(chan struct{})
	go func() {
		defer close(seen)
		w := &worker{addr: p.addr}
		defer func() {
			if w.conn != nil {
				w.conn.Close()
			}
		}()
		t := newPreciseTimer()
		defer t.close()
		for time.Since(start) < timeout && ctx.Err() == nil {
			pr.Polls++
			pr.Status = w.do(req)
			if pr.Status == want {
				pr.Enforced = msSince(start)
				return
			}
			t.sleep(time.Millisecond)
		}
		pr.Timeout = timeout.Seconds()
	}()
	res, err := e.push(p, filepath.Join(e.tmp, p.name, "probe.ndjson"), []snapshotDoc{probeSnapshot(enable)})
	pr.PushMs = float64(res.took) / float64(time.Millisecond)
	if err != nil {
		pr.Error = err.Error()
	}
	<-seen
	return pr, res.cpu
}

func msSince(t time.Time) float64 { return float64(time.Since(t)) / float64(time.Millisecond) }

// probeStats summarises enforced probes: push start to enforcement, and the push
// command's own time, in ms; and how many never showed the change.
func probeStats(ps []probe) (enforced, push stat, missed int) {
	var a, b []float64
	for _, p := range ps {
		if p.Enforced < 0 {
			missed++
			continue
		}
		a = append(a, p.Enforced)
		b = append(b, p.PushMs)
	}
	return newStat(a), newStat(b), missed
}
