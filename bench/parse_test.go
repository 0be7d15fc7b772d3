package main

import (
	"slices"
	"testing"
)

func TestParseVersion(t *testing.T) {
	tests := []struct {
		name, out, version string
		caps               []string
		ok                 bool
	}{
		{"with capabilities", "gatehouse dev\ncapabilities: nats usage-outbox fleet-quota\n", "gatehouse dev", []string{"nats", "usage-outbox", "fleet-quota"}, true},
		{"before the line existed", "gatehouse v0.3.1\n", "gatehouse v0.3.1", nil, false},
		{"empty line", "gatehouse dev\ncapabilities:\n", "gatehouse dev", nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, caps, ok := parseVersion(tt.out)
			if v != tt.version || !slices.Equal(caps, tt.caps) || ok != tt.ok {
				t.Errorf("parseVersion = %q, %q, %v; want %q, %q, %v", v, caps, ok, tt.version, tt.caps, tt.ok)
			}
		})
	}
}

func TestLabelValue(t *testing.T) {
	tests := []struct{ labels, key, want string }{
		{`{feature="",reason="quota_unavailable",result="deny",route="hello"}`, "result", "deny"},
		{`{feature="",reason="quota_unavailable",result="deny",route="hello"}`, "reason", "quota_unavailable"},
		{`{subresult="x",result="allow"}`, "result", "allow"},
		{`{route="hello"}`, "result", ""},
		{``, "result", ""},
	}
	for _, tt := range tests {
		if got := labelValue(tt.labels, tt.key); got != tt.want {
			t.Errorf("labelValue(%s, %s) = %q, want %q", tt.labels, tt.key, got, tt.want)
		}
	}
}
