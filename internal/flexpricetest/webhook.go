package flexpricetest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// Fire POSTs a Flexprice webhook to url, with the body Flexprice sends:
// {"event_type": eventType, "<entity>": entity}, where <entity> is the event type's first
// word (customer, subscription, entitlement, feature, plan, addon). entity carries the
// entity's current state (a Customer, Subscription, Entitlement, Feature, or a map).
// It returns an error unless the receiver answers 2xx.
func Fire(ctx context.Context, url, eventType string, entity any) error {
	kind, _, _ := strings.Cut(eventType, ".")
	body, err := json.Marshal(map[string]any{"event_type": eventType, kind: entity})
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("webhook %s: %s: %s", eventType, resp.Status, msg)
	}
	return nil
}
