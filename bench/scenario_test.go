package main

import (
	"path/filepath"
	"testing"
	"time"
)

// TestAtMostMs: a latency difference of exactly the bound meets it, though its float
// computation lands a hair above; a microsecond more does not.
func TestAtMostMs(t *testing.T) {
	ms := func(us int64) float64 { return float64(us) / 1000 } // as measure.go converts
	d := ms(800) - ms(500)                                     // 0.30000000000000004
	if d <= 0.3 {
		t.Fatalf("%v: the test needs a difference that float arithmetic puts above 0.3", d)
	}
	for _, c := range []struct {
		v    float64
		want bool
	}{{d, true}, {0.3, true}, {0.299, true}, {-2.5, true}, {0.301, false}, {ms(800) - ms(499), false}} {
		if got := atMostMs(c.v, 0.3); got != c.want {
			t.Errorf("atMostMs(%v, 0.3) = %v, want %v", c.v, got, c.want)
		}
	}
}

// TestWholeIntervals: runs against a sidecar that publishes usage last at least its
// flush interval (read from its configuration, the default's when it does not load),
// others as asked; the open-loop length and the closed-loop length are kept apart.
func TestWholeIntervals(t *testing.T) {
	e := &env{o: &options{OpenDuration: 3 * time.Second, Duration: 4 * time.Second}, caps: map[string]bool{capUsage: true}}
	design := &proc{config: "../config/testdata/design.yaml"} // usage.flush_interval: 1s
	missing := &proc{config: filepath.Join(t.TempDir(), "none.yaml")}
	off := &proc{config: missing.config, usageOff: true}
	for _, c := range []struct {
		name      string
		got, want time.Duration
	}{
		{"open, default interval", e.openDuration(missing), 5 * time.Second},
		{"closed, default interval", e.wholeIntervals(missing, e.o.Duration), 5 * time.Second},
		{"open, 1 s interval", e.openDuration(design), 3 * time.Second},
		{"closed, 1 s interval", e.wholeIntervals(design, e.o.Duration), 4 * time.Second},
		{"longer than the interval", e.wholeIntervals(missing, 7*time.Second), 7 * time.Second},
		{"usage off", e.openDuration(off), 3 * time.Second},
	} {
		if c.got != c.want {
			t.Errorf("%s: %v, want %v", c.name, c.got, c.want)
		}
	}
	e.caps[capUsage] = false
	if d := e.openDuration(missing); d != 3*time.Second {
		t.Errorf("a build without usage: %v, want 3s", d)
	}
}
