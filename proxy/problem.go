package proxy

import (
	"strconv"
	"time"

	"github.com/gatehouse-dev/gatehouse/internal/jsonx"
	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/valyala/fasthttp"
)

// statusOf is the HTTP status of each refusal (DESIGN.md section 5).
func statusOf(r limiter.Reason) int {
	switch r {
	case limiter.CustomerMissing, limiter.APIKeyInvalid:
		return fasthttp.StatusUnauthorized
	case limiter.CustomerUnknown, limiter.FeatureNotEntitled, limiter.RouteNotAllowed:
		return fasthttp.StatusForbidden
	case limiter.UsageLimitExceeded:
		return fasthttp.StatusTooManyRequests
	case limiter.ReplicaNotReady, limiter.QuotaUnavailable:
		return fasthttp.StatusServiceUnavailable
	case limiter.CostInvalid:
		return fasthttp.StatusBadRequest
	}
	return fasthttp.StatusForbidden
}

var titles = map[limiter.Reason]string{
	limiter.CustomerMissing:    "Customer identity missing",
	limiter.CustomerUnknown:    "Customer unknown",
	limiter.FeatureNotEntitled: "Feature not entitled",
	limiter.UsageLimitExceeded: "Usage limit exceeded",
	limiter.ReplicaNotReady:    "Entitlements not available yet",
	limiter.APIKeyInvalid:      "API key invalid",
	limiter.CostInvalid:        "Request cost invalid",
	limiter.RouteNotAllowed:    "Route not allowed",
	limiter.QuotaUnavailable:   "Usage quota unavailable",
}

var details = map[limiter.Reason]string{
	limiter.CustomerMissing:    "The request does not say which customer makes it.",
	limiter.CustomerUnknown:    "No entitlements are known for this customer.",
	limiter.FeatureNotEntitled: "The customer's plan does not include a feature this route needs.",
	limiter.UsageLimitExceeded: "This request would exceed the customer's usage limit for the current window.",
	limiter.ReplicaNotReady:    "The sidecar has not yet received entitlements from the control plane.",
	limiter.APIKeyInvalid:      "The API key is malformed or not known.",
	limiter.CostInvalid:        "The request's declared cost is not a whole number within the route's bounds.",
	limiter.RouteNotAllowed:    "No route is configured for this method and path.",
	limiter.QuotaUnavailable:   "The sidecar's share of the customer's usage limit is spent and the fleet's quota cannot be reached; try again shortly.",
}

// retryAfterUnready is what a 503 replica_not_ready asks the client to wait.
const retryAfterUnready = 2

// retryAfterQuota is what a 503 quota_unavailable asks the client to wait.
const retryAfterQuota = 1

// appendProblem appends the application/problem+json body of a refusal (RFC 9457).
func appendProblem(b []byte, d *limiter.Decision, customer []byte) []byte {
	status := statusOf(d.Reason)
	b = append(b, `{"type":"urn:gatehouse:problem:`...)
	b = append(b, d.Reason.String()...)
	b = append(b, `","title":`...)
	b = jsonx.AppendString(b, titles[d.Reason])
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(status), 10)
	b = append(b, `,"detail":`...)
	b = jsonx.AppendString(b, details[d.Reason])
	b = append(b, `,"reason":"`...)
	b = append(b, d.Reason.String()...)
	b = append(b, '"')
	if len(customer) > 0 {
		b = append(b, `,"customer_id":`...)
		b = jsonx.AppendString(b, customer)
	}
	if d.Feature != "" {
		b = append(b, `,"feature":`...)
		b = jsonx.AppendString(b, d.Feature)
	}
	if d.Metered && !d.Unlimited {
		b = append(b, `,"limit":`...)
		b = strconv.AppendInt(b, d.Limit, 10)
		b = append(b, `,"used":`...)
		b = strconv.AppendInt(b, d.Used, 10)
		if d.ResetAt != limiter.NeverEnds {
			b = append(b, `,"reset_at":"`...)
			b = time.Unix(0, d.ResetAt).UTC().AppendFormat(b, time.RFC3339)
			b = append(b, '"')
		}
	}
	return append(b, '}')
}

// retryAfter is the whole seconds until resetAt, at least 1.
func retryAfter(resetAt int64, now time.Time) int64 {
	d := resetAt - now.UnixNano()
	s := (d + int64(time.Second) - 1) / int64(time.Second)
	return max(s, 1)
}

// appendRateLimit appends the IETF RateLimit and RateLimit-Policy field values
// (draft-ietf-httpapi-ratelimit-headers) for the finite metered features of r.
func appendRateLimit(policy, state []byte, r *limiter.Reservation, now time.Time) ([]byte, []byte) {
	for i := 0; i < r.Len(); i++ {
		m, ok := r.Meter(i)
		if !ok || m.Unlimited {
			continue
		}
		if len(policy) > 0 {
			policy = append(policy, ", "...)
			state = append(state, ", "...)
		}
		policy = append(policy, '"')
		policy = append(policy, m.Feature...)
		policy = append(policy, `";q=`...)
		policy = strconv.AppendInt(policy, m.Limit, 10)
		finite := m.ResetAt != limiter.NeverEnds
		if finite {
			policy = append(policy, ";w="...)
			policy = strconv.AppendInt(policy, (m.ResetAt-m.Start)/int64(time.Second), 10)
		}
		state = append(state, '"')
		state = append(state, m.Feature...)
		state = append(state, `";r=`...)
		state = strconv.AppendInt(state, max(m.Limit-m.Held, 0), 10)
		if finite {
			state = append(state, ";t="...)
			state = strconv.AppendInt(state, retryAfter(m.ResetAt, now), 10)
		}
	}
	return policy, state
}
