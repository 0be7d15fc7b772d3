package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Per-item defaults: values that Default cannot hold because the items do not exist
// until the file names them.
const (
	DefaultOnUnavailable = "deny"          // Route.OnUnavailable
	DefaultMaxCost       = 1_000_000       // RouteFeature.MaxCost
	DefaultAPIKeyHeader  = "Authorization" // APIKey.Header
)

// MaxFileBytes bounds a configuration file.
const MaxFileBytes = 16 << 20

// Load reads and parses the configuration file at path (see Parse). A *Error or
// *SyntaxError it returns has File set to path.
func Load(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	defer f.Close()
	c, err := Parse(f)
	var ce *Error
	var se *SyntaxError
	switch {
	case errors.As(err, &ce):
		ce.File = path
	case errors.As(err, &se):
		se.File = path
	case err != nil:
		return nil, fmt.Errorf("load config %s: %w", path, err)
	}
	return c, err
}

// Parse reads one YAML document and returns the configuration it describes: Default,
// with the document strictly decoded over it, per-item defaults applied, and validated.
//
// A file that is not YAML gives a *SyntaxError. Otherwise every problem is reported at
// once in an *Error: unknown keys, duplicate keys, values of the wrong type, and all
// that Validate finds, each with its field path and line. An empty file is the default
// configuration, which lacks upstream.url.
//
// A key given no value ("listen:") keeps its default. Mappings replace defaults field by
// field; lists and maps replace them whole. Anchors, aliases and merge keys (<<) work.
func Parse(r io.Reader) (*Config, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxFileBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	if len(data) > MaxFileBytes {
		return nil, fmt.Errorf("read config: larger than %d bytes", MaxFileBytes)
	}

	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil && !errors.Is(err, io.EOF) {
		return nil, syntaxError(data, err)
	}
	d := &decoder{lines: map[string]int{}, explicit: map[string]bool{}}
	for {
		// Further documents are refused, except empty ones (a trailing "---").
		var extra yaml.Node
		err := dec.Decode(&extra)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, syntaxError(data, err)
		}
		if len(extra.Content) > 0 && !isNull(extra.Content[0]) {
			d.problem(RootPath, extra.Content[0].Line, "a second YAML document: the file must hold one")
			break
		}
	}

	size, cycle := expandedSize(&doc, map[*yaml.Node]int{}, maxNodes)
	switch {
	case cycle != nil:
		d.problem(RootPath, cycle.Line, "alias *%s refers to a value that contains it", cycle.Value)
		return nil, &Error{Problems: d.problems}
	case size > maxNodes:
		d.problem(RootPath, 0, "more than %d values once aliases are expanded", maxNodes)
		return nil, &Error{Problems: d.problems}
	}

	c := Default()
	if len(doc.Content) > 0 {
		root := doc.Content[0]
		if r := resolve(root); r.Kind != yaml.MappingNode && !isNull(r) {
			d.problem(RootPath, root.Line, "must be a mapping of settings (got %s)", describe(r))
			return nil, &Error{Problems: d.problems}
		}
		d.value("", root, reflect.ValueOf(c).Elem())
	}
	if d.tooBig {
		return nil, &Error{Problems: d.problems}
	}
	c.lines = d.lines
	c.applyDefaults(d.explicit)

	problems := d.problems
	for _, p := range c.problems() {
		if !underAny(p.Path, d.bad) {
			problems = append(problems, p)
		}
	}
	if len(problems) > 0 {
		sortProblems(problems)
		return nil, &Error{Problems: problems}
	}
	return c, nil
}

func underAny(path string, bases []string) bool {
	for _, b := range bases {
		if within(path, b) {
			return true
		}
	}
	return false
}

// SetDefaults fills the per-item defaults of a Config built in Go: every route's
// OnUnavailable, every route feature's MaxCost and the API key header, where they are
// zero. Parse does this itself.
func (c *Config) SetDefaults() { c.applyDefaults(nil) }

// applyDefaults fills each per-item default whose field is zero and was not given a
// value in the file (explicit), so that an explicit "max_cost: 0" is reported by
// Validate rather than silently replaced.
func (c *Config) applyDefaults(explicit map[string]bool) {
	if k := c.Identity.APIKey; k != nil && k.Header == "" && !explicit["identity.api_key.header"] {
		k.Header = DefaultAPIKeyHeader
	}
	for i := range c.Routes {
		r := &c.Routes[i]
		rp := index("routes", i)
		if r.OnUnavailable == "" && !explicit[rp+".on_unavailable"] {
			r.OnUnavailable = DefaultOnUnavailable
		}
		for j := range r.Features {
			f := &r.Features[j]
			if f.MaxCost == 0 && !explicit[index(rp+".features", j)+".max_cost"] {
				f.MaxCost = DefaultMaxCost
			}
		}
	}
}

var yamlLine = regexp.MustCompile(`^line (\d+): `)

// syntaxError turns a yaml.v3 parse error into a *SyntaxError with the right line.
//
// yaml.v3 reports the line where the enclosing construct began (its "context mark"),
// zero-based for parser errors, and leaves the line out when that is 0, so its numbers
// are often one early or missing. The line of the problem itself is found instead as the
// first line L such that every prefix of the file of L or more lines fails with the same
// message: cutting the file before the bad line makes the error go away (or change).
// An unclosed bracket is reported where the parser gave up on it, which may be later
// than the line that opened it.
func syntaxError(data []byte, err error) *SyntaxError {
	msg := err.Error()
	msg = strings.TrimPrefix(msg, "yaml: ")
	line := 0
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		line, _ = strconv.Atoi(m[1])
		msg = msg[len(m[0]):]
	}
	if l := problemLine(data, msg); l > 0 {
		line = l
	}
	return &SyntaxError{Line: line, Msg: msg}
}

// problemLine implements the search described at syntaxError; 0 when it cannot tell.
func problemLine(data []byte, msg string) int {
	var ends []int // ends[i] is the end of line i+1, newline included
	for i, c := range data {
		if c == '\n' {
			ends = append(ends, i+1)
		}
	}
	if len(ends) == 0 || ends[len(ends)-1] != len(data) {
		ends = append(ends, len(data))
	}
	const budget = 2000 // parses; each stops at the error, so most are short
	for l, n := len(ends)-1, 0; l >= 0; l, n = l-1, n+1 {
		if n == budget {
			return 0
		}
		if !failsWith(data[:ends[l]], msg) {
			if l == len(ends)-1 {
				return 0 // the whole file does not fail that way: no answer
			}
			return l + 2
		}
	}
	return 1
}

// failsWith reports whether parsing data (every document in it) fails with msg.
func failsWith(data []byte, msg string) bool {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		if err == nil {
			continue
		}
		if errors.Is(err, io.EOF) {
			return false
		}
		s := err.Error()
		s = strings.TrimPrefix(s, "yaml: ")
		if m := yamlLine.FindStringSubmatch(s); m != nil {
			s = s[len(m[0]):]
		}
		return s == msg
	}
}
