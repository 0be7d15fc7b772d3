package main

import "testing"

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
