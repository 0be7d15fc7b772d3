package quota

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/gatehouse-dev/gatehouse/limiter"
	"github.com/gatehouse-dev/gatehouse/sync/store"
)

// KV key encoding. A KV key may hold only [-/_=.a-zA-Z0-9] and is a NATS subject, so
// '.' separates tokens. A customer id is visible ASCII (limiter.CheckCustomerID) and a
// feature key may hold '.' and ':', so each is one token:
//
//	"p" + s                  when s is 1+ bytes of [-/_=a-zA-Z0-9]
//	"b" + base64url(s)       otherwise, without padding
//
// and the key of a counter is <customer token> "." <feature token> "." <window start>,
// the window start in unix nanoseconds, in decimal. Each counter has exactly one key;
// a key in another form names no counter.
const (
	plainToken  = 'p'
	base64Token = 'b'
)

var b64 = base64.RawURLEncoding

// Key returns the KV key of a counter.
func Key(k limiter.CounterKey) string {
	var b strings.Builder
	b.Grow(len(k.Customer) + len(k.Feature) + 32)
	appendToken(&b, k.Customer)
	b.WriteByte('.')
	appendToken(&b, k.Feature)
	b.WriteByte('.')
	b.WriteString(strconv.FormatInt(k.WindowStart, 10))
	return b.String()
}

func appendToken(b *strings.Builder, s string) {
	if plainSafe(s) {
		b.WriteByte(plainToken)
		b.WriteString(s)
		return
	}
	b.WriteByte(base64Token)
	b.WriteString(b64.EncodeToString([]byte(s)))
}

// ParseKey returns the counter that a KV key names, or an error when the key is not
// the canonical key of a valid counter.
func ParseKey(key string) (limiter.CounterKey, error) {
	parts := strings.Split(key, ".")
	if len(parts) != 3 {
		return limiter.CounterKey{}, fmt.Errorf("quota key %q: want 3 tokens separated by '.'", key)
	}
	customer, err := token(parts[0])
	if err == nil {
		err = limiter.CheckCustomerID(customer)
	}
	if err != nil {
		return limiter.CounterKey{}, fmt.Errorf("quota key %q: customer: %w", key, err)
	}
	feature, err := token(parts[1])
	if err == nil {
		err = limiter.CheckFeatureKey(feature)
	}
	if err != nil {
		return limiter.CounterKey{}, fmt.Errorf("quota key %q: feature: %w", key, err)
	}
	start, err := strconv.ParseInt(parts[2], 10, 64)
	k := limiter.CounterKey{Customer: customer, Feature: feature, WindowStart: start}
	if err != nil || Key(k) != key {
		return limiter.CounterKey{}, fmt.Errorf("quota key %q: not canonical", key)
	}
	return k, nil
}

func token(t string) (string, error) {
	if len(t) < 2 {
		return "", errors.New("empty token")
	}
	switch t[0] {
	case plainToken:
		if !plainSafe(t[1:]) {
			return "", fmt.Errorf("token %q: not plain", t)
		}
		return t[1:], nil
	case base64Token:
		b, err := b64.DecodeString(t[1:])
		if err != nil {
			return "", fmt.Errorf("token %q: %w", t, err)
		}
		if plainSafe(string(b)) {
			return "", fmt.Errorf("token %q: not canonical", t)
		}
		return string(b), nil
	}
	return "", fmt.Errorf("token %q: starts with neither %q nor %q", t, plainToken, base64Token)
}

func plainSafe(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '/' || c == '_' || c == '=') {
			return false
		}
	}
	return true
}

// Badger layout under q/ (store.PrefixQuota): one entry per lease this sidecar holds,
//
//	q/<KV key>  ->  window end:i64 | grant:i64 | limit:i64 | limit revision:u64
//
// big-endian, where grant is what this sidecar may use in the window as the KV value
// records it, or less: a grant is written here after the KV accepted it, and a return
// before it is offered to the KV, so that a restart without NATS never spends more
// than the fleet granted.

func dbKey(kvKey string) []byte { return append([]byte(store.PrefixQuota), kvKey...) }

type saved struct {
	end, grant, limit int64
	rev               uint64
	spent             int64 // see lease.spent
}

func (s saved) encode() []byte {
	b := make([]byte, 40)
	binary.BigEndian.PutUint64(b, uint64(s.end))
	binary.BigEndian.PutUint64(b[8:], uint64(s.grant))
	binary.BigEndian.PutUint64(b[16:], uint64(s.limit))
	binary.BigEndian.PutUint64(b[24:], s.rev)
	binary.BigEndian.PutUint64(b[32:], uint64(s.spent))
	return b
}

func decodeSaved(b []byte) (saved, error) {
	if len(b) != 32 && len(b) != 40 {
		return saved{}, fmt.Errorf("saved lease: %d bytes, want 40", len(b))
	}
	s := saved{
		end: int64(binary.BigEndian.Uint64(b)), grant: int64(binary.BigEndian.Uint64(b[8:])),
		limit: int64(binary.BigEndian.Uint64(b[16:])), rev: binary.BigEndian.Uint64(b[24:]),
	}
	if len(b) == 40 {
		s.spent = int64(binary.BigEndian.Uint64(b[32:]))
	}
	if s.spent < 0 || s.grant < 0 {
		return saved{}, fmt.Errorf("saved lease: negative grant or spent")
	}
	return s, nil
}
