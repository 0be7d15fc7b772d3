package quota

import (
	"encoding/json"
	"fmt"
	"maps"
	"time"

	"github.com/gatehouse-dev/gatehouse/limiter"
)

// Value is the KV value of one counter's fleet quota: the limit, and what each sidecar
// was granted of it. A grant is what that sidecar may use in the window, what it used
// already included; a sidecar lowers its own grant when it returns quota, and never
// touches another's. Usage itself travels apart, through the usage stream.
//
// Invariant: Granted, the sum of the grants, never exceeds Limit by a write that raises
// a grant (a lowered limit may leave it above until the sidecars return quota).
type Value struct {
	CustomerID  string    `json:"customer_id"`
	Feature     string    `json:"feature"`
	WindowStart time.Time `json:"window_start"`
	// WindowEnd is when the window ends; absent for a window that never ends.
	WindowEnd *time.Time `json:"window_end,omitempty"`
	// Limit is the hard limit of the newest entitlement snapshot that a sidecar wrote
	// here, and LimitRevision that snapshot's KV revision: an older snapshot never
	// overrides a newer one's limit.
	Limit         int64  `json:"limit"`
	LimitRevision uint64 `json:"limit_revision"`
	// Granted is the sum of Sidecars.
	Granted int64 `json:"granted"`
	// Sidecars holds each sidecar's grant, by sidecar id; a sidecar with none is absent.
	Sidecars map[string]int64 `json:"sidecars"`
}

func newValue(k limiter.CounterKey, end int64) *Value {
	v := &Value{CustomerID: k.Customer, Feature: k.Feature, WindowStart: time.Unix(0, k.WindowStart).UTC(),
		Sidecars: map[string]int64{}}
	if end != limiter.NeverEnds {
		e := time.Unix(0, end).UTC()
		v.WindowEnd = &e
	}
	return v
}

// decodeValue reads a KV value. Granted is recomputed from the grants, which are the
// truth; a value that does not decode, or holds a negative grant, is an error.
func decodeValue(b []byte) (*Value, error) {
	var v Value
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("quota value: %w", err)
	}
	if v.Sidecars == nil {
		v.Sidecars = map[string]int64{}
	}
	var sum int64
	for id, g := range v.Sidecars {
		if g < 0 {
			return nil, fmt.Errorf("quota value: sidecar %q has a negative grant %d", id, g)
		}
		if sum+g < sum {
			return nil, fmt.Errorf("quota value: the grants overflow")
		}
		sum += g
	}
	v.Granted = sum
	return &v, nil
}

func (v *Value) encode() []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("quota: encode value: %v", err)) // plain types only
	}
	return b
}

func (v *Value) clone() *Value {
	c := *v
	c.Sidecars = maps.Clone(v.Sidecars)
	return &c
}

// setGrant sets one sidecar's grant and keeps Granted the sum.
func (v *Value) setGrant(id string, g int64) {
	v.Granted += g - v.Sidecars[id]
	if g == 0 {
		delete(v.Sidecars, id)
	} else {
		v.Sidecars[id] = g
	}
}

// holders is how many sidecars hold a grant, id counted whether or not it does: the
// number of sidecars expected to share what is left.
func (v *Value) holders(id string) int64 {
	n := int64(len(v.Sidecars))
	if _, ok := v.Sidecars[id]; !ok {
		n++
	}
	return n
}
