package limiter

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"
)

// MaxSnapshotBytes bounds one encoded snapshot. NATS refuses larger messages by default.
const MaxSnapshotBytes = 1 << 20

// SnapshotDoc is the wire form of a snapshot: the JSON value of one key in KV bucket
// gatehouse_entitlements (DESIGN.md section 3). Field names and enum spellings follow
// Flexprice's API. Unknown fields are ignored, so that a newer control plane can add
// fields without old sidecars rejecting every snapshot.
type SnapshotDoc struct {
	CustomerID    string                `json:"customer_id"`
	UpdatedAt     *time.Time            `json:"updated_at,omitempty"`
	Billing       *BillingDoc           `json:"billing,omitempty"`
	Features      map[string]FeatureDoc `json:"features"`
	APIKeysSHA256 []string              `json:"api_keys_sha256,omitempty"`
}

// BillingDoc is the billing period that anchors usage windows.
type BillingDoc struct {
	PeriodStart time.Time  `json:"period_start"`
	PeriodEnd   *time.Time `json:"period_end,omitempty"`
	Interval    string     `json:"interval,omitempty"` // default MONTHLY
	Timezone    string     `json:"timezone,omitempty"` // IANA name; default UTC
}

// FeatureDoc is one entitlement. UsageLimit nil (null or absent) means unlimited.
type FeatureDoc struct {
	Type             string          `json:"type"`
	IsEnabled        *bool           `json:"is_enabled,omitempty"`
	UsageLimit       *int64          `json:"usage_limit,omitempty"`
	IsSoftLimit      bool            `json:"is_soft_limit,omitempty"`
	UsageResetPeriod string          `json:"usage_reset_period,omitempty"`
	StaticValues     []string        `json:"static_values,omitempty"`
	ConfigValue      json.RawMessage `json:"config_value,omitempty"`
}

// Billing instants must fall in these years: far enough from the ends of what RFC 3339
// and Go's time zone data represent (local mean time before 1900 has second offsets).
const (
	minYear = 1900
	maxYear = 2500
)

func inYears(t time.Time) bool { return t.Year() >= minYear && t.Year() <= maxYear }

// defaultAnchor anchors the windows of a snapshot that has no billing section: calendar
// months (and days, weeks from a Thursday) in UTC.
var defaultAnchor = time.Date(1970, 1, 1, 0, 0, 0, 0, time.UTC)

// ParseSnapshot decodes and validates one snapshot. A snapshot with any problem is
// rejected whole; the error lists every problem, each with its field path.
func ParseSnapshot(data []byte) (*Snapshot, error) {
	if len(data) > MaxSnapshotBytes {
		return nil, fmt.Errorf("snapshot is %d bytes, more than the %d allowed", len(data), MaxSnapshotBytes)
	}
	var doc SnapshotDoc
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("decode snapshot: %w", err)
	}
	if rest := bytes.TrimSpace(data[dec.InputOffset():]); len(rest) > 0 {
		return nil, errors.New("decode snapshot: trailing data after the JSON object")
	}
	return doc.Snapshot()
}

// Snapshot validates the document and builds the immutable Snapshot the limiter uses.
func (d *SnapshotDoc) Snapshot() (*Snapshot, error) {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	s, block, strs := allocSnapshot(len(d.Features), d.packedBytes())
	s.CustomerID, s.Features = d.CustomerID, make(map[string]*Feature, len(d.Features))
	if err := CheckCustomerID(d.CustomerID); err != nil {
		bad("customer_id", "%v", err)
	}
	if d.UpdatedAt != nil {
		s.UpdatedAt = *d.UpdatedAt
		if !inYears(s.UpdatedAt.UTC()) {
			bad("updated_at", "must be in the years %d to %d", minYear, maxYear)
		}
	}
	s.Billing = Billing{PeriodStart: defaultAnchor, Interval: Monthly, Location: time.UTC}
	if b := d.Billing; b != nil {
		loc, err := LoadLocation(b.Timezone)
		if err != nil {
			bad("billing.timezone", "%v", err)
			loc = time.UTC
		}
		s.Billing.Location = loc
		if b.PeriodStart.IsZero() {
			bad("billing.period_start", "required")
		}
		s.Billing.PeriodStart = b.PeriodStart.In(loc)
		if !b.PeriodStart.IsZero() && !inYears(s.Billing.PeriodStart) {
			bad("billing.period_start", "must be in the years %d to %d", minYear, maxYear)
		}
		if b.PeriodEnd != nil {
			if !b.PeriodEnd.After(b.PeriodStart) {
				bad("billing.period_end", "must be after period_start")
			}
			if !inYears(b.PeriodEnd.In(loc)) {
				bad("billing.period_end", "must be in the years %d to %d", minYear, maxYear)
			}
			s.Billing.PeriodEnd = b.PeriodEnd.In(loc)
		}
		if b.Interval != "" {
			p, ok := ParseResetPeriod(b.Interval)
			if !ok || p == BillingPeriod || p == Never {
				bad("billing.interval", "must be one of DAILY, WEEKLY, MONTHLY, QUARTERLY, HALF_YEARLY, ANNUAL (got %q)", b.Interval)
			} else {
				s.Billing.Interval = p
			}
		}
	}
	for key, fd := range d.Features {
		path := "features." + key
		if err := CheckFeatureKey(key); err != nil {
			bad(path, "%v", err)
			continue
		}
		f := &block[len(s.Features)]
		for _, e := range fd.feature(key, f) {
			errs = append(errs, fmt.Errorf("%s.%w", path, e))
		}
		s.Features[key] = f
	}
	for i, h := range d.APIKeysSHA256 {
		var sum [sha256.Size]byte
		if len(h) != 2*sha256.Size {
			bad(fmt.Sprintf("api_keys_sha256[%d]", i), "must be 64 hex digits")
			continue
		}
		if _, err := hex.Decode(sum[:], []byte(h)); err != nil {
			bad(fmt.Sprintf("api_keys_sha256[%d]", i), "must be 64 hex digits")
			continue
		}
		s.APIKeys = append(s.APIKeys, sum)
	}
	if len(errs) > 0 {
		return nil, &SnapshotError{CustomerID: d.CustomerID, Problems: errs}
	}
	s.pack(strs)
	return s, nil
}

// packedBytes is at least what pack will need for the snapshot of d.
func (d *SnapshotDoc) packedBytes() int {
	n := len(d.CustomerID)
	for key, fd := range d.Features {
		n += len(key) + len(fd.ConfigValue) // a compacted config value is no longer
		for _, v := range fd.StaticValues {
			n += len(v) + len(", ")
		}
	}
	return n
}

// feature validates fd and fills f, which must be zero, with the feature it describes.
func (fd *FeatureDoc) feature(key string, f *Feature) []error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	f.Key = key
	switch fd.Type {
	case "boolean":
		f.Type = Boolean
	case "metered":
		f.Type = Metered
	case "static":
		f.Type = Static
	case "config":
		f.Type = Config
	default:
		bad("type", "must be one of boolean, metered, static, config (got %q)", fd.Type)
	}
	// Flexprice keeps is_enabled only on boolean features; the others default to true.
	f.Enabled = f.Type != Boolean
	if fd.IsEnabled != nil {
		f.Enabled = *fd.IsEnabled
	}
	if f.Type != Metered && f.Type != 0 {
		if fd.UsageLimit != nil {
			bad("usage_limit", "only metered features have a usage limit")
		}
		if fd.IsSoftLimit {
			bad("is_soft_limit", "only metered features have a usage limit")
		}
	}
	if fd.UsageLimit == nil {
		f.Unlimited = true
	} else if *fd.UsageLimit < 0 {
		bad("usage_limit", "must be >= 0 or null for unlimited (got %d)", *fd.UsageLimit)
	} else {
		f.Limit = *fd.UsageLimit
	}
	f.Soft = fd.IsSoftLimit
	p, ok := ParseResetPeriod(fd.UsageResetPeriod)
	if !ok {
		bad("usage_reset_period", "must be one of DAILY, WEEKLY, MONTHLY, QUARTERLY, HALF_YEARLY, ANNUAL, NEVER, BILLING_PERIOD (got %q)", fd.UsageResetPeriod)
	}
	f.Reset = p
	for i, v := range fd.StaticValues {
		if err := checkHeaderValue(v); err != nil {
			bad(fmt.Sprintf("static_values[%d]", i), "%v", err)
		}
	}
	f.StaticValues = fd.StaticValues
	switch f.Type {
	case Static:
		f.HeaderValue = strings.Join(fd.StaticValues, ", ")
	case Config:
		if len(fd.ConfigValue) == 0 {
			bad("config_value", "required for a config feature")
			break
		}
		var buf bytes.Buffer
		if err := json.Compact(&buf, fd.ConfigValue); err != nil {
			bad("config_value", "not valid JSON: %v", err)
			break
		}
		f.ConfigValue = buf.Bytes()
		f.HeaderValue = buf.String()
		if err := checkHeaderValue(f.HeaderValue); err != nil {
			bad("config_value", "%v", err)
		}
	}
	return errs
}

// SnapshotError is a snapshot rejected whole, with every problem found in it.
type SnapshotError struct {
	CustomerID string
	Problems   []error
}

func (e *SnapshotError) Error() string {
	var b strings.Builder
	b.WriteString("invalid snapshot")
	if e.CustomerID != "" {
		fmt.Fprintf(&b, " for %q", e.CustomerID)
	}
	for i, p := range e.Problems {
		if i == 0 {
			b.WriteString(": ")
		} else {
			b.WriteString("; ")
		}
		b.WriteString(p.Error())
	}
	return b.String()
}

// Unwrap returns the problems, so errors.Is and errors.As look through them.
func (e *SnapshotError) Unwrap() []error { return e.Problems }

// MaxIDLen bounds customer ids and feature keys.
const MaxIDLen = 256

// CheckCustomerID reports whether id can name a customer: 1 to 256 visible ASCII
// characters, since it travels in HTTP headers and NATS subjects are derived from it.
func CheckCustomerID(id string) error {
	if id == "" {
		return errors.New("required")
	}
	if len(id) > MaxIDLen {
		return fmt.Errorf("longer than %d bytes", MaxIDLen)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c <= ' ' || c >= 0x7f {
			return fmt.Errorf("byte %d is %q: only visible ASCII is allowed", i, c)
		}
	}
	return nil
}

// CheckFeatureKey reports whether key can be a feature's lookup key: 1 to 256 of
// A-Z a-z 0-9 _ - . :
func CheckFeatureKey(key string) error {
	if key == "" {
		return errors.New("feature key is empty")
	}
	if len(key) > MaxIDLen {
		return fmt.Errorf("feature key longer than %d bytes", MaxIDLen)
	}
	for i := 0; i < len(key); i++ {
		c := key[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-' || c == '.' || c == ':') {
			return fmt.Errorf("feature key %q: byte %d is %q: only A-Z a-z 0-9 _ - . : are allowed", key, i, c)
		}
	}
	return nil
}

// checkHeaderValue refuses what would let a value break out of an HTTP header.
func checkHeaderValue(v string) error {
	if len(v) > 4096 {
		return errors.New("longer than 4096 bytes")
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < ' ' && c != '\t' || c == 0x7f {
			return fmt.Errorf("byte %d is a control character", i)
		}
	}
	return nil
}

// locations caches time.LoadLocation, which reads the zone database on every call.
var locations sync.Map // string -> *time.Location

// LoadLocation is time.LoadLocation with a cache. The empty name is UTC.
func LoadLocation(name string) (*time.Location, error) {
	if name == "" || name == "UTC" {
		return time.UTC, nil
	}
	if l, ok := locations.Load(name); ok {
		return l.(*time.Location), nil
	}
	l, err := time.LoadLocation(name)
	if err != nil {
		return nil, fmt.Errorf("unknown time zone %q", name)
	}
	locations.Store(name, l)
	return l, nil
}

// Doc returns the wire form of s, as the admin API and the push command show it.
func (s *Snapshot) Doc() SnapshotDoc {
	d := SnapshotDoc{CustomerID: s.CustomerID, Features: make(map[string]FeatureDoc, len(s.Features))}
	if !s.UpdatedAt.IsZero() {
		t := s.UpdatedAt.UTC()
		d.UpdatedAt = &t
	}
	// Instants are written in UTC: the zone travels in timezone, and RFC 3339 offsets
	// cannot carry the second-level offsets of old local mean times.
	b := BillingDoc{PeriodStart: s.Billing.PeriodStart.UTC(), Interval: s.Billing.Interval.String(), Timezone: s.Billing.Location.String()}
	if !s.Billing.PeriodEnd.IsZero() {
		t := s.Billing.PeriodEnd.UTC()
		b.PeriodEnd = &t
	}
	d.Billing = &b
	for k, f := range s.Features {
		fd := FeatureDoc{Type: f.Type.String(), IsSoftLimit: f.Soft, StaticValues: f.StaticValues, ConfigValue: f.ConfigValue}
		enabled := f.Enabled
		fd.IsEnabled = &enabled
		if f.Type == Metered {
			fd.UsageResetPeriod = f.Reset.String()
			if !f.Unlimited {
				l := f.Limit
				fd.UsageLimit = &l
			}
		}
		d.Features[k] = fd
	}
	for _, k := range s.APIKeys {
		d.APIKeysSHA256 = append(d.APIKeysSHA256, hex.EncodeToString(k[:]))
	}
	return d
}
