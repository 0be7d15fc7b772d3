package flexprice

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// maxResponseBytes bounds one API answer (a page of 1,000 customers is well under it).
const maxResponseBytes = 64 << 20

// client calls the Flexprice API. At most cap(sem) requests are in flight at once; a 429
// holds back every request until its Retry-After has passed; 5xx, 408, 429, transport
// errors and timeouts are retried with exponential backoff and jitter.
//
// The API key travels only in the x-api-key header. It is never logged, never put in an
// error and never in a URL.
type client struct {
	base    string // api_url without a trailing slash, e.g. https://us.api.flexprice.io/v1
	key     string
	hc      *http.Client
	sem     chan struct{}
	timeout time.Duration // one attempt
	backoff time.Duration // first retry delay; doubles up to maxBackoff
	maxWait time.Duration // longest backoff
	// maxRetryAfter is the longest Retry-After honoured
	maxRetryAfter time.Duration
	log           *zap.Logger
	m             *metrics

	mu         sync.Mutex // guards pauseUntil
	pauseUntil time.Time  // no request starts before it (a 429's Retry-After)
}

// get fetches path and decodes the answer into out, with up to attempts tries.
func (c *client) get(ctx context.Context, endpoint, path string, out any, attempts int) error {
	return c.call(ctx, endpoint, http.MethodGet, path, nil, out, attempts)
}

// call sends a request, retrying what may succeed if sent again, up to attempts tries
// (0: until ctx ends). The last error is returned; an answer the server refused for good
// is an *APIError.
func (c *client) call(ctx context.Context, endpoint, method, path string, body []byte, out any, attempts int) error {
	for attempt := 0; ; attempt++ {
		err := c.once(ctx, endpoint, method, path, body, out)
		if err == nil || ctx.Err() != nil {
			return err
		}
		var ae *APIError
		isAPI := errors.As(err, &ae)
		if isAPI && !ae.retryable() {
			return err
		}
		if attempts > 0 && attempt+1 >= attempts {
			return err
		}
		wait := c.backoffFor(attempt)
		if isAPI && ae.RetryAfter > 0 {
			wait = min(ae.RetryAfter, c.maxRetryAfter)
			c.pause(wait)
		}
		c.log.Warn("flexprice request failed; retrying", zap.String("endpoint", endpoint),
			zap.Int("attempt", attempt+1), zap.Duration("wait", wait), zap.Error(err))
		if err := sleep(ctx, wait); err != nil {
			return err
		}
	}
}

func (c *client) backoffFor(attempt int) time.Duration {
	d := c.backoff << min(attempt, 20)
	if d <= 0 || d > c.maxWait {
		d = c.maxWait
	}
	return d/2 + rand.N(d/2+1)
}

// pause holds back every request for d.
func (c *client) pause(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t := time.Now().Add(d); t.After(c.pauseUntil) {
		c.pauseUntil = t
	}
}

func (c *client) waitPause(ctx context.Context) error {
	c.mu.Lock()
	until := c.pauseUntil
	c.mu.Unlock()
	if d := time.Until(until); d > 0 {
		return sleep(ctx, d)
	}
	return nil
}

// once makes one attempt.
func (c *client) once(ctx context.Context, endpoint, method, path string, body []byte, out any) error {
	if err := c.waitPause(ctx); err != nil {
		return err
	}
	select {
	case c.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.sem }()

	actx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(actx, method, c.base+path, rd)
	if err != nil {
		return fmt.Errorf("flexprice %s %s: %w", method, path, err)
	}
	req.Header.Set("x-api-key", c.key)
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "gatehouse-flexprice-bridge")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	start := time.Now()
	resp, err := c.hc.Do(req)
	if err != nil {
		c.m.observe(endpoint, start, "")
		class := "transport"
		if actx.Err() != nil && ctx.Err() == nil {
			class = "timeout"
		}
		c.m.apiErrors.WithLabelValues(class).Inc()
		return fmt.Errorf("flexprice %s %s: %s: %w", method, path, class, unwrapURLError(err))
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBytes))
	resp.Body.Close()
	c.m.observe(endpoint, start, statusClass(resp.StatusCode))
	if err != nil {
		class := "transport"
		if actx.Err() != nil && ctx.Err() == nil {
			class = "timeout"
		}
		c.m.apiErrors.WithLabelValues(class).Inc()
		return fmt.Errorf("flexprice %s %s: read answer: %s: %w", method, path, class, unwrapURLError(err))
	}
	if resp.StatusCode/100 == 2 {
		if out == nil {
			return nil
		}
		if err := json.Unmarshal(data, out); err != nil {
			c.m.apiErrors.WithLabelValues("decode").Inc()
			return fmt.Errorf("flexprice %s %s: decode answer: %w", method, path, err)
		}
		return nil
	}
	c.m.apiErrors.WithLabelValues(statusClass(resp.StatusCode)).Inc()
	ae := &APIError{Method: method, Path: path, Status: resp.StatusCode}
	var eb struct {
		Code    string          `json:"code"`
		Message string          `json:"message"`
		Details json.RawMessage `json:"details"`
	}
	if json.Unmarshal(data, &eb) == nil {
		ae.Code, ae.Message, ae.Details = eb.Code, eb.Message, eb.Details
	} else {
		ae.Message = strings.TrimSpace(string(data[:min(len(data), 300)]))
	}
	if resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable {
		ae.RetryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	}
	return ae
}

// unwrapURLError drops *url.Error's "Get URL:" prefix; the path is said once already.
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func statusClass(code int) string {
	switch {
	case code >= 500:
		return "5xx"
	case code >= 400:
		return "4xx"
	case code >= 300:
		return "3xx"
	default:
		return "2xx"
	}
}

// parseRetryAfter reads a Retry-After value: seconds or an HTTP date. 0 when absent or
// unreadable.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseFloat(v, 64); err == nil && n > 0 {
		return time.Duration(n * float64(time.Second))
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// listCustomers fetches one page of customers.
func (c *client) listCustomers(ctx context.Context, limit, offset int, attempts int) (*customerList, error) {
	var out customerList
	q := url.Values{"limit": {strconv.Itoa(limit)}, "offset": {strconv.Itoa(offset)}}
	if err := c.get(ctx, "customers_list", "/customers?"+q.Encode(), &out, attempts); err != nil {
		return nil, err
	}
	return &out, nil
}

// customerByID fetches a customer by Flexprice id.
func (c *client) customerByID(ctx context.Context, id string, attempts int) (*customer, error) {
	var out customer
	if err := c.get(ctx, "customer_get", "/customers/"+url.PathEscape(id), &out, attempts); err != nil {
		return nil, err
	}
	return &out, nil
}

func (c *client) entitlements(ctx context.Context, externalID string, attempts int) (*entitlementsResponse, error) {
	var out entitlementsResponse
	p := "/customers/external/" + url.PathEscape(externalID) + "/entitlements"
	if err := c.get(ctx, "customer_entitlements", p, &out, attempts); err != nil {
		return nil, err
	}
	return &out, nil
}

func (c *client) subscriptions(ctx context.Context, externalID string, attempts int) ([]subscription, error) {
	var out subscriptionList
	p := "/customers/external/" + url.PathEscape(externalID) + "/subscriptions"
	if err := c.get(ctx, "customer_subscriptions", p, &out, attempts); err != nil {
		return nil, err
	}
	return out.Items, nil
}

// isNotFound reports whether err is Flexprice answering 404.
func isNotFound(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Status == http.StatusNotFound
}
