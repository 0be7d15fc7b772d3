package config

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// RootPath is the Problem.Path of a problem with the document as a whole, such as a
// file whose top level is a list instead of a mapping.
const RootPath = "(root)"

// Problem is one thing wrong with a configuration.
type Problem struct {
	Path string // field path such as routes[2].features[0].cost; never empty
	Line int    // 1-based line in the YAML file; 0 when unknown (a Config built in Go)
	Msg  string // what is wrong, such as `must be >= 0 (got -1)`
}

// String formats p as `routes[2].features[0].cost: must be >= 0 (got -1) at line 14`,
// leaving out " at line N" when the line is unknown.
func (p Problem) String() string {
	if p.Line > 0 {
		return fmt.Sprintf("%s: %s at line %d", p.Path, p.Msg, p.Line)
	}
	return p.Path + ": " + p.Msg
}

// Error is a configuration that does not decode or does not validate. It holds every
// problem found, ordered by line (problems without a line last).
type Error struct {
	File     string // set by Load; empty for Parse and Validate
	Problems []Problem
}

// Error returns one problem per line, each prefixed by "File: " when File is set.
func (e *Error) Error() string {
	var b strings.Builder
	for i, p := range e.Problems {
		if i > 0 {
			b.WriteByte('\n')
		}
		if e.File != "" {
			b.WriteString(e.File)
			b.WriteString(": ")
		}
		b.WriteString(p.String())
	}
	return b.String()
}

// SyntaxError is a file that is not YAML at all.
type SyntaxError struct {
	File string // set by Load
	Line int    // 1-based; 0 when unknown
	Msg  string // the parser's message, such as "did not find expected key"
}

func (e *SyntaxError) Error() string {
	s := "invalid YAML: " + e.Msg
	if e.Line > 0 {
		s += " at line " + strconv.Itoa(e.Line)
	}
	if e.File != "" {
		s = e.File + ": " + s
	}
	return s
}

// sortProblems orders problems by line, keeping the order of equal lines and putting
// problems without a line last.
func sortProblems(ps []Problem) {
	sort.SliceStable(ps, func(i, j int) bool {
		li, lj := ps[i].Line, ps[j].Line
		if li == 0 || lj == 0 {
			return li != 0 && lj == 0
		}
		return li < lj
	})
}

// field returns the path of key under path: path.key, or path["key"] when key is not
// made only of letters, digits, '_' and '-'. The root's fields have no leading dot.
func field(path, key string) string {
	simple := key != ""
	for i := 0; i < len(key) && simple; i++ {
		c := key[i]
		simple = 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-'
	}
	switch {
	case !simple:
		return path + "[" + strconv.Quote(key) + "]"
	case path == "":
		return key
	default:
		return path + "." + key
	}
}

// index returns the path of item i of the list at path.
func index(path string, i int) string {
	return path + "[" + strconv.Itoa(i) + "]"
}

// parent returns path without its last step (".key", "[3]" or `["key"]`), and false
// for a path of one step.
func parent(path string) (string, bool) {
	last := -1
	for i := 0; i < len(path); {
		switch path[i] {
		case '.':
			last = i
			i++
		case '[':
			last = i
			if i+1 < len(path) && path[i+1] == '"' {
				q, err := strconv.QuotedPrefix(path[i+1:])
				if err != nil {
					return "", false
				}
				i += 1 + len(q)
			} else {
				i++
			}
		default:
			i++
		}
	}
	if last <= 0 {
		return "", false
	}
	return path[:last], true
}

// lineOf returns the line of path in lines, or of its nearest ancestor that has one
// (so that a missing key is reported at the mapping that lacks it), or 0.
func lineOf(lines map[string]int, path string) int {
	if lines == nil {
		return 0
	}
	for {
		if l, ok := lines[path]; ok {
			return l
		}
		p, ok := parent(path)
		if !ok {
			return 0
		}
		path = p
	}
}

// within reports whether path is base or lies under it.
func within(path, base string) bool {
	if !strings.HasPrefix(path, base) {
		return false
	}
	rest := path[len(base):]
	return rest == "" || rest[0] == '.' || rest[0] == '['
}
