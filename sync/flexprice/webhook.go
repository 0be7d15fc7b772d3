package flexprice

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"

	"go.uber.org/zap"
)

// WebhookPath is where Flexprice POSTs its webhooks.
const WebhookPath = "/webhooks/flexprice"

// maxWebhookBytes bounds a webhook body.
const maxWebhookBytes = 1 << 20

// index maps Flexprice entities to the customers whose snapshots depend on them, as
// learnt from each customer's last re-fetch (its subscriptions' plans and line items,
// its entitlement sources and features), so that a change to a plan or an addon fans
// out to exactly the customers on it.
type index struct {
	refs     map[string]customerRefs        // customer -> what it depends on
	plans    map[string]map[string]struct{} // plan id -> customers
	addons   map[string]map[string]struct{} // addon id -> customers
	features map[string]map[string]struct{} // feature id -> customers
	subs     map[string]string              // subscription id -> customer
	internal map[string]string              // Flexprice customer id -> external id
}

func newIndex() index {
	return index{refs: map[string]customerRefs{}, plans: map[string]map[string]struct{}{},
		addons: map[string]map[string]struct{}{}, features: map[string]map[string]struct{}{},
		subs: map[string]string{}, internal: map[string]string{}}
}

func (x *index) update(id string, r customerRefs) {
	x.remove(id)
	x.refs[id] = r
	add := func(m map[string]map[string]struct{}, keys []string) {
		for _, k := range keys {
			if m[k] == nil {
				m[k] = map[string]struct{}{}
			}
			m[k][id] = struct{}{}
		}
	}
	add(x.plans, r.plans)
	add(x.addons, r.addons)
	add(x.features, r.features)
	for _, s := range r.subscriptions {
		x.subs[s] = id
	}
	if r.internalID != "" {
		x.internal[r.internalID] = id
	}
}

func (x *index) remove(id string) {
	r, ok := x.refs[id]
	if !ok {
		return
	}
	del := func(m map[string]map[string]struct{}, keys []string) {
		for _, k := range keys {
			delete(m[k], id)
			if len(m[k]) == 0 {
				delete(m, k)
			}
		}
	}
	del(x.plans, r.plans)
	del(x.addons, r.addons)
	del(x.features, r.features)
	for _, s := range r.subscriptions {
		if x.subs[s] == id {
			delete(x.subs, s)
		}
	}
	if r.internalID != "" && x.internal[r.internalID] == id {
		delete(x.internal, r.internalID)
	}
	delete(x.refs, id)
}

func keysOf(m map[string]struct{}) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// webhook is the part of a Flexprice webhook body the bridge reads: the event type and
// the current state of the one entity it is about.
type webhook struct {
	EventType string `json:"event_type"`
	Customer  *struct {
		ID         string `json:"id"`
		ExternalID string `json:"external_id"`
	} `json:"customer"`
	Subscription *struct {
		ID         string `json:"id"`
		CustomerID string `json:"customer_id"`
	} `json:"subscription"`
	Entitlement *struct {
		EntityType string `json:"entity_type"`
		EntityID   string `json:"entity_id"`
		PlanID     string `json:"plan_id"`
		AddonID    string `json:"addon_id"`
		FeatureID  string `json:"feature_id"`
	} `json:"entitlement"`
	Feature *struct {
		ID string `json:"id"`
	} `json:"feature"`
	Plan *struct {
		ID string `json:"id"`
	} `json:"plan"`
	Addon *struct {
		ID string `json:"id"`
	} `json:"addon"`
}

// ServeHTTP receives a webhook: it answers 202 once the event is queued, 400 for a body
// it cannot read, 503 when its queue is full (Flexprice retries). A webhook only ever
// causes re-fetches from the API, which stays the one source of truth, so a forged one
// costs API calls and nothing else; bind the listener where only Flexprice reaches it.
func (b *Bridge) serveWebhook(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	data, err := io.ReadAll(io.LimitReader(r.Body, maxWebhookBytes+1))
	if err != nil || len(data) > maxWebhookBytes {
		http.Error(w, "body unreadable or larger than 1 MiB", http.StatusBadRequest)
		return
	}
	var ev webhook
	if err := json.Unmarshal(data, &ev); err != nil || ev.EventType == "" {
		http.Error(w, "not a Flexprice webhook: want a JSON object with event_type", http.StatusBadRequest)
		return
	}
	b.m.webhook(ev.EventType)
	if b.opts.DisableSync {
		w.WriteHeader(http.StatusAccepted) // nothing to re-fetch
		return
	}
	select {
	case b.webhooks <- &ev:
		w.WriteHeader(http.StatusAccepted)
	default:
		http.Error(w, "busy; retry later", http.StatusServiceUnavailable)
	}
}

// webhookLoop turns queued webhooks into re-fetches until ctx ends.
func (s *syncer) webhookLoop(ctx context.Context, in <-chan *webhook) {
	for {
		select {
		case ev := <-in:
			s.handleWebhook(ctx, ev)
		case <-ctx.Done():
			return
		}
	}
}

// handleWebhook re-fetches the customers an event affects: the customer of a customer.*
// or subscription.* event; every customer on the plan or addon of an entitlement.*
// event (or the subscription's customer, for an override); every customer with the
// feature of a feature.* event. An entity the bridge cannot place asks for a full sync.
func (s *syncer) handleWebhook(ctx context.Context, ev *webhook) {
	kind, _, _ := strings.Cut(ev.EventType, ".")
	var ids []string
	unknown := false
	s.mu.Lock()
	switch {
	case kind == "customer" && ev.Customer != nil:
		c := ev.Customer
		if old := s.idx.internal[c.ID]; old != "" && old != c.ExternalID {
			ids = append(ids, old) // the external id changed: the old key goes
		}
		ext := c.ExternalID
		if ext == "" {
			ext = s.idx.internal[c.ID]
		}
		if ext == "" {
			s.mu.Unlock()
			ext = s.externalID(ctx, c.ID)
			s.mu.Lock()
		}
		ids = append(ids, ext)
		unknown = ext == ""
	case kind == "subscription" && ev.Subscription != nil:
		sub := ev.Subscription
		if ext := s.idx.subs[sub.ID]; ext != "" {
			ids = append(ids, ext)
		}
		if cur := s.idx.internal[sub.CustomerID]; cur != "" && (len(ids) == 0 || ids[0] != cur) {
			ids = append(ids, cur)
		}
		if len(ids) == 0 {
			s.mu.Unlock()
			ext := s.externalID(ctx, sub.CustomerID)
			s.mu.Lock()
			ids = append(ids, ext)
			unknown = ext == ""
		}
	case kind == "entitlement" && ev.Entitlement != nil:
		e := ev.Entitlement
		typ, id := strings.ToLower(e.EntityType), e.EntityID
		if typ == "" && e.PlanID != "" {
			typ, id = "plan", e.PlanID
		} else if typ == "" && e.AddonID != "" {
			typ, id = "addon", e.AddonID
		}
		switch typ {
		case "plan":
			ids = keysOf(s.idx.plans[id])
		case "addon":
			ids = keysOf(s.idx.addons[id])
		case "subscription":
			ids = []string{s.idx.subs[id]}
			unknown = ids[0] == ""
		default:
			ids = keysOf(s.idx.features[e.FeatureID])
			unknown = len(ids) == 0
		}
	case kind == "feature" && ev.Feature != nil:
		ids = keysOf(s.idx.features[ev.Feature.ID])
	case kind == "plan" && ev.Plan != nil:
		ids = keysOf(s.idx.plans[ev.Plan.ID])
	case kind == "addon" && ev.Addon != nil:
		ids = keysOf(s.idx.addons[ev.Addon.ID])
	}
	s.mu.Unlock()
	n := 0
	for _, id := range ids {
		if s.managed(id) {
			s.request(id)
			n++
		}
	}
	if unknown {
		signal(s.fullWant)
	}
	if ce := s.log.Check(zap.DebugLevel, "webhook handled"); ce != nil {
		ce.Write(zap.String("type", ev.EventType), zap.Int("customers", n), zap.Bool("full_sync", unknown))
	}
}

// externalID finds a customer's external id from its Flexprice id; "" when it cannot.
func (s *syncer) externalID(ctx context.Context, internalID string) string {
	if internalID == "" {
		return ""
	}
	c, err := s.api.customerByID(ctx, internalID, s.attempts)
	if err != nil {
		if !isNotFound(err) {
			s.log.Warn("webhook: look up customer", zap.String("flexprice_id", internalID), zap.Error(err))
		}
		return ""
	}
	s.mu.Lock()
	if c.ExternalID != "" {
		s.idx.internal[c.ID] = c.ExternalID
	}
	s.mu.Unlock()
	return c.ExternalID
}
