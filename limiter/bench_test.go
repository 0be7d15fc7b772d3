package limiter

import (
	"fmt"
	"sync/atomic"
	"testing"
)

// BenchmarkDecision is the decision on the request path: look the customer up in memory,
// reserve and commit, across 10,000 customers whose counters exist.
func BenchmarkDecision(b *testing.B) { benchDecision(b, nil) }

// benchDecision runs the decision benchmark, serial and parallel, with q as the
// limiter's quota (nil: none).
func benchDecision(b *testing.B, q Quota) {
	const customers = 10000
	snaps := make([]*Snapshot, customers)
	ids := make([][]byte, customers)
	for i := range snaps {
		id := fmt.Sprintf("cust_%05d", i)
		snaps[i] = testSnap(b, id, `"api_calls": {"type": "metered", "usage_limit": 4611686018427387904},
			"advanced_analytics": {"type": "boolean", "is_enabled": true}`)
		ids[i] = []byte(id)
	}
	src := NewMemorySource(snaps...)
	l := New()
	if q != nil {
		l.SetQuota(q)
	}
	uses := []Use{{Feature: "api_calls", ID: FeatureID("api_calls"), Cost: 1}, {Feature: "advanced_analytics", ID: FeatureID("advanced_analytics")}}
	var r Reservation
	for _, id := range ids {
		r.Reset()
		l.Reserve(src.Customer(id), uses, testNow, false, &r)
		l.Commit(&r, nil)
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		var r Reservation
		out := make([]Usage, 0, MaxRouteFeatures)
		i := 0
		for b.Loop() {
			r.Reset()
			if d := l.Reserve(src.Customer(ids[i]), uses, testNow, false, &r); d.Reason != OK {
				b.Fatal(d)
			}
			out = l.Commit(&r, out[:0])
			if i++; i == customers {
				i = 0
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		var seq atomic.Int64
		b.RunParallel(func(pb *testing.PB) {
			var r Reservation
			out := make([]Usage, 0, MaxRouteFeatures)
			i := int(seq.Add(7919)) % customers
			for pb.Next() {
				r.Reset()
				if d := l.Reserve(src.Customer(ids[i]), uses, testNow, false, &r); d.Reason != OK {
					b.Error(d)
					return
				}
				out = l.Commit(&r, out[:0])
				if i++; i == customers {
					i = 0
				}
			}
		})
	})
}
