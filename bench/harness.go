package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

// results is results.json.
type results struct {
	Version      int               `json:"version"`
	Command      string            `json:"command"`
	StartedAt    time.Time         `json:"started_at"`
	Seconds      float64           `json:"seconds"`
	Pass         bool              `json:"pass"`
	Machine      machineInfo       `json:"machine"`
	Options      *options          `json:"options"`
	Capabilities []string          `json:"gatehouse_capabilities"`
	CapsFrom     string            `json:"capabilities_from,omitempty"`
	Notes        []string          `json:"notes"`
	QuietWaited  float64           `json:"waited_for_quiet_seconds"`
	Scenarios    []*scenarioResult `json:"scenarios"`
	Out          string            `json:"-"`
}

// notes explain the choices every reader of the figures should know.
var notes = []string{
	"Every process runs on the same machine over loopback: the load generator, the upstream and the proxy under test share the cores.",
	"GOMAXPROCS: generator 1 (it needs well under a core and fewer threads disturb less), upstream 1, sidecar and bare proxy all cores, nginx one worker per core; change with -gen-procs, -upstream-procs, -proxy-procs, -nginx-workers.",
	"Closed loop: -conns connections, each sends its next request when the previous is answered; latency is then mostly queueing and only the throughput compares targets.",
	"Open loop: requests are due on a fixed timeline and latency runs from the due time (no coordinated omission); send_lag is how late the generator itself sent.",
	"Comparisons are in adjacent runs (sidecar next to bare proxy, alternating who goes first); the median of the per-round ratios is reported with its range. The control pair compares the bare proxy with a second copy of itself: its distance from 1.0 is this run's noise floor.",
	"noise = CPU used by processes other than ours plus hypervisor steal, as a share of the machine; rounds above -max-noise are redone.",
	"CPU µs/request is the target's user+system time (all its processes) over the requests it answered; kernel softirq time for loopback TCP is not in it.",
}

func run(ctx context.Context, o *options, w io.Writer) (*results, error) {
	if o.GenProcs > 0 {
		runtime.GOMAXPROCS(o.GenProcs)
	}
	var list []scenario
	for _, name := range o.Scenarios {
		s, err := lookupScenario(strings.TrimSpace(name))
		if err != nil {
			return nil, err
		}
		list = append(list, s)
	}
	e, err := newEnv(ctx, o, w)
	if err != nil {
		return nil, err
	}
	defer e.close()
	r := &results{
		Version: 1, Command: command(), StartedAt: e.start.UTC(), Machine: e.machine, Options: o,
		Notes: notes, Out: e.out, Capabilities: []string{}, CapsFrom: e.capsFrom,
	}
	for c := range e.caps {
		r.Capabilities = append(r.Capabilities, c)
	}
	sort.Strings(r.Capabilities)
	var plan time.Duration
	for _, s := range list {
		if p, ok := s.(planner); ok {
			if ok, _ := s.Available(e); ok {
				plan += p.plan(o)
			}
		}
	}
	e.slack = o.Budget - time.Since(e.start) - plan
	e.logf("plan: %s of measurement; %s left in -budget %s for redos and waiting for quiet",
		plan.Round(time.Second), max(0, e.slack).Round(time.Second), o.Budget)
	e.logf("machine: %d cores, %s, %s, kernel %s; gatehouse %q (%s), capabilities %v (%s); results in %s",
		e.machine.Cores, e.machine.CPUModel, e.machine.GoVersion, e.machine.Kernel, e.machine.Gatehouse, e.machine.Commit,
		r.Capabilities, e.capsFrom, e.out)

	for _, s := range list {
		started := time.Now()
		var sr *scenarioResult
		if ok, why := s.Available(e); !ok {
			sr = &scenarioResult{Name: s.Name(), Status: "not_available", Reason: "not available in this build: " + why,
				UsageCheck: usageCheck{Status: "not_available", Reason: "the scenario did not run"}}
			if d, ok := s.(describer); ok {
				sr.About = d.about(o)
			}
			e.logf("%s: %s", s.Name(), sr.Reason)
		} else {
			e.logf("%s: running", s.Name())
			sr, err = s.Run(ctx, e)
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			if err != nil {
				sr = &scenarioResult{Name: s.Name(), Status: "error", Reason: err.Error()}
				e.logf("%s: error: %v", s.Name(), err)
			}
			sr.Seconds = time.Since(started).Seconds()
			writeScenario(w, sr)
		}
		r.Scenarios = append(r.Scenarios, sr)
	}
	r.Seconds = time.Since(e.start).Seconds()
	r.QuietWaited = e.waited.Seconds()
	r.Pass = true
	for _, s := range r.Scenarios {
		if s.Status == "fail" || s.Status == "error" {
			r.Pass = false
		}
	}
	if err := writeFiles(r); err != nil {
		return r, err
	}
	writeSummary(w, r)
	return r, nil
}

// command is how this run was started, for the README and the results.
func command() string {
	args := os.Args[1:]
	if strings.HasSuffix(os.Args[0], ".test") {
		return "go test ./bench (smoke test)"
	}
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = shellQuote(a)
	}
	return strings.TrimSpace("go run ./bench " + strings.Join(quoted, " "))
}

// shellQuote quotes a for a POSIX shell when it needs it.
func shellQuote(a string) string {
	if a != "" && strings.IndexFunc(a, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_=.,/:@+%", r))
	}) < 0 {
		return a
	}
	return "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
}

// writeFiles writes results.json, latency.svg, report.txt and report.html.
func writeFiles(r *results) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(r.Out, "results.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	var txt bytes.Buffer
	for _, s := range r.Scenarios {
		if s.Status != "not_available" {
			writeScenario(&txt, s)
		}
	}
	writeSummary(&txt, r)
	if err := os.WriteFile(filepath.Join(r.Out, "report.txt"), txt.Bytes(), 0o644); err != nil {
		return err
	}
	svg := latencyChart(r)
	if err := os.WriteFile(filepath.Join(r.Out, "latency.svg"), []byte(svg), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(r.Out, "report.html"), []byte(htmlReport(r, txt.String(), svg)), 0o644)
}

func writeSummary(w io.Writer, r *results) {
	fmt.Fprintf(w, "\n== summary (%.0f s) ==\n", r.Seconds)
	for _, s := range r.Scenarios {
		fmt.Fprintf(w, "%-8s %s", s.Name, strings.ToUpper(s.Status))
		if s.Reason != "" {
			fmt.Fprintf(w, ": %s", s.Reason)
		}
		fmt.Fprintln(w)
		for _, c := range s.Checks {
			mark := "PASS"
			if !c.Pass {
				mark = "FAIL"
			}
			fmt.Fprintf(w, "  %s  %s: %s\n", mark, c.Name, c.Detail)
		}
		if s.Status != "not_available" {
			fmt.Fprintf(w, "  usage check: %s", s.UsageCheck.Status)
			if s.UsageCheck.Reason != "" {
				fmt.Fprintf(w, " (%s)", s.UsageCheck.Reason)
			}
			fmt.Fprintln(w)
		}
	}
	fmt.Fprintf(w, "results: %s\n", filepath.Join(r.Out, "results.json"))
	fmt.Fprintf(w, "chart:   %s\n", filepath.Join(r.Out, "report.html"))
}
