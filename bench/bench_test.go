package main

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestSmoke runs the harness end to end at a tiny scale: steady with one pair and no
// baselines but the bare proxy, then exhaust. It checks that results.json parses and
// that exhaust admitted exactly the sum of the limits. It asserts nothing about speed.
func TestSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the sidecar and runs processes; skipped with -short")
	}
	out := t.TempDir()
	o, err := parseOptions([]string{
		"-scenario", "steady,exhaust,churn",
		"-duration", "1s", "-warmup", "200ms",
		"-open-duration", "1s", "-open-warmup", "100ms", "-sweep-duration", "500ms",
		"-rate", "500", "-rates", "1000",
		"-pairs", "1", "-control=false", "-nginx=false",
		"-conns", "8", "-customers", "200", "-exhaust-customers", "20",
		"-max-redo", "0", "-quiet-wait", "0s", "-q",
		"-out", out,
	}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	if _, err := run(ctx, o, io.Discard); err != nil {
		t.Fatal(err)
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
	if c := byName["churn"]; c == nil || c.Status != "not_available" || c.Reason == "" {
		t.Errorf("churn should report why it is not available: %+v", c)
	}
	for _, f := range []string{"latency.svg", "report.html", "report.txt"} {
		if _, err := os.Stat(filepath.Join(out, f)); err != nil {
			t.Error(err)
		}
	}
}
