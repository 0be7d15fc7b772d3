package flexprice

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gatehouse-dev/gatehouse/config"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
)

// Secret is a value that must never be logged: it prints, formats and marshals as
// "[redacted]", whatever the verb or encoder.
type Secret string

const redacted = "[redacted]"

func (Secret) String() string               { return redacted }
func (Secret) GoString() string             { return redacted }
func (Secret) Format(f fmt.State, _ rune)   { _, _ = io.WriteString(f, redacted) }
func (Secret) MarshalText() ([]byte, error) { return []byte(redacted), nil }
func (Secret) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }
func (s Secret) reveal() string             { return string(s) }
func (s Secret) empty() bool                { return strings.TrimSpace(string(s)) == "" }

// Options configures a Bridge. The zero value of each field means its documented
// default; JetStream and APIKey are required.
type Options struct {
	APIURL        string        // default https://us.api.flexprice.io/v1
	APIKey        Secret        // sent as x-api-key; never logged
	Customers     []string      // external ids to sync; empty: every customer, paged from the API
	SyncInterval  time.Duration // full sync period; default 5m
	WebhookListen string        // default 127.0.0.1:9902; Flexprice POSTs to WebhookPath
	AdminListen   string        // default 127.0.0.1:9903: /healthz, /readyz, /metrics
	Features      map[string]FeatureEvents

	JetStream  jetstream.JetStream
	Logger     *zap.Logger  // default: no logs
	HTTPClient *http.Client // default: a client of its own, keeping MaxConcurrency connections
	Clock      Clock        // default: the wall clock

	MaxConcurrency int           // Flexprice API calls in flight; default 8
	PageSize       int           // customers per list call, at most 1,000; default 500
	MaxAttempts    int           // tries per API read before a sync gives up on it; default 5
	RequestTimeout time.Duration // one API call; default 30s
	Backoff        time.Duration // first retry delay, doubling; default 250ms
	MaxBackoff     time.Duration // longest retry delay; default 30s
	MaxRetryAfter  time.Duration // longest 429 Retry-After honoured; default 5m
	BoundaryDelay  time.Duration // re-fetch this long after an override or period starts or ends; default 1s

	AckWait        time.Duration // the usage consumer's AckWait; default 60s
	FetchBatch     int           // usage messages fetched at once; default 256
	FetchWait      time.Duration // longest wait for a fetch; default 1s
	MaxCountEvents int64         // count mode: most events one delta may become; default 100,000
	// StreamReplicas is the replicas of the usage and dead-letter streams when the bridge
	// creates them (usage.stream_replicas); default 1.
	StreamReplicas int

	DisableSync  bool // no entitlements in (KV left alone)
	DisableUsage bool // no usage out
}

// OptionsFromConfig builds Options from the flexprice config section. The API key is
// read from the file api_key_file when set, else from the environment variable
// api_key_env. The caller adds JetStream, Logger and HTTPClient.
func OptionsFromConfig(c config.Flexprice) (Options, error) {
	o := Options{APIURL: c.APIURL, Customers: c.Customers, SyncInterval: c.SyncInterval,
		WebhookListen: c.WebhookListen, AdminListen: c.AdminListen, Features: map[string]FeatureEvents{}}
	for k, f := range c.Features {
		o.Features[k] = FeatureEvents{EventName: f.EventName, Mode: f.Mode, Property: f.Property}
	}
	switch {
	case c.APIKeyFile != "":
		data, err := os.ReadFile(c.APIKeyFile)
		if err != nil {
			return o, fmt.Errorf("flexprice api key: %w", err)
		}
		o.APIKey = Secret(strings.TrimSpace(string(data)))
		if o.APIKey.empty() {
			return o, fmt.Errorf("flexprice api key: file %s is empty", c.APIKeyFile)
		}
	case c.APIKeyEnv != "":
		o.APIKey = Secret(strings.TrimSpace(os.Getenv(c.APIKeyEnv)))
		if o.APIKey.empty() {
			return o, fmt.Errorf("flexprice api key: environment variable %s is empty", c.APIKeyEnv)
		}
	default:
		return o, errors.New("flexprice api key: set api_key_env or api_key_file")
	}
	return o, nil
}

func (o *Options) defaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	defInt := func(n *int, v int) {
		if *n <= 0 {
			*n = v
		}
	}
	if o.APIURL == "" {
		o.APIURL = "https://us.api.flexprice.io/v1"
	}
	o.APIURL = strings.TrimRight(o.APIURL, "/")
	def(&o.SyncInterval, 5*time.Minute)
	if o.WebhookListen == "" {
		o.WebhookListen = "127.0.0.1:9902"
	}
	if o.AdminListen == "" {
		o.AdminListen = "127.0.0.1:9903"
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	if o.Clock == nil {
		o.Clock = wallClock{}
	}
	defInt(&o.MaxConcurrency, 8)
	if o.HTTPClient == nil {
		// Keep a connection per request in flight, not net/http's default of 2 idle.
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.MaxIdleConnsPerHost = o.MaxConcurrency
		o.HTTPClient = &http.Client{Transport: t}
	}
	defInt(&o.PageSize, 500)
	o.PageSize = min(o.PageSize, 1000)
	defInt(&o.MaxAttempts, 5)
	def(&o.RequestTimeout, 30*time.Second)
	def(&o.Backoff, 250*time.Millisecond)
	def(&o.MaxBackoff, 30*time.Second)
	def(&o.MaxRetryAfter, 5*time.Minute)
	def(&o.BoundaryDelay, time.Second)
	def(&o.AckWait, 60*time.Second)
	defInt(&o.FetchBatch, 256)
	def(&o.FetchWait, time.Second)
	defInt(&o.StreamReplicas, 1)
	if o.MaxCountEvents <= 0 {
		o.MaxCountEvents = 100_000
	}
}

// Bridge keeps gatehouse's KV replica in step with Flexprice and sends gatehouse's usage
// to Flexprice as events. One runs per deployment.
type Bridge struct {
	opts     Options
	log      *zap.Logger
	m        *metrics
	api      *client
	sync     atomic.Pointer[syncer] // set by Run
	usage    *usageOut
	webhooks chan *webhook

	mu        sync.Mutex // guards the listeners and state
	webhookLn net.Listener
	adminLn   net.Listener
	running   bool
	closed    bool
}

// New checks opts and returns a Bridge that has not started anything.
func New(opts Options) (*Bridge, error) {
	opts.defaults()
	var errs []error
	if opts.APIKey.empty() {
		errs = append(errs, errors.New("flexprice: APIKey is required"))
	}
	if opts.JetStream == nil {
		errs = append(errs, errors.New("flexprice: JetStream is required"))
	}
	if !strings.HasPrefix(opts.APIURL, "http://") && !strings.HasPrefix(opts.APIURL, "https://") {
		errs = append(errs, fmt.Errorf("flexprice: api_url %q must start with http:// or https://", opts.APIURL))
	}
	feats := map[string]*FeatureEvents{}
	for k, f := range opts.Features {
		if f.Mode != ModeSum && f.Mode != ModeCount {
			errs = append(errs, fmt.Errorf("flexprice: features.%s.mode: must be sum or count (got %q)", k, f.Mode))
		}
		if strings.TrimSpace(f.EventName) == "" {
			errs = append(errs, fmt.Errorf("flexprice: features.%s.event_name: required", k))
		}
		f := f
		feats[k] = &f
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	log := opts.Logger.Named("flexprice")
	m := newMetrics()
	api := &client{base: opts.APIURL, key: opts.APIKey.reveal(), hc: opts.HTTPClient,
		sem: make(chan struct{}, opts.MaxConcurrency), timeout: opts.RequestTimeout,
		backoff: opts.Backoff, maxWait: opts.MaxBackoff, maxRetryAfter: opts.MaxRetryAfter,
		log: log.Named("api"), m: m}
	b := &Bridge{opts: opts, log: log, m: m, api: api, webhooks: make(chan *webhook, 1024)}
	b.usage = &usageOut{js: opts.JetStream, api: api, log: log.Named("usage"), m: m, features: feats,
		ackWait: opts.AckWait, fetchBatch: opts.FetchBatch, fetchWait: opts.FetchWait,
		maxCount: opts.MaxCountEvents, backoff: opts.Backoff, maxWait: opts.MaxBackoff, replicas: opts.StreamReplicas}
	return b, nil
}

// Listen binds the webhook and admin listeners; Run calls it when it was not called.
func (b *Bridge) Listen() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errors.New("flexprice: bridge closed")
	}
	if b.webhookLn != nil {
		return nil
	}
	wl, err := net.Listen("tcp", b.opts.WebhookListen)
	if err != nil {
		return fmt.Errorf("webhook listener: %w", err)
	}
	al, err := net.Listen("tcp", b.opts.AdminListen)
	if err != nil {
		wl.Close()
		return fmt.Errorf("admin listener: %w", err)
	}
	b.webhookLn, b.adminLn = wl, al
	return nil
}

// WebhookURL is where Flexprice must POST webhooks; empty before Listen.
func (b *Bridge) WebhookURL() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.webhookLn == nil {
		return ""
	}
	return "http://" + b.webhookLn.Addr().String() + WebhookPath
}

// AdminAddr is the admin listener's address; nil before Listen.
func (b *Bridge) AdminAddr() net.Addr {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.adminLn == nil {
		return nil
	}
	return b.adminLn.Addr()
}

// Ready reports whether a full sync has completed and usage out is consuming.
func (b *Bridge) Ready() bool {
	s := b.sync.Load()
	return (b.opts.DisableSync || (s != nil && s.ready.Load())) &&
		(b.opts.DisableUsage || b.usage.running.Load())
}

// FullSync runs a full sync now and waits for it; Run must be running. It returns how
// many customers were synced.
func (b *Bridge) FullSync(ctx context.Context) (int, error) {
	s := b.sync.Load()
	if s == nil {
		return 0, errors.New("flexprice: bridge is not running")
	}
	return s.fullSync(ctx)
}

// Close releases the listeners of a bridge that is not running; it is safe to call
// twice. A running bridge stops when Run's context ends.
func (b *Bridge) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	if b.running {
		return nil
	}
	for _, ln := range []net.Listener{b.webhookLn, b.adminLn} {
		if ln != nil {
			ln.Close()
		}
	}
	b.webhookLn, b.adminLn = nil, nil
	return nil
}

// Run syncs entitlements and sends usage until ctx ends, then stops everything it
// started, waits for it, and returns nil; it returns an error when it cannot start or
// a listener fails.
func (b *Bridge) Run(ctx context.Context) error {
	if err := b.Listen(); err != nil {
		return err
	}
	b.mu.Lock()
	if b.running || b.closed {
		b.mu.Unlock()
		return errors.New("flexprice: bridge already running or closed")
	}
	b.running = true
	wl, al := b.webhookLn, b.adminLn
	b.mu.Unlock()
	defer b.Close()
	defer func() {
		b.mu.Lock()
		b.running = false
		b.mu.Unlock()
	}()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var cons jetstream.Consumer
	if !b.opts.DisableUsage {
		c, err := b.usage.setup(ctx)
		if err != nil {
			wl.Close()
			al.Close()
			return err
		}
		cons = c
	}
	var s *syncer
	if !b.opts.DisableSync {
		store, err := openStore(ctx, b.opts.JetStream)
		if err != nil {
			wl.Close()
			al.Close()
			return err
		}
		s = newSyncer(b.api, store, &b.opts, b.m, b.log.Named("sync"))
		b.sync.Store(s)
	}
	b.log.Info("flexprice bridge starting", zap.String("api_url", b.opts.APIURL),
		zap.Int("customers_configured", len(b.opts.Customers)), zap.Duration("sync_interval", b.opts.SyncInterval),
		zap.String("webhook", wl.Addr().String()), zap.String("admin", al.Addr().String()),
		zap.Int("features_mapped", len(b.opts.Features)), zap.Bool("sync", s != nil), zap.Bool("usage", cons != nil))

	var wg sync.WaitGroup
	goFn := func(f func()) {
		wg.Add(1)
		go func() { defer wg.Done(); f() }()
	}
	errc := make(chan error, 2)
	servers := []*http.Server{b.webhookServer(), b.adminServer()}
	for i, ln := range []net.Listener{wl, al} {
		srv := servers[i]
		goFn(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("serve %s: %w", ln.Addr(), err)
			}
		})
	}
	if s != nil {
		for range 2 * b.opts.MaxConcurrency {
			goFn(func() { s.worker(ctx) })
		}
		goFn(func() { s.scheduler(ctx) })
		goFn(func() { s.webhookLoop(ctx, b.webhooks) })
		goFn(func() { s.loop(ctx, b.opts.SyncInterval) })
	}
	if cons != nil {
		goFn(func() { b.usage.run(ctx, cons) })
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	for _, srv := range servers {
		_ = srv.Shutdown(sctx)
	}
	scancel()
	cancel()
	wg.Wait()
	b.log.Info("flexprice bridge stopped")
	return err
}

func (b *Bridge) webhookServer() *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc(WebhookPath, b.serveWebhook)
	return &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: 30 * time.Second,
		ErrorLog: zap.NewStdLog(b.log.Named("webhook"))}
}

func (b *Bridge) adminServer() *http.Server {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !b.Ready() {
			http.Error(w, "not ready: first full sync or usage consumer pending", http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ready\n")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(b.m.reg, promhttp.HandlerOpts{}))
	return &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: zap.NewStdLog(b.log.Named("admin"))}
}
