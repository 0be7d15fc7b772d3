package limiter

import (
	"fmt"
	"strings"
	"testing"
	"unsafe"
)

// TestSnapshotLayout: a decoded snapshot keeps what a request reads (the snapshot, its
// features, the customer id, feature keys and header values) in one allocation when it
// is small, finds every feature by id however many there are, and reads back what the
// document said.
func TestSnapshotLayout(t *testing.T) {
	for _, n := range []int{0, 1, 2, 3, 4, 5, 8, 9, 40} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			var feats []string
			for i := range n {
				if i%2 == 0 {
					feats = append(feats, fmt.Sprintf(`"layout_static_%d": {"type": "static", "static_values": ["tier %d", "24/7"]}`, i, i))
				} else {
					feats = append(feats, fmt.Sprintf(`"layout_metered_%d": {"type": "metered", "usage_limit": %d}`, i, 100+i))
				}
			}
			doc := `{"customer_id": "cust_layout", "features": {` + strings.Join(feats, ",") + `}}`
			s, err := ParseSnapshot([]byte(doc))
			if err != nil {
				t.Fatal(err)
			}
			if s.CustomerID != "cust_layout" || len(s.Features) != n {
				t.Fatalf("customer %q, %d features", s.CustomerID, len(s.Features))
			}
			for i := range n {
				key, want := fmt.Sprintf("layout_static_%d", i), fmt.Sprintf("tier %d, 24/7", i)
				if i%2 == 1 {
					key, want = fmt.Sprintf("layout_metered_%d", i), ""
				}
				f := s.FeatureByID(FeatureID(key), key)
				if f == nil || f != s.Features[key] || f.Key != key || f.HeaderValue != want {
					t.Fatalf("feature %s: %+v", key, f)
				}
				if i%2 == 1 && (f.Type != Metered || f.Limit != int64(100+i)) {
					t.Fatalf("feature %s: %+v", key, f)
				}
			}
			if f := s.FeatureByID(FeatureID("layout_absent"), "layout_absent"); f != nil {
				t.Fatalf("absent feature found: %+v", f)
			}
			if n > 8 {
				return // separate allocations
			}
			// The block is at most a Snapshot, 8 features and 512 bytes of strings.
			lo := uintptr(unsafe.Pointer(s))
			hi := lo + unsafe.Sizeof(Snapshot{}) + 8*unsafe.Sizeof(Feature{}) + 512
			in := func(what string, p unsafe.Pointer) {
				if a := uintptr(p); a < lo || a >= hi {
					t.Errorf("%s at %#x, outside the snapshot's block [%#x, %#x)", what, a, lo, hi)
				}
			}
			in("customer id", unsafe.Pointer(unsafe.StringData(s.CustomerID)))
			for k, f := range s.Features {
				in("feature "+k, unsafe.Pointer(f))
				in("key of "+k, unsafe.Pointer(unsafe.StringData(f.Key)))
				if f.HeaderValue != "" {
					in("header value of "+k, unsafe.Pointer(unsafe.StringData(f.HeaderValue)))
				}
			}
		})
	}
}
