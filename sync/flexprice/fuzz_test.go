package flexprice

import (
	"encoding/json"
	"testing"
)

// FuzzBuildSnapshot feeds arbitrary API answers to the mapping: whatever Flexprice sends,
// the bridge never produces a snapshot that the sidecars would reject.
//
//	go test -fuzz FuzzBuildSnapshot ./sync/flexprice
func FuzzBuildSnapshot(f *testing.F) {
	f.Add([]byte(`{"customer_id":"cust_1","features":[{"feature":{"id":"f","lookup_key":"api","type":"METERED"},
		"entitlement":{"usage_limit":10,"usage_reset_period":"monthly"},"sources":[{"entity_type":"plan","entity_id":"p"}]}]}`),
		[]byte(`{"items":[{"id":"s","subscription_status":"active","current_period_start":"2026-11-01T00:00:00Z",
		"current_period_end":"2026-12-01T00:00:00Z","billing_period":"MONTHLY","timezone":"Europe/Berlin"}]}`))
	f.Add([]byte(`{"features":[{"feature":{"lookup_key":"x","type":"static"},"entitlement":{"static_values":["a","a","\u0000"]}},
		{"feature":{"lookup_key":"c","type":"config"},"entitlement":{"config_value":{"a":[1,2]}}},
		{"feature":{"lookup_key":"b","type":"boolean"},"entitlement":{"is_enabled":true},
		 "sources":[{"entity_type":"subscription","start_date":"2030-01-01T00:00:00Z"}]}]}`),
		[]byte(`{"items":[{"subscription_status":"trialing","current_period_start":"2026-11-01T00:00:00Z",
		"current_period_end":"2026-10-01T00:00:00Z","billing_period":"NEVER","timezone":"Mars/Olympus"}]}`))
	f.Add([]byte(`{"features":[{"feature":{"lookup_key":"m","type":"metered"},"entitlement":{"usage_limit":9223372036854775807}},
		{"feature":{"lookup_key":"m","type":"metered"},"entitlement":{"usage_limit":5}},
		{"feature":{"lookup_key":"n","type":"metered"},"entitlement":{"usage_limit":-3}}]}`), []byte(`{}`))
	f.Fuzz(func(t *testing.T, ents, subs []byte) {
		var er entitlementsResponse
		var sl subscriptionList
		if json.Unmarshal(ents, &er) != nil || json.Unmarshal(subs, &sl) != nil {
			return
		}
		b := buildSnapshot("acme", &er, sl.Items, t0)
		if _, err := b.doc.Snapshot(); err != nil {
			t.Fatalf("the bridge built a snapshot the sidecars reject: %v", err)
		}
		data, err := json.Marshal(b.doc)
		if err != nil {
			t.Fatal(err)
		}
		var back struct{}
		if err := json.Unmarshal(data, &back); err != nil {
			t.Fatal(err)
		}
	})
}
