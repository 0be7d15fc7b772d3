package proxy

import (
	"bytes"
	"crypto/sha256"
	"unsafe"

	"github.com/gatehouse-dev/gatehouse/limiter"

	"github.com/valyala/fasthttp"
)

// hopByHop are the headers that describe one connection, not the message (RFC 9110
// section 7.6.1). A proxy must not forward them.
var hopByHop = [][]byte{
	[]byte("Connection"), []byte("Proxy-Connection"), []byte("Keep-Alive"),
	[]byte("Proxy-Authenticate"), []byte("Proxy-Authorization"), []byte("Te"),
	[]byte("Trailer"), []byte("Transfer-Encoding"), []byte("Upgrade"),
}

// connectionTokens calls fn for each header name listed in a Connection header value.
func connectionTokens(v []byte, fn func(name []byte)) {
	for len(v) > 0 {
		var tok []byte
		if i := bytes.IndexByte(v, ','); i >= 0 {
			tok, v = v[:i], v[i+1:]
		} else {
			tok, v = v, nil
		}
		tok = bytes.TrimSpace(tok)
		if len(tok) > 0 {
			fn(tok)
		}
	}
}

// maxStrip bounds the headers one pass can mark for removal; more take the slow path.
const maxStrip = 16

// stripRequest removes from a request everything a client may not pass to the upstream:
// hop-by-hop headers, every header that Connection names, and the headers gatehouse sets.
// One pass over the headers finds what is there (usually nothing), so a clean request
// costs a scan, not a delete per name. Header names are canonical (fasthttp normalises
// them), so they compare byte for byte.
func stripRequest(h *fasthttp.RequestHeader, t *table) {
	var found [maxStrip][]byte
	n, slow := 0, false
	for k := range h.All() {
		name := matchName(k, t.strip)
		if name == nil {
			name = matchName(k, hopByHop)
		}
		if name == nil {
			continue
		}
		if n == len(found) || bytes.Equal(name, connectionKey) {
			slow = true
			break
		}
		found[n] = name
		n++
	}
	if slow {
		for _, v := range h.PeekAll("Connection") {
			connectionTokens(v, func(name []byte) { h.DelBytes(name) })
		}
		for _, name := range hopByHop {
			h.DelBytes(name)
		}
		for _, name := range t.strip {
			h.DelBytes(name)
		}
		return
	}
	for _, name := range found[:n] {
		h.DelBytes(name)
	}
	// fasthttp keeps Transfer-Encoding apart from the other headers.
	h.DelBytes(transferEncodingKey)
}

// stripResponse removes hop-by-hop headers from the upstream's response.
func stripResponse(h *fasthttp.ResponseHeader) {
	present := false
	for k := range h.All() {
		if matchName(k, hopByHop) != nil {
			present = true
			break
		}
	}
	if !present {
		return
	}
	for _, v := range h.PeekAll("Connection") {
		connectionTokens(v, func(name []byte) { h.DelBytes(name) })
	}
	for _, name := range hopByHop {
		h.DelBytes(name)
	}
}

var (
	connectionKey       = []byte("Connection")
	transferEncodingKey = []byte("Transfer-Encoding")
)

// matchName returns the one of names equal to k, or nil.
func matchName(k []byte, names [][]byte) []byte {
	for _, n := range names {
		if len(n) == len(k) && bytes.Equal(n, k) {
			return n
		}
	}
	return nil
}

// headerSetter is what a request header and a response header share: the check
// endpoints set on their response what the proxy sets on the forwarded request.
type headerSetter interface {
	SetCanonical(key, value []byte)
}

// setIdentity sets the customer id and the route's static values as headers.
func setIdentity(h headerSetter, t *table, r *route, s *limiter.Snapshot) {
	h.SetCanonical(t.customerKey, s2b(s.CustomerID))
	for i := range r.headers {
		sh := &r.headers[i]
		if f := s.FeatureByID(sh.id, sh.feature); f != nil && f.Enabled && f.HeaderValue != "" {
			h.SetCanonical(sh.key, s2b(f.HeaderValue))
		}
	}
}

// s2b views an immutable string as bytes, for fasthttp calls that copy their argument.
func s2b(s string) []byte { return unsafe.Slice(unsafe.StringData(s), len(s)) }

// identity is how a request named its customer.
type identity uint8

const (
	idNone identity = iota
	idHeader
	idAPIKey
	idBadKey // an API key header that does not parse
)

// readIdentity finds the customer's identity on a request: the API key when API keys
// are configured, else the identity header. For idHeader, value is the customer id; for
// idAPIKey, sum holds the key's SHA-256. value aliases the request and is valid only until
// the headers change.
func readIdentity(h *fasthttp.RequestHeader, t *table, sum *[sha256.Size]byte) (identity, []byte) {
	if t.apiKeyHdr != nil {
		v := h.PeekBytes(t.apiKeyHdr)
		if len(v) == 0 {
			return idNone, nil
		}
		key, ok := parseAPIKey(v, t.apiKeyScheme)
		if !ok {
			return idBadKey, nil
		}
		*sum = sha256.Sum256(key)
		return idAPIKey, nil
	}
	if t.identityHdr == nil {
		return idNone, nil
	}
	v := bytes.TrimSpace(h.PeekBytes(t.identityHdr))
	if len(v) == 0 {
		return idNone, nil
	}
	return idHeader, v
}

// parseAPIKey takes the key out of a header value such as "Bearer k": the scheme is
// matched without regard to case, and the key must be non-empty visible ASCII.
func parseAPIKey(v, scheme []byte) ([]byte, bool) {
	v = bytes.TrimSpace(v)
	if len(scheme) > 0 {
		if len(v) <= len(scheme) || !bytes.EqualFold(v[:len(scheme)], scheme) || (v[len(scheme)] != ' ' && v[len(scheme)] != '\t') {
			return nil, false
		}
		v = bytes.TrimSpace(v[len(scheme):])
	}
	if len(v) == 0 || len(v) > 4096 {
		return nil, false
	}
	for _, c := range v {
		if c <= ' ' || c >= 0x7f {
			return nil, false
		}
	}
	return v, true
}

// parseCost reads a non-negative decimal cost of at most max. It never overflows: a
// value is refused as soon as it passes max.
func parseCost(v []byte, max int64) (int64, bool) {
	v = bytes.TrimSpace(v)
	if len(v) == 0 || len(v) > 19 || max < 0 {
		return 0, false
	}
	var n uint64
	for _, c := range v {
		if c < '0' || c > '9' || n > uint64(max)/10 {
			return 0, false
		}
		n = n*10 + uint64(c-'0')
		if n > uint64(max) {
			return 0, false
		}
	}
	return int64(n), true
}
