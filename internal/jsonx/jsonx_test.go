package jsonx

import (
	"encoding/json"
	"testing"
)

var cases = []string{
	"", "cust_a", `quo"te\back`, "<tag>&amp;", "ctl\x00\x01\b\f\n\r\t\x1f\x7f", "bad\xffutf8\xc3", "cut\xe2\x82",
	"line\u2028sep\u2029", "ünïcødé ✓ 𝄞", "\xed\xa0\x80 surrogate",
}

// AppendString writes exactly what encoding/json writes, from a string or bytes.
func TestAppendStringMatchesEncodingJSON(t *testing.T) {
	for _, s := range cases {
		want, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		if got := AppendString(nil, s); string(got) != string(want) {
			t.Errorf("AppendString(%q) = %s, want %s", s, got, want)
		}
		if got := AppendString([]byte("x"), []byte(s)); string(got) != "x"+string(want) {
			t.Errorf("AppendString([]byte %q) = %s, want x%s", s, got, want)
		}
	}
}

func TestAppendStringAllocatesNothing(t *testing.T) {
	buf := make([]byte, 0, 256)
	b := []byte("ünïcødé <b> \xff")
	if n := testing.AllocsPerRun(100, func() { buf = AppendString(buf[:0], b) }); n != 0 {
		t.Fatalf("%v allocations", n)
	}
}
