package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestSmoke runs the harness end to end at a tiny scale: steady with one pair and no
// baselines but the bare proxy, exhaust, churn, a fleet of three sidecars, an outage,
// and usage accounting on against off. It checks that results.json parses, that exhaust
// admitted exactly the sum of the limits, and that the new scenarios' checks of
// correctness pass: no refusal of what stays entitled, every probed change enforced,
// never more than a limit in the fleet, every request answered through the outage, the
// usage-off sidecar accounting nothing, and published usage == admitted usage
// everywhere. It asserts nothing about speed.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the sidecar and runs processes; skipped with -short")
	}
	out := t.TempDir()
	o, err := parseOptions([]string{
		"-scenario", "steady,exhaust,churn,fleet,outage,usage",
		"-duration", "1s", "-warmup", "200ms",
		"-open-duration", "1s", "-open-warmup", "100ms", "-sweep-duration", "500ms",
		"-rate", "500", "-rates", "1000",
		"-pairs", "1", "-control=false", "-nginx=false",
		"-conns", "8", "-customers", "200", "-exhaust-customers", "20",
		"-compare-duration", "1s", "-churn-rate", "40", "-churn-rounds", "1",
		"-fleet", "3", "-fleet-customers", "100", "-fleet-rounds", "1",
		"-outage", "1s", "-outage-rate", "300", "-usage-rate", "1000",
		"-max-redo", "0", "-quiet-wait", "0s", "-q",
		"-slow-log", filepath.Join(out, "slow.log"), "-slow-over", "0s",
		"-out", out,
	}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := run(ctx, o, io.Discard); err != nil {
		t.Fatal(err)
	}

	// -slow-log with a threshold of 0 logs every recorded open-loop request.
	slow, err := os.ReadFile(filepath.Join(out, "slow.log"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(slow)), "\n")
	var due, lat int64
	var target string
	if n, err := fmt.Sscanf(lines[0], "%d %d %s", &due, &lat, &target); n != 3 || err != nil || due < time.Now().Add(-time.Hour).UnixMicro() || lat <= 0 {
		t.Errorf("-slow-log line %q: want intended send time, latency and target (%d fields, %v)", lines[0], n, err)
	}
	if !strings.Contains(string(slow), "sidecar steady open 500/s") || len(lines) < 500 {
		t.Errorf("-slow-log holds %d lines, without steady's open-loop runs of the sidecar", len(lines))
	}

	b, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var r results
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("results.json does not parse: %v", err)
	}
	if r.Machine.Cores < 1 || r.Machine.GoVersion == "" {
		t.Errorf("machine not recorded: %+v", r.Machine)
	}
	byName := map[string]*scenarioResult{}
	for _, s := range r.Scenarios {
		byName[s.Name] = s
	}
	st := byName["steady"]
	if st == nil || st.Steady == nil || st.Status == "error" {
		t.Fatalf("steady did not run: %+v", st)
	}
	if st.Steady.Non2xx != 0 {
		t.Errorf("steady: %d non-2xx responses", st.Steady.Non2xx)
	}
	if len(st.Steady.Rounds) != 1 || len(st.Steady.OpenPairs) != 1 {
		t.Errorf("steady: %d rounds and %d open pairs, want 1 each", len(st.Steady.Rounds), len(st.Steady.OpenPairs))
	}
	x := byName["exhaust"]
	if x == nil || x.Exhaust == nil {
		t.Fatalf("exhaust did not run: %+v", x)
	}
	if x.Exhaust.Limits == 0 || x.Exhaust.Admitted != x.Exhaust.Limits {
		t.Errorf("exhaust: admitted %d, sum of limits %d", x.Exhaust.Admitted, x.Exhaust.Limits)
	}
	if x.Exhaust.Refused != x.Exhaust.ExpectedRefuse || x.Exhaust.Other != 0 {
		t.Errorf("exhaust: refused %d of %d expected, %d other", x.Exhaust.Refused, x.Exhaust.ExpectedRefuse, x.Exhaust.Other)
	}
	if x.UsageCheck.Status != "pass" {
		t.Errorf("exhaust: usage check %+v", x.UsageCheck)
	}
	// The new scenarios: every check of correctness passes (none of their checks is
	// about speed, except as a timeout that a working sidecar never reaches).
	mustPass := map[string][]string{
		"churn": {"every push succeeded", "every load response 2xx, churn or not", "every probed change enforced",
			"published usage == admitted usage"},
		"fleet": {"every closed-loop response 2xx", "every planned exhaust request sent", "never more than a limit",
			"every 429 has Retry-After", "sidecars' allow counters == admitted", "published usage == admitted usage"},
		"outage": {"every request answered 2xx, NATS or not", "the sidecar saw NATS go", "the replica resumed after NATS returned",
			"published usage == admitted usage"},
		"usage": {"every response 2xx", "usage-off sidecar accounted nothing", "published usage == admitted usage"},
	}
	for name, checks := range mustPass {
		s := byName[name]
		if s == nil || s.Status == "error" || s.Status == "not_available" {
			t.Errorf("%s did not run: %+v", name, s)
			continue
		}
		got := map[string]check{}
		for _, c := range s.Checks {
			got[c.Name] = c
			if !c.Pass {
				t.Logf("%s: FAIL %s: %s", name, c.Name, c.Detail)
			}
		}
		for _, want := range checks {
			if c, ok := got[want]; !ok {
				t.Errorf("%s: no check %q", name, want)
			} else if !c.Pass {
				t.Errorf("%s: %s: %s", name, c.Name, c.Detail)
			}
		}
		if s.UsageCheck.Status != "pass" || s.UsageCheck.Admitted == 0 || s.UsageCheck.Admitted != s.UsageCheck.Published {
			t.Errorf("%s: usage check %+v", name, s.UsageCheck)
		}
	}
	if f := byName["fleet"]; f != nil && f.Fleet != nil && f.Fleet.Exhaust != nil {
		if x := f.Fleet.Exhaust; x.Admitted > x.Limits || x.Admitted == 0 {
			t.Errorf("fleet: admitted %d, sum of limits %d", x.Admitted, x.Limits)
		}
	}
	if o := byName["outage"]; o != nil && o.Outage != nil && len(o.Outage.Segments) != 3 {
		t.Errorf("outage: %d segments, want before, during, after", len(o.Outage.Segments))
	}
	if u := byName["usage"]; u != nil && u.UsageCost != nil {
		uc := u.UsageCost
		if len(uc.Rounds) != 1 || len(uc.OpenPairs) != 1 || uc.ThroughputRatio.N != 1 || uc.P99Added.N != 1 {
			t.Errorf("usage: %d rounds and %d open pairs (ratio n=%d, p99 n=%d), want 1 each",
				len(uc.Rounds), len(uc.OpenPairs), uc.ThroughputRatio.N, uc.P99Added.N)
		}
		for _, tgt := range []string{targetOn, targetOff} {
			if uc.ClosedSummary[tgt].Runs != 1 || uc.OpenSummary[tgt].Runs != 1 {
				t.Errorf("usage: %s missing from the closed or open summary", tgt)
			}
		}
		if len(uc.Accounting) != 3 {
			t.Fatalf("usage: %d accounting figures, want closed loop, -rate and -usage-rate", len(uc.Accounting))
		}
		for _, f := range uc.Accounting {
			if f.Runs != 1 || f.Admitted == 0 || len(f.Errors) > 0 {
				t.Errorf("usage: accounting %s %.0f/s: %d runs, %d admitted, errors %v", f.Phase, f.Offered, f.Runs, f.Admitted, f.Errors)
			}
		}
		// Badger writes are off the request path (a message cut each flush interval, its
		// acknowledgement, settling), so one 1 s phase may have few; over all three phases
		// together there must be some. Records: one per metered feature of every request.
		var writes float64
		for _, f := range uc.Accounting {
			if f.BadgerWrites == nil {
				t.Errorf("usage: Badger writes not measured over %s %.0f/s (%s)", f.Phase, f.Offered, f.BadgerWritesFrom)
			} else {
				writes += *f.BadgerWrites
			}
			if f.Records == nil || *f.Records <= 0 {
				t.Errorf("usage: no usage records over %s %.0f/s (%v)", f.Phase, f.Offered, f.Records)
			}
		}
		if writes == 0 {
			t.Errorf("usage: no Badger writes of the usage recorder over any recorded phase")
		}
	} else {
		t.Errorf("usage: no usage_cost in the results: %+v", u)
	}
	for _, f := range []string{"latency.svg", "report.html", "report.txt"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Error(err)
		}
	}
}
