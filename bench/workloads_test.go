package main

import (
	"slices"
	"testing"
)

// TestLeaseWarmup: the warm-up uses every metered feature steady's requests use, for
// every customer (so every lease and counter is taken before the measured runs), with as
// few requests as that takes (one search each: api_calls and searches).
func TestLeaseWarmup(t *testing.T) {
	const n = 5
	wl := steadyWorkload(n)
	warm := leaseWarmup(wl, n)
	need := map[string]map[string]bool{} // customer -> metered features its requests use
	for _, us := range wl.uses {
		for _, u := range us {
			if need[u.customer] == nil {
				need[u.customer] = map[string]bool{}
			}
			need[u.customer][u.feature] = true
		}
	}
	got := map[string]map[string]bool{}
	for _, ti := range warm.order {
		for _, u := range wl.uses[ti] {
			if got[u.customer] == nil {
				got[u.customer] = map[string]bool{}
			}
			got[u.customer][u.feature] = true
		}
	}
	if len(need) != n {
		t.Fatalf("steady's %d customers use metered features: %v", len(need), need)
	}
	for c, fs := range need {
		for f := range fs {
			if !got[c][f] {
				t.Errorf("the warm-up never uses %s for %s (warm-up order %v)", f, c, warm.order)
			}
		}
	}
	if len(warm.order) != n {
		t.Errorf("warm-up sends %d requests for %d customers, want one each", len(warm.order), n)
	}
	if !warm.shared || !slices.Equal(warm.reqs[0], wl.reqs[0]) {
		t.Errorf("warm-up workload %+v: want wl's templates, sent once", warm)
	}
}
