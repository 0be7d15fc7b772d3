package config

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.yaml.in/yaml/v3"
)

// maxNodes bounds the values that decoding visits once aliases are expanded, so that a
// small file of nested aliases ("billion laughs") cannot make decoding run for ever or
// fill memory. A large real configuration has a few thousand.
const maxNodes = 1 << 18

// decoder decodes a yaml.Node tree into a Config strictly, by walking the tree and the
// Go types side by side. yaml.v3's own strict mode (Decoder.KnownFields) stops at the
// first problem and names lines but not field paths; this walk reports every unknown
// key, duplicate key and ill-typed value, each with its path and line, and records the
// line of every path for Validate.
type decoder struct {
	lines    map[string]int  // path -> line of its key or list item
	explicit map[string]bool // paths given a non-null value
	problems []Problem       // in the order met
	bad      []string        // paths whose value did not decode; Validate is quiet under them
	visits   int             // nodes visited, aliases expanded
	tooBig   bool            // maxNodes was reached
}

// expandedSize returns the number of nodes under n once aliases are expanded, stopping
// early once it exceeds limit. memo holds, per anchored node, its size, or -1 while it
// is being counted; an alias back into an anchor being counted is a cycle, reported by
// returning cycle with the alias.
func expandedSize(n *yaml.Node, memo map[*yaml.Node]int, limit int) (size int, cycle *yaml.Node) {
	if n.Kind == yaml.AliasNode {
		if n.Alias == nil {
			return 1, nil
		}
		if memo[n.Alias] == -1 {
			return 0, n
		}
		return expandedSize(n.Alias, memo, limit)
	}
	if n.Anchor != "" {
		if s := memo[n]; s > 0 {
			return s, nil
		}
		memo[n] = -1
	}
	size = 1
	for _, c := range n.Content {
		s, cyc := expandedSize(c, memo, limit)
		if cyc != nil {
			return 0, cyc
		}
		if size += s; size > limit {
			break
		}
	}
	if n.Anchor != "" {
		memo[n] = size
	}
	return size, nil
}

var durationType = reflect.TypeOf(time.Duration(0))

// fieldIndex caches, per struct type, the yaml name -> field index.
var fieldIndex sync.Map // reflect.Type -> map[string]int

func fieldsOf(t reflect.Type) map[string]int {
	if m, ok := fieldIndex.Load(t); ok {
		return m.(map[string]int)
	}
	m := make(map[string]int, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		m[name] = i
	}
	fieldIndex.Store(t, m)
	return m
}

func (d *decoder) problem(path string, line int, format string, args ...any) {
	if path == "" {
		path = RootPath
	}
	d.problems = append(d.problems, Problem{Path: path, Line: line, Msg: fmt.Sprintf(format, args...)})
}

// typeErr reports that the value at path has the wrong shape, and marks path bad.
func (d *decoder) typeErr(path string, n *yaml.Node, want string) {
	d.problem(path, n.Line, "must be %s (got %s)", want, describe(n))
	d.bad = append(d.bad, path)
}

// describe names a node's value for a message: a scalar as written (quoted when it is
// a string), a collection by its kind.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		v := n.Value
		if len(v) > 64 {
			v = v[:64] + "..."
		}
		switch n.ShortTag() {
		case "!!int", "!!float", "!!bool", "!!null":
			return v
		}
		return strconv.Quote(v)
	}
	return "nothing"
}

// resolve follows aliases to the node they name.
func resolve(n *yaml.Node) *yaml.Node {
	for i := 0; n.Kind == yaml.AliasNode && n.Alias != nil && i < 100; i++ {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// value decodes n into v (settable) at path. A null leaves a non-nilable value as it
// was, so that "listen:" with nothing after it keeps the default, as yaml.v3 does.
func (d *decoder) value(path string, n *yaml.Node, v reflect.Value) {
	if d.visits++; d.visits > maxNodes {
		if !d.tooBig {
			d.problem(RootPath, 0, "more than %d values once aliases are expanded", maxNodes)
			d.tooBig = true
		}
		return
	}
	n = resolve(n)
	if isNull(n) {
		switch v.Kind() {
		case reflect.Pointer, reflect.Map, reflect.Slice:
			v.SetZero()
		}
		return
	}
	d.explicit[path] = true
	switch {
	case v.Type() == durationType:
		d.duration(path, n, v)
	case v.Kind() == reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		d.value(path, n, v.Elem())
	case v.Kind() == reflect.Struct:
		d.structure(path, n, v)
	case v.Kind() == reflect.Slice:
		d.list(path, n, v)
	case v.Kind() == reflect.Map:
		d.dict(path, n, v)
	default:
		d.scalar(path, n, v)
	}
}

func (d *decoder) structure(path string, n *yaml.Node, v reflect.Value) {
	if n.Kind != yaml.MappingNode {
		d.typeErr(path, n, "a mapping")
		return
	}
	fields := fieldsOf(v.Type())
	for _, p := range d.pairs(path, n, 0) {
		if d.tooBig {
			return
		}
		fp := field(path, p.name)
		i, ok := fields[p.name]
		if !ok {
			d.problem(fp, p.key.Line, "unknown field%s", suggest(p.name, fields))
			continue
		}
		d.lines[fp] = p.key.Line
		d.value(fp, p.val, v.Field(i))
	}
}

func (d *decoder) list(path string, n *yaml.Node, v reflect.Value) {
	if n.Kind != yaml.SequenceNode {
		d.typeErr(path, n, "a list")
		return
	}
	s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
	for i, e := range n.Content {
		if d.tooBig {
			break
		}
		ip := index(path, i)
		d.lines[ip] = e.Line
		d.value(ip, e, s.Index(i))
	}
	v.Set(s)
}

// dict decodes a mapping into a map with string keys; the map replaces any default.
func (d *decoder) dict(path string, n *yaml.Node, v reflect.Value) {
	if n.Kind != yaml.MappingNode {
		d.typeErr(path, n, "a mapping")
		return
	}
	t := v.Type()
	m := reflect.MakeMap(t)
	for _, p := range d.pairs(path, n, 0) {
		if d.tooBig {
			break
		}
		kp := field(path, p.name)
		d.lines[kp] = p.key.Line
		e := reflect.New(t.Elem()).Elem()
		d.value(kp, p.val, e)
		m.SetMapIndex(reflect.ValueOf(p.name).Convert(t.Key()), e)
	}
	v.Set(m)
}

// scalar decodes a string, bool or integer with yaml.v3's own rules (so 0x10 and 1_000
// are integers and any scalar is a string), replacing its error with one that says
// what was expected.
func (d *decoder) scalar(path string, n *yaml.Node, v reflect.Value) {
	want := "a string"
	switch v.Kind() {
	case reflect.Bool:
		want = "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		want = "a whole number"
	}
	if n.Kind != yaml.ScalarNode {
		d.typeErr(path, n, want)
		return
	}
	if want == "a whole number" {
		// yaml.v3 truncates 1.5 to 1 and reads 017 as octal 15: refuse both.
		if why := notPlainInt(n); why != "" {
			d.typeErr(path, n, why)
			return
		}
	}
	tmp := reflect.New(v.Type())
	if err := n.Decode(tmp.Interface()); err != nil {
		d.typeErr(path, n, want)
		return
	}
	v.Set(tmp.Elem())
}

// notPlainInt says why yaml.v3 would read n as an integer other than the one a person
// reads, or returns "": a fraction or exponent, or a leading 0 that makes it octal.
func notPlainInt(n *yaml.Node) string {
	switch n.ShortTag() {
	case "!!float":
		return "a whole number"
	case "!!int":
		if s := strings.TrimLeft(n.Value, "+-"); len(s) > 1 && s[0] == '0' && '0' <= s[1] && s[1] <= '9' {
			return "a whole number without a leading 0"
		}
	}
	return ""
}

// duration decodes a Go duration string such as 30s, 1m30s or 250ms. A bare number is
// refused rather than guessed to be seconds or nanoseconds.
func (d *decoder) duration(path string, n *yaml.Node, v reflect.Value) {
	const want = `a duration such as "30s", "250ms" or "1m30s"`
	if n.Kind != yaml.ScalarNode {
		d.typeErr(path, n, want)
		return
	}
	switch n.ShortTag() {
	case "!!int", "!!float":
		d.problem(path, n.Line, "must be a duration with a unit, such as %ss (got %s)", n.Value, n.Value)
		d.bad = append(d.bad, path)
		return
	}
	t, err := time.ParseDuration(n.Value)
	if err != nil {
		d.typeErr(path, n, want)
		return
	}
	v.SetInt(int64(t))
}

// pair is one key: value of a mapping.
type pair struct {
	name     string
	key, val *yaml.Node
}

// pairs returns the entries of mapping n, with YAML merge keys ("<<: *base") expanded:
// a key written in n wins over a merged one, and an earlier merged mapping over a later.
// A key written twice in n is reported; the first one counts.
func (d *decoder) pairs(path string, n *yaml.Node, depth int) []pair {
	seen := make(map[string]int, len(n.Content)/2) // name -> line
	out := make([]pair, 0, len(n.Content)/2)
	var merges []*yaml.Node
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		kr := resolve(k)
		if kr.Kind == yaml.ScalarNode && kr.ShortTag() == "!!merge" {
			merges = append(merges, v)
			continue
		}
		if kr.Kind != yaml.ScalarNode {
			d.problem(path, k.Line, "keys must be plain strings (got %s as a key)", describe(kr))
			d.bad = append(d.bad, path)
			continue
		}
		if first, dup := seen[kr.Value]; dup {
			d.problem(field(path, kr.Value), k.Line, "duplicate key (first at line %d)", first)
			continue
		}
		seen[kr.Value] = k.Line
		out = append(out, pair{kr.Value, k, v})
	}
	if len(merges) > 0 && depth > 16 {
		d.problem(path, n.Line, "merge keys (<<) nested more than 16 deep")
		return out
	}
	for _, m := range merges {
		m = resolve(m)
		srcs := []*yaml.Node{m}
		if m.Kind == yaml.SequenceNode {
			srcs = m.Content
		}
		for _, s := range srcs {
			s = resolve(s)
			if d.visits++; d.visits > maxNodes {
				return out
			}
			if s.Kind != yaml.MappingNode {
				d.problem(field(path, "<<"), s.Line, "must be a mapping or a list of mappings to merge (got %s)", describe(s))
				continue
			}
			for _, p := range d.pairs(path, s, depth+1) {
				if _, ok := seen[p.name]; !ok {
					seen[p.name] = p.key.Line
					out = append(out, p)
				}
			}
		}
	}
	return out
}

// suggest returns ` (did you mean "x"?)` for the known field closest to name, when one
// is within two edits, or "".
func suggest(name string, fields map[string]int) string {
	best, bestD := "", 3
	for f := range fields {
		if dist := editDistance(strings.ToLower(name), f); dist < bestD || dist == bestD && f < best {
			best, bestD = f, dist
		}
	}
	if best == "" || len(name) > 64 {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

// editDistance is the Levenshtein distance of a and b, for short strings.
func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return 1 << 30
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			c := prev[j-1]
			if a[i-1] != b[j-1] {
				c++
			}
			cur[j] = min(c, prev[j]+1, cur[j-1]+1)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
