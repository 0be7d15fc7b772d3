// Package flexpricetest is an in-process Flexprice API for tests: customers (paged),
// subscriptions, features, plans and addons with entitlements, subscription-level
// entitlement overrides with start and end dates, the effective-entitlements endpoint
// that aggregates them, the bulk events endpoint that records what it accepted, fault
// injection, and a way to fire Flexprice webhooks at a receiver.
//
// It follows /work/shared/FLEXPRICE.md: x-api-key auth (401 otherwise), list responses
// {"items", "pagination": {"total", "limit", "offset"}}, errors {"code", "message",
// "http_status_code", "details"}, feature types lowercase and reset periods uppercase.
// It serves real HTTP on 127.0.0.1 and holds everything in memory. Only tests and
// benchmarks import it; it must not be used to decide anything in production code.
package flexpricetest

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Customer is a Flexprice customer as the API shows it.
type Customer struct {
	ID         string            `json:"id"`
	ExternalID string            `json:"external_id"`
	Name       string            `json:"name,omitempty"`
	Email      string            `json:"email,omitempty"`
	Timezone   string            `json:"timezone,omitempty"`
	Metadata   map[string]string `json:"metadata,omitempty"`
}

// Subscription is a customer's subscription. LineItems name the plan and every attached
// addon (an addon attached twice has two line items).
type Subscription struct {
	ID                 string     `json:"id"`
	CustomerID         string     `json:"customer_id"`
	PlanID             string     `json:"plan_id"`
	SubscriptionStatus string     `json:"subscription_status"` // active, trialing, cancelled, …
	SubscriptionType   string     `json:"subscription_type,omitempty"`
	StartDate          time.Time  `json:"start_date"`
	EndDate            *time.Time `json:"end_date,omitempty"`
	TrialEnd           *time.Time `json:"trial_end,omitempty"`
	CurrentPeriodStart time.Time  `json:"current_period_start"`
	CurrentPeriodEnd   time.Time  `json:"current_period_end"`
	BillingAnchor      time.Time  `json:"billing_anchor"`
	BillingPeriod      string     `json:"billing_period"`
	BillingPeriodCount int        `json:"billing_period_count"`
	Timezone           string     `json:"timezone,omitempty"`
	LineItems          []LineItem `json:"line_items,omitempty"`
}

// LineItem is one plan or addon on a subscription.
type LineItem struct {
	ID         string `json:"id"`
	EntityType string `json:"entity_type"` // plan | addon
	EntityID   string `json:"entity_id"`
	Quantity   int64  `json:"quantity"`
}

// Feature is a Flexprice feature. Type is lowercase: boolean, metered, static, config.
type Feature struct {
	ID          string          `json:"id"`
	Name        string          `json:"name,omitempty"`
	LookupKey   string          `json:"lookup_key"`
	Type        string          `json:"type"`
	Meter       *Meter          `json:"meter,omitempty"`
	ConfigValue json.RawMessage `json:"config_value,omitempty"`
}

// Meter says how a metered feature's events count.
type Meter struct {
	ID          string      `json:"id,omitempty"`
	EventName   string      `json:"event_name"`
	Aggregation Aggregation `json:"aggregation"`
}

// Aggregation is a meter's aggregation: COUNT, or SUM over Field, and so on.
type Aggregation struct {
	Type  string `json:"type"`
	Field string `json:"field,omitempty"`
}

// Entitlement belongs to a plan, an addon or (an override) a subscription. Overrides may
// carry StartDate and EndDate: they count in [StartDate, EndDate).
type Entitlement struct {
	ID               string          `json:"id"`
	EntityType       string          `json:"entity_type"` // plan | addon | subscription
	EntityID         string          `json:"entity_id"`
	FeatureID        string          `json:"feature_id"`
	FeatureType      string          `json:"feature_type,omitempty"`
	IsEnabled        bool            `json:"is_enabled"`
	UsageLimit       *int64          `json:"usage_limit,omitempty"`
	UsageResetPeriod string          `json:"usage_reset_period,omitempty"`
	IsSoftLimit      bool            `json:"is_soft_limit"`
	StaticValue      string          `json:"static_value,omitempty"`
	ConfigValue      json.RawMessage `json:"config_value,omitempty"`
	StartDate        *time.Time      `json:"start_date,omitempty"`
	EndDate          *time.Time      `json:"end_date,omitempty"`
}

// Limit returns a pointer to n, for Entitlement.UsageLimit.
func Limit(n int64) *int64 { return &n }

// Options configures a Server. The zero value of each field is its documented default.
type Options struct {
	APIKey string // required in x-api-key; default "sk_test"
	// Now is the server's clock, which decides whether an override is in effect.
	// Default time.Now.
	Now func() time.Time
	// PerSource lists one effective-entitlements entry per contributor (plan, each
	// addon attachment, each override, ended overrides included) instead of one
	// aggregated entry per feature, so that the client must aggregate.
	PerSource bool
	// HideBadIndex leaves out of a bulk request's 400 which event was refused, so that
	// the client must find it.
	HideBadIndex bool
}

// Server is the fake Flexprice API. All methods are safe for concurrent use.
type Server struct {
	opts Options
	ln   net.Listener
	srv  *http.Server
	done chan struct{}

	mu        sync.Mutex // guards everything below
	seq       int
	customers []*Customer // in creation order, which is the list order
	byExt     map[string]*Customer
	features  map[string]*Feature
	ents      []*Entitlement
	entsOf    map[string][]*Entitlement // entity type + "/" + id -> its entitlements
	subs      []*Subscription
	subsOf    map[string][]*Subscription // customer id -> its subscriptions
	faults    []*Fault
	calls     map[string][]Call
	ev        eventLog
}

// Call is one request the server answered.
type Call struct {
	At     time.Time // wall clock when the request arrived
	Path   string
	Status int
	Events int // events in a bulk request
}

// New returns a server that does not listen yet; see Start.
func New(opts Options) *Server {
	if opts.APIKey == "" {
		opts.APIKey = "sk_test"
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Server{opts: opts, features: map[string]*Feature{}, calls: map[string][]Call{},
		byExt: map[string]*Customer{}, entsOf: map[string][]*Entitlement{},
		subsOf: map[string][]*Subscription{}, ev: newEventLog()}
}

// Start listens on 127.0.0.1 on a free port and serves until Close.
func (s *Server) Start() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	s.ln = ln
	s.srv = &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		_ = s.srv.Serve(ln)
	}()
	return nil
}

// Close stops the server and waits for it; it is safe to call twice.
func (s *Server) Close() {
	if s.srv == nil {
		return
	}
	_ = s.srv.Close()
	<-s.done
}

// URL is the API base URL, ending in /v1, as the bridge's api_url.
func (s *Server) URL() string { return "http://" + s.ln.Addr().String() + "/v1" }

// APIKey is the key the server accepts.
func (s *Server) APIKey() string { return s.opts.APIKey }

func (s *Server) nextID(prefix string) string {
	s.seq++
	return fmt.Sprintf("%s_%06d", prefix, s.seq)
}

// AddFeature adds a feature; an empty ID is assigned.
func (s *Server) AddFeature(f Feature) Feature {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.ID == "" {
		f.ID = s.nextID("feat")
	}
	s.features[f.ID] = &f
	return f
}

// UpdateFeature replaces a feature.
func (s *Server) UpdateFeature(f Feature) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.features[f.ID] = &f
}

// SetEntitlements replaces the entitlements of a plan, an addon or (overrides) a
// subscription, and returns them with their ids. FeatureType is filled from the feature,
// and is_enabled is forced true on non-boolean features, as Flexprice does.
func (s *Server) SetEntitlements(entityType, entityID string, ents ...Entitlement) []Entitlement {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ents = slices.DeleteFunc(s.ents, func(e *Entitlement) bool {
		return e.EntityType == entityType && e.EntityID == entityID
	})
	out := make([]Entitlement, 0, len(ents))
	for _, e := range ents {
		e.EntityType, e.EntityID = entityType, entityID
		if e.ID == "" {
			e.ID = s.nextID("ent")
		}
		if f := s.features[e.FeatureID]; f != nil {
			e.FeatureType = f.Type
			if f.Type != "boolean" {
				e.IsEnabled = true
			}
		}
		s.ents = append(s.ents, &e)
		out = append(out, e)
	}
	k := entityType + "/" + entityID
	s.entsOf[k] = nil
	for _, e := range s.ents {
		if e.EntityType == entityType && e.EntityID == entityID {
			s.entsOf[k] = append(s.entsOf[k], e)
		}
	}
	return out
}

// AddCustomer adds a customer; an empty ID is assigned. Timezone defaults to UTC.
func (s *Server) AddCustomer(c Customer) Customer {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.ID == "" {
		c.ID = s.nextID("cust")
	}
	if c.Timezone == "" {
		c.Timezone = "UTC"
	}
	s.customers = append(s.customers, &c)
	s.byExt[c.ExternalID] = &c
	return c
}

// DeleteCustomer removes a customer and its subscriptions, and returns it.
func (s *Server) DeleteCustomer(externalID string) (Customer, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, c := range s.customers {
		if c.ExternalID == externalID {
			s.customers = slices.Delete(s.customers, i, i+1)
			s.subs = slices.DeleteFunc(s.subs, func(x *Subscription) bool { return x.CustomerID == c.ID })
			delete(s.byExt, externalID)
			delete(s.subsOf, c.ID)
			return *c, true
		}
	}
	return Customer{}, false
}

// AddSubscription adds a subscription; an empty ID is assigned, and the plan's line item
// is added. Defaults: status active, billing period MONTHLY, count 1, anchor the period
// start, timezone the customer's.
func (s *Server) AddSubscription(sub Subscription) Subscription {
	s.mu.Lock()
	defer s.mu.Unlock()
	if sub.ID == "" {
		sub.ID = s.nextID("subs")
	}
	if sub.SubscriptionStatus == "" {
		sub.SubscriptionStatus = "active"
	}
	if sub.BillingPeriod == "" {
		sub.BillingPeriod = "MONTHLY"
	}
	if sub.BillingPeriodCount == 0 {
		sub.BillingPeriodCount = 1
	}
	if sub.BillingAnchor.IsZero() {
		sub.BillingAnchor = sub.CurrentPeriodStart
	}
	if sub.StartDate.IsZero() {
		sub.StartDate = sub.CurrentPeriodStart
	}
	if sub.Timezone == "" {
		sub.Timezone = "UTC"
		for _, c := range s.customers {
			if c.ID == sub.CustomerID {
				sub.Timezone = c.Timezone
			}
		}
	}
	sub.LineItems = append([]LineItem{{ID: s.nextID("li"), EntityType: "plan", EntityID: sub.PlanID, Quantity: 1}}, sub.LineItems...)
	s.subs = append(s.subs, &sub)
	s.subsOf[sub.CustomerID] = append(s.subsOf[sub.CustomerID], &sub)
	return sub
}

// UpdateSubscription applies fn to a subscription (to change its plan, status, …).
func (s *Server) UpdateSubscription(id string, fn func(*Subscription)) (Subscription, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sub := range s.subs {
		if sub.ID == id {
			fn(sub)
			for i := range sub.LineItems {
				if sub.LineItems[i].EntityType == "plan" {
					sub.LineItems[i].EntityID = sub.PlanID
				}
			}
			return *sub, true
		}
	}
	return Subscription{}, false
}

// AttachAddon attaches an addon to a subscription once more.
func (s *Server) AttachAddon(subID, addonID string) {
	s.UpdateSubscription(subID, func(sub *Subscription) {
		s.seq++
		sub.LineItems = append(sub.LineItems, LineItem{ID: fmt.Sprintf("li_%06d", s.seq),
			EntityType: "addon", EntityID: addonID, Quantity: 1})
	})
}

// Customer returns a customer by external id.
func (s *Server) Customer(externalID string) (Customer, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c := s.customerByExt(externalID); c != nil {
		return *c, true
	}
	return Customer{}, false
}

// Subscription returns a subscription by id.
func (s *Server) Subscription(id string) (Subscription, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sub := range s.subs {
		if sub.ID == id {
			return *sub, true
		}
	}
	return Subscription{}, false
}

// Entitlements returns the entitlements of a plan, addon or subscription.
func (s *Server) Entitlements(entityType, entityID string) []Entitlement {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Entitlement
	for _, e := range s.ents {
		if e.EntityType == entityType && e.EntityID == entityID {
			out = append(out, *e)
		}
	}
	return out
}

// Calls returns the requests answered on a route: a path such as "/v1/events/bulk", with
// the customer id left out of customer paths ("/v1/customers/external/entitlements").
func (s *Server) Calls(path string) []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls[path])
}

func (s *Server) customerByExt(ext string) *Customer { return s.byExt[ext] }

// ServeHTTP routes a request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	at := time.Now()
	rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
	events := s.serve(rec, r)
	route := r.URL.Path
	if strings.HasPrefix(route, "/v1/customers/") {
		route = "/v1/customers/" + routeTail(route)
	}
	s.mu.Lock()
	s.calls[route] = append(s.calls[route], Call{At: at, Path: r.URL.Path, Status: rec.status, Events: events})
	s.mu.Unlock()
}

// routeTail names a customer route without its id: "external/entitlements", "id".
func routeTail(p string) string {
	rest := strings.TrimPrefix(p, "/v1/customers/")
	if ext, ok := strings.CutPrefix(rest, "external/"); ok {
		if i := strings.LastIndexByte(ext, '/'); i >= 0 {
			return "external/" + ext[i+1:]
		}
	}
	return "id"
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) (events int) {
	if r.Header.Get("x-api-key") != s.opts.APIKey {
		writeError(w, http.StatusUnauthorized, "unauthorized", "missing or invalid x-api-key", nil)
		return 0
	}
	body := readBody(r) // before a fault's delay, so a timed-out request is still processed
	bad := -1
	if f := s.takeFault(r.URL.Path); f != nil {
		if answered := f.apply(w, r); answered {
			return 0
		}
		bad = f.BadEvent - 1
	}
	p := r.URL.Path
	switch {
	case r.Method == http.MethodPost && p == "/v1/events/bulk":
		return s.bulkEvents(w, body, bad)
	case r.Method == http.MethodGet && p == "/v1/customers":
		s.listCustomers(w, r)
	case r.Method == http.MethodGet && strings.HasPrefix(p, "/v1/customers/external/"):
		rest := strings.TrimPrefix(r.URL.EscapedPath(), "/v1/customers/external/")
		ext, what, _ := strings.Cut(rest, "/")
		s.customerExternal(w, ext, what)
	case r.Method == http.MethodGet && strings.HasPrefix(p, "/v1/customers/"):
		s.getCustomer(w, strings.TrimPrefix(p, "/v1/customers/"))
	default:
		writeError(w, http.StatusNotFound, "not_found", "no route "+r.Method+" "+p, nil)
	}
	return 0
}

func (s *Server) listCustomers(w http.ResponseWriter, r *http.Request) {
	limit, offset := 50, 0
	q := r.URL.Query()
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			writeError(w, http.StatusBadRequest, "validation_error", "limit must be 1 to 1000", nil)
			return
		}
		limit = n
	}
	if v := q.Get("offset"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			writeError(w, http.StatusBadRequest, "validation_error", "offset must be >= 0", nil)
			return
		}
		offset = n
	}
	s.mu.Lock()
	total := len(s.customers)
	items := []Customer{}
	for i := offset; i < total && i < offset+limit; i++ {
		items = append(items, *s.customers[i])
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"items": items,
		"pagination": map[string]int{"total": total, "limit": limit, "offset": offset}})
}

func (s *Server) getCustomer(w http.ResponseWriter, id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.customers {
		if c.ID == id {
			writeJSON(w, http.StatusOK, c)
			return
		}
	}
	writeError(w, http.StatusNotFound, "not_found", "customer not found", map[string]any{"id": id})
}

func (s *Server) customerExternal(w http.ResponseWriter, escapedExt, what string) {
	ext, err := unescape(escapedExt)
	if err != nil {
		writeError(w, http.StatusBadRequest, "validation_error", "bad external id", nil)
		return
	}
	s.mu.Lock()
	c := s.customerByExt(ext)
	if c == nil {
		s.mu.Unlock()
		writeError(w, http.StatusNotFound, "not_found", "customer not found", map[string]any{"external_id": ext})
		return
	}
	var body any
	switch what {
	case "subscriptions":
		items := []Subscription{}
		for _, sub := range s.subsOf[c.ID] {
			items = append(items, *sub)
		}
		body = map[string]any{"items": items,
			"pagination": map[string]int{"total": len(items), "limit": len(items), "offset": 0}}
	case "entitlements":
		body = s.effective(c, s.opts.Now())
	}
	s.mu.Unlock() // encode outside the lock
	if body == nil {
		writeError(w, http.StatusNotFound, "not_found", "no such customer resource "+what, nil)
		return
	}
	writeJSON(w, http.StatusOK, body)
}

// Error is the Flexprice error body.
type Error struct {
	Code           string         `json:"code"`
	Message        string         `json:"message"`
	HTTPStatusCode int            `json:"http_status_code"`
	Details        map[string]any `json:"details,omitempty"`
}

func writeError(w http.ResponseWriter, status int, code, msg string, details map[string]any) {
	writeJSON(w, status, Error{Code: code, Message: msg, HTTPStatusCode: status, Details: details})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}
