package limiter

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// MemorySource is a Source held entirely in memory, swapped whole on every change
// (copy-on-write), so that reads take no lock. It serves snapshot files and tests; the
// replica serves production.
type MemorySource struct {
	mu    sync.Mutex // serialises writers; readers never take it
	state atomic.Pointer[memState]
	ready atomic.Bool
}

type memState struct {
	byID  map[string]*Snapshot
	byKey map[[sha256.Size]byte]*Snapshot
}

var _ Source = (*MemorySource)(nil)

// NewMemorySource returns a source holding snaps, ready at once.
func NewMemorySource(snaps ...*Snapshot) *MemorySource {
	m := &MemorySource{}
	m.state.Store(&memState{byID: map[string]*Snapshot{}, byKey: map[[sha256.Size]byte]*Snapshot{}})
	m.Replace(snaps)
	m.ready.Store(true)
	return m
}

// Customer implements Source.
func (m *MemorySource) Customer(id []byte) *Snapshot { return m.state.Load().byID[string(id)] }

// CustomerByKey implements Source.
func (m *MemorySource) CustomerByKey(sum *[sha256.Size]byte) *Snapshot {
	return m.state.Load().byKey[*sum]
}

// Ready implements Source.
func (m *MemorySource) Ready() bool { return m.ready.Load() }

// SetReady sets what Ready reports.
func (m *MemorySource) SetReady(ready bool) { m.ready.Store(ready) }

// Put adds or replaces snapshots.
func (m *MemorySource) Put(snaps ...*Snapshot) {
	m.mu.Lock()
	defer m.mu.Unlock()
	old := m.state.Load()
	next := make(map[string]*Snapshot, len(old.byID)+len(snaps))
	for k, v := range old.byID {
		next[k] = v
	}
	for _, s := range snaps {
		next[s.CustomerID] = s
	}
	m.state.Store(index(next))
}

// Delete removes a customer.
func (m *MemorySource) Delete(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	old := m.state.Load()
	next := make(map[string]*Snapshot, len(old.byID))
	for k, v := range old.byID {
		if k != id {
			next[k] = v
		}
	}
	m.state.Store(index(next))
}

// Replace makes snaps the whole content of the source.
func (m *MemorySource) Replace(snaps []*Snapshot) {
	m.mu.Lock()
	defer m.mu.Unlock()
	next := make(map[string]*Snapshot, len(snaps))
	for _, s := range snaps {
		next[s.CustomerID] = s
	}
	m.state.Store(index(next))
}

func index(byID map[string]*Snapshot) *memState {
	st := &memState{byID: byID, byKey: make(map[[sha256.Size]byte]*Snapshot)}
	for _, s := range byID {
		for _, k := range s.APIKeys {
			st.byKey[k] = s
		}
	}
	return st
}

// ParseSnapshots reads a snapshot file: a JSON array of snapshots, or NDJSON (one
// snapshot per line). Every bad snapshot is reported by its position (1-based) and,
// for NDJSON, its line; none is returned unless all are good.
func ParseSnapshots(r io.Reader) ([]*Snapshot, error) {
	docs, err := ReadSnapshotDocs(r)
	if err != nil {
		return nil, err
	}
	var (
		out  []*Snapshot
		errs FileErrors
		seen = map[string]int{}
	)
	for _, d := range docs {
		if d.Err != nil {
			errs = append(errs, d.Err)
			continue
		}
		s, err := ParseSnapshot(d.Raw)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", d.Where, err))
			continue
		}
		if prev, dup := seen[s.CustomerID]; dup {
			errs = append(errs, fmt.Errorf("%s: customer %q already defined by snapshot %d", d.Where, s.CustomerID, prev))
			continue
		}
		seen[s.CustomerID] = d.Pos
		out = append(out, s)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return out, nil
}

// RawDoc is one snapshot of a file, not yet decoded.
type RawDoc struct {
	Pos   int    // 1-based position in the file
	Where string // "snapshot 3" or "snapshot 3 (line 7)", for error messages
	Raw   json.RawMessage
	Err   error // the document could not even be split out
}

// ReadSnapshotDocs splits a snapshot file into raw documents: a JSON array, or NDJSON.
// Blank lines in NDJSON are skipped.
func ReadSnapshotDocs(r io.Reader) ([]RawDoc, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) > 0 && trimmed[0] == '[' {
		var arr []json.RawMessage
		if err := json.Unmarshal(trimmed, &arr); err != nil {
			return nil, fmt.Errorf("decode snapshot array: %w", err)
		}
		docs := make([]RawDoc, len(arr))
		for i, raw := range arr {
			docs[i] = RawDoc{Pos: i + 1, Where: fmt.Sprintf("snapshot %d", i+1), Raw: raw}
		}
		return docs, nil
	}
	var docs []RawDoc
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64<<10), MaxSnapshotBytes+1)
	line := 0
	for sc.Scan() {
		line++
		b := bytes.TrimSpace(sc.Bytes())
		if len(b) == 0 {
			continue
		}
		d := RawDoc{Pos: len(docs) + 1, Raw: append(json.RawMessage(nil), b...)}
		d.Where = fmt.Sprintf("snapshot %d (line %d)", d.Pos, line)
		docs = append(docs, d)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read snapshots after line %d: %w", line, err)
	}
	return docs, nil
}

// FileErrors lists every bad snapshot of a file.
type FileErrors []error

func (e FileErrors) Error() string {
	var b bytes.Buffer
	for i, err := range e {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(err.Error())
	}
	return b.String()
}

// Unwrap returns the errors.
func (e FileErrors) Unwrap() []error { return e }
