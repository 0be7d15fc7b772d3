package proxy

import (
	"bytes"
	"crypto/sha256"
	"math"
	"strconv"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

func TestParseCost(t *testing.T) {
	cases := []struct {
		in   string
		max  int64
		want int64
		ok   bool
	}{
		{"0", 10, 0, true},
		{"7", 10, 7, true},
		{"10", 10, 10, true},
		{" 10\t", 10, 10, true},
		{"007", 10, 7, true},
		{"11", 10, 0, false},
		{"", 10, 0, false},
		{"  ", 10, 0, false},
		{"-1", 10, 0, false},
		{"+1", 10, 0, false},
		{"1.0", 10, 0, false},
		{"1e1", 10, 0, false},
		{"0x1", 10, 0, false},
		{"1 2", 10, 0, false},
		{"١", 10, 0, false}, // Arabic-Indic digit one
		{"1000000", 1_000_000, 1_000_000, true},
		{"9223372036854775807", math.MaxInt64, math.MaxInt64, true},
		{"9223372036854775808", math.MaxInt64, 0, false},
		{"9999999999999999999", math.MaxInt64, 0, false}, // overflows int64 on the last digit
		{"9999999999999999999", 999_999_999_999_999_999, 0, false},
		{"99999999999999999999", math.MaxInt64, 0, false},
	}
	for _, tc := range cases {
		got, ok := parseCost([]byte(tc.in), tc.max)
		if got != tc.want || ok != tc.ok {
			t.Errorf("parseCost(%q, %d) = %d, %v; want %d, %v", tc.in, tc.max, got, ok, tc.want, tc.ok)
		}
	}
}

func TestParseAPIKey(t *testing.T) {
	cases := []struct {
		in, scheme, want string
		ok               bool
	}{
		{"Bearer k1", "Bearer", "k1", true},
		{"bEARER k1", "Bearer", "k1", true},
		{"Bearer\tk1", "Bearer", "k1", true},
		{"  Bearer   k1  ", "Bearer", "k1", true},
		{"Bearer", "Bearer", "", false},
		{"Bearer ", "Bearer", "", false},
		{"Bearerk1", "Bearer", "", false},
		{"Basic k1", "Bearer", "", false},
		{"Bearer k 1", "Bearer", "", false},
		{"Bearer k\x00", "Bearer", "", false},
		{"Bearer kü", "Bearer", "", false},
		{"Bearer " + strings.Repeat("k", 4096), "Bearer", strings.Repeat("k", 4096), true},
		{"Bearer " + strings.Repeat("k", 4097), "Bearer", "", false},
		{"k1", "", "k1", true},
		{" k1 ", "", "k1", true},
		{"Bearer k1", "", "", false},
		{"", "", "", false},
	}
	for _, tc := range cases {
		got, ok := parseAPIKey([]byte(tc.in), []byte(tc.scheme))
		if string(got) != tc.want || ok != tc.ok {
			t.Errorf("parseAPIKey(%q, %q) = %q, %v; want %q, %v", tc.in, tc.scheme, got, ok, tc.want, tc.ok)
		}
	}
}

// FuzzPattern: route patterns never panic, "/*" never matches a path with an extra
// segment, "/**" matches its prefix and everything below it, exact matches only itself.
func FuzzPattern(f *testing.F) {
	for _, s := range [][2]string{
		{"/v1/chat/*", "/v1/chat/x"}, {"/v1/chat/*", "/v1/chat/x/y"}, {"/v1/files/**", "/v1/files"},
		{"/v1/files/**", "/v1/filesx"}, {"/", "/"}, {"/*", "/"}, {"/**", ""}, {"//*", "//a"},
		{"/a/*/b", "/a/x/b"}, {"", ""}, {"/a?b", "/a"}, {"/v1/exact", "/v1/exact/"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pat, path string) {
		p, err := parsePattern(pat)
		if err != nil {
			return
		}
		if !strings.HasPrefix(pat, "/") {
			t.Fatalf("parsePattern(%q) accepted a path without a leading /", pat)
		}
		got := p.match([]byte(path))
		prefix := string(p.prefix)
		switch p.kind {
		case exact:
			if got != (path == pat) {
				t.Fatalf("exact %q matches %q: %v", pat, path, got)
			}
		case oneSegment:
			seg, rest, _ := strings.Cut(strings.Trim(path, "/"), "/")
			if seg == "" {
				seg = "x"
			}
			if !p.match([]byte(prefix + "/" + seg)) {
				t.Fatalf("%q does not match %q", pat, prefix+"/"+seg)
			}
			for _, deeper := range []string{prefix + "/" + seg + "/", prefix + "/" + seg + "/" + rest, prefix + "/" + seg + "/" + path} {
				if p.match([]byte(deeper)) {
					t.Fatalf("%q matches %q, a path with an extra segment", pat, deeper)
				}
			}
			if got && strings.Contains(path[len(prefix)+1:], "/") {
				t.Fatalf("%q matches %q", pat, path)
			}
			if p.match([]byte(prefix)) || p.match([]byte(prefix+"/")) {
				t.Fatalf("%q matches its bare prefix", pat)
			}
		case anyDepth:
			if prefix != "" && !p.match([]byte(prefix)) {
				t.Fatalf("%q does not match its prefix %q", pat, prefix)
			}
			if !p.match([]byte(prefix + "/" + path)) {
				t.Fatalf("%q does not match %q", pat, prefix+"/"+path)
			}
			if got && !(path == prefix || strings.HasPrefix(path, prefix+"/")) {
				t.Fatalf("%q matches %q, outside its prefix", pat, path)
			}
			if prefix != "" && p.match([]byte(prefix+"x")) {
				t.Fatalf("%q matches %q", pat, prefix+"x")
			}
		}
	})
}

// FuzzIdentity: identity and cost parsers never panic; parseCost accepts exactly the
// non-negative decimals (at most 19 digits, surrounding white space allowed) that are at
// most max, and parseAPIKey returns a non-empty run of visible ASCII.
func FuzzIdentity(f *testing.F) {
	f.Add([]byte("Bearer key-acme"), "Bearer", int64(100))
	f.Add([]byte("bearer\t k"), "Bearer", int64(1))
	f.Add([]byte(" 42 "), "", int64(42))
	f.Add([]byte("43"), "", int64(42))
	f.Add([]byte("-1"), "Token", int64(1_000_000))
	f.Add([]byte("\x00Bearer \xffk"), "Bearer", int64(5))
	f.Add([]byte("00000000000000000001"), "", int64(10))
	f.Add([]byte("922337203685477580"), "", int64(math.MaxInt64))
	f.Fuzz(func(t *testing.T, v []byte, scheme string, max int64) {
		// parseAPIKey
		key, ok := parseAPIKey(v, []byte(scheme))
		if ok {
			if len(key) == 0 || len(key) > 4096 || !bytes.Contains(v, key) {
				t.Fatalf("parseAPIKey(%q, %q) = %q", v, scheme, key)
			}
			for _, c := range key {
				if c <= ' ' || c >= 0x7f {
					t.Fatalf("parseAPIKey(%q, %q) = %q: not visible ASCII", v, scheme, key)
				}
			}
		}

		// readIdentity, with API keys and with the identity header.
		var h fasthttp.RequestHeader
		h.SetBytesV("Authorization", v)
		h.SetBytesV("X-Customer-Id", v)
		keyed := &table{apiKeyHdr: []byte("Authorization"), apiKeyScheme: []byte(scheme), identityHdr: nil}
		var sum [sha256.Size]byte
		kind, id := readIdentity(&h, keyed, &sum)
		stored := h.Peek("Authorization")
		switch want, wantOK := parseAPIKey(stored, []byte(scheme)); {
		case len(stored) == 0:
			if kind != idNone {
				t.Fatalf("no key: identity %d", kind)
			}
		case !wantOK:
			if kind != idBadKey {
				t.Fatalf("bad key %q: identity %d", stored, kind)
			}
		default:
			if kind != idAPIKey || id != nil || sum != sha256.Sum256(want) {
				t.Fatalf("key %q: identity %d, %q, sum %x", stored, kind, id, sum)
			}
		}
		plain := &table{identityHdr: []byte("X-Customer-Id")}
		kind, id = readIdentity(&h, plain, &sum)
		trimmed := bytes.TrimSpace(h.Peek("X-Customer-Id"))
		if len(trimmed) == 0 && kind != idNone || len(trimmed) > 0 && (kind != idHeader || !bytes.Equal(id, trimmed)) {
			t.Fatalf("identity header %q: %d, %q", h.Peek("X-Customer-Id"), kind, id)
		}

		// parseCost, against strconv.
		if max <= 0 {
			return // config validation requires max_cost > 0
		}
		got, ok := parseCost(v, max)
		d := bytes.TrimSpace(v)
		wantOK := len(d) > 0 && len(d) <= 19
		for _, c := range d {
			wantOK = wantOK && '0' <= c && c <= '9'
		}
		var want uint64
		if wantOK {
			var err error
			want, err = strconv.ParseUint(string(d), 10, 64)
			wantOK = err == nil && want <= uint64(max)
		}
		if ok != wantOK || ok && uint64(got) != want || !ok && got != 0 {
			t.Fatalf("parseCost(%q, %d) = %d, %v; want %d, %v", v, max, got, ok, want, wantOK)
		}
	})
}
