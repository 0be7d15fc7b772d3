package usage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"go.uber.org/zap"
)

// The journal is the outbox's log of committed usage: an append-only sequence of
// records in segment files of segmentSize bytes, <dir>/<start>.log, where start is the
// log position (a byte offset that never repeats) of the segment's first byte, in 16
// hex digits. Each segment is mapped into memory: an append is a copy into the page
// cache under a short lock, so a Record is durable against a crash of the process the
// moment it returns, with no system call and no hand-off to another goroutine. (Like
// Badger's own write-ahead log with SyncWrites off, which this replaces for usage, it
// is not synced on every write: a power cut may lose the last records; see the README.)
//
// A record is len:u32 | crc:u32 (Castagnoli, of the payload) | payload, little endian,
// padded to a multiple of 8 bytes. The length is stored last, so a record whose copy a
// crash interrupted reads as absent (length 0) or fails its checksum. A length of
// endMarker ends a segment early: the next record did not fit. Positions below the
// floor (u/s/logfloor, written in the cut's transaction) are in messages or folded
// totals; segments wholly below it are deleted.
const (
	frameHeader = 8
	maxPayload  = 64 << 10
	endMarker   = 0xFFFFFFFF
)

// segmentSize is the size of every segment file. It is a variable for tests only: a log
// written with one size cannot be read with another.
var segmentSize uint64 = 8 << 20

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

var errRecordTooBig = errors.New("usage: record too big for the log")

type segment struct {
	start uint64 // log position of data[0]
	path  string
	f     *os.File
	data  []byte // mapped; see mapSegment
}

// journal is the log's files and the append position.
type journal struct {
	dir string
	log *zap.Logger

	// mu serialises appends; Recorder.Record holds it for one append (a copy of a few
	// dozen bytes), and it also protects Recorder.state.
	mu        sync.Mutex
	cur       *segment // the segment appends go to; nil until the first append
	pos       uint64   // next append position
	records   uint64   // usage records appended since open
	appends   uint64   // appends since open
	recovered uint64   // records found in the log at open

	end      atomic.Uint64 // pos, for readers: every record below it is complete
	curStart atomic.Uint64 // cur.start, or noSegment; sweep never removes it

	segMu sync.Mutex // protects segs
	segs  []*segment // mapped segments, by start

	// Pages below prefaulted were written to ahead of the appends (see prefault);
	// prefaultKick wakes the goroutine that does it.
	prefaulted   atomic.Uint64
	prefaultKick chan struct{}
}

// prefaultAhead is how far ahead of the append position prefault writes to the log's
// pages: about 1 s of appends at 5,000 requests a second.
const prefaultAhead = 256 << 10

var pageSize = uint64(os.Getpagesize())

// prefault writes to each page of the log from the append position to prefaultAhead
// past it, once, so that appends find their pages writable: the first write to a page
// of a shared file mapping faults into the file system (which may wait for its
// journal), and an append that faulted would do so holding j.mu, making every other
// request's append wait too. The write is an atomic add of 0 to the page's first word:
// it changes nothing, even if an append writes the same word at the same moment. Pages
// of a segment not created yet are left to a later call (prepare creates the next
// segment when the current one is half full). Only the prefault goroutine calls it.
func (j *journal) prefault() {
	end := j.end.Load()
	pos := max(j.prefaulted.Load(), (end+pageSize-1)&^(pageSize-1))
	for limit := end + prefaultAhead; pos < limit; {
		seg := j.lookup(pos) // not swept: it is at or past the append position
		if seg == nil {
			break
		}
		for stop := min(limit, seg.start+segmentSize); pos < stop; pos += pageSize {
			atomic.AddUint32((*uint32)(unsafe.Pointer(&seg.data[pos-seg.start])), 0)
		}
	}
	j.prefaulted.Store(pos)
}

// kickPrefault wakes the prefault goroutine when appends came within half of
// prefaultAhead of the pages it prepared.
func (j *journal) kickPrefault(after uint64) {
	if j.prefaulted.Load() < after+prefaultAhead/2 {
		select {
		case j.prefaultKick <- struct{}{}:
		default:
		}
	}
}

const noSegment = ^uint64(0)

func align8(n uint64) uint64 { return (n + 7) &^ 7 }

// openJournal opens the log in dir, whose records from floor on are not yet in a
// message, and calls fn with each of them in order. The log ends at the first record
// that is absent or damaged (a crash during its copy): the bytes where it was are
// cleared, so that records appended later are not followed by stale ones. Segments
// wholly below floor are deleted; segments past the end that hold data (only a crash of
// the machine, not of the process, leaves such) are renamed *.damaged and logged.
func openJournal(dir string, floor uint64, log *zap.Logger, fn func(pos uint64, payload []byte) error) (*journal, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("usage log: %w", err)
	}
	j := &journal{dir: dir, log: log, pos: floor, prefaultKick: make(chan struct{}, 1)}
	j.curStart.Store(noSegment)
	names, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("usage log: %w", err)
	}
	for _, de := range names {
		start, ok := segmentStart(de.Name())
		if !ok {
			continue
		}
		path := filepath.Join(dir, de.Name())
		if start+segmentSize <= floor {
			if err := os.Remove(path); err != nil {
				return nil, fmt.Errorf("usage log: delete published segment: %w", err)
			}
			continue
		}
		seg, err := openSegment(path, start, false)
		if err != nil {
			j.close()
			return nil, err
		}
		j.segs = append(j.segs, seg)
	}
	slices.SortFunc(j.segs, func(a, b *segment) int { return compareU64(a.start, b.start) })
	if err := j.recover(fn); err != nil {
		j.close()
		return nil, err
	}
	j.end.Store(j.pos)
	return j, nil
}

func compareU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func segmentName(start uint64) string { return fmt.Sprintf("%016x.log", start) }

func segmentStart(name string) (uint64, bool) {
	hex, ok := strings.CutSuffix(name, ".log")
	if !ok || len(hex) != 16 {
		return 0, false
	}
	v, err := strconv.ParseUint(hex, 16, 64)
	return v, err == nil && v%segmentSize == 0
}

// recover reads the records from j.pos on, calling fn with each, and leaves j.pos at
// the log's end.
func (j *journal) recover(fn func(pos uint64, payload []byte) error) error {
	for {
		seg := j.lookup(j.pos)
		if seg == nil {
			break
		}
		off := j.pos - seg.start
		if segmentSize-off < frameHeader {
			j.pos = seg.start + segmentSize
			continue
		}
		n := loadLen(seg.data[off:])
		if n == endMarker {
			j.pos = seg.start + segmentSize
			continue
		}
		if n == 0 || n > maxPayload || off+frameHeader+uint64(n) > segmentSize ||
			crc32.Checksum(seg.data[off+frameHeader:off+frameHeader+uint64(n)], castagnoli) != binary.LittleEndian.Uint32(seg.data[off+4:]) {
			// The end: clear what an interrupted copy may have left (one record at
			// most, since appends are serialised).
			clear(seg.data[off:min(off+frameHeader+maxPayload, segmentSize)])
			if n != 0 {
				j.log.Warn("usage log ends in a record whose copy was interrupted (it was never acknowledged to a request); cleared",
					zap.String("segment", seg.path), zap.Uint64("offset", off))
			}
			break
		}
		if err := fn(j.pos, seg.data[off+frameHeader:off+frameHeader+uint64(n)]); err != nil {
			return fmt.Errorf("usage log %s at %d: %w", seg.path, off, err)
		}
		j.recovered++
		j.pos += align8(frameHeader + uint64(n))
	}
	// Segments after the one the end is in hold nothing that belongs to the log.
	endStart := j.pos - j.pos%segmentSize
	keep := j.segs[:0]
	for _, seg := range j.segs {
		if seg.start <= endStart {
			keep = append(keep, seg)
			continue
		}
		empty := loadLen(seg.data) == 0
		seg.unmap()
		if empty {
			os.Remove(seg.path)
			continue
		}
		aside := seg.path + ".damaged"
		j.log.Error("usage log segment past the log's end holds data (the machine crashed before earlier records reached the disk?); moved aside, not counted",
			zap.String("segment", seg.path), zap.String("moved_to", aside))
		if err := os.Rename(seg.path, aside); err != nil {
			return fmt.Errorf("usage log: move damaged segment aside: %w", err)
		}
	}
	clear(j.segs[len(keep):])
	j.segs = keep
	return nil
}

// loadLen reads a record's length, which appends store atomically.
func loadLen(b []byte) uint32 {
	v := atomic.LoadUint32((*uint32)(unsafe.Pointer(&b[0])))
	var le [4]byte
	binary.NativeEndian.PutUint32(le[:], v)
	return binary.LittleEndian.Uint32(le[:])
}

func storeLen(b []byte, n uint32) {
	var le [4]byte
	binary.LittleEndian.PutUint32(le[:], n)
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&b[0])), binary.NativeEndian.Uint32(le[:]))
}

// lookup returns the segment that holds pos, or nil.
func (j *journal) lookup(pos uint64) *segment {
	j.segMu.Lock()
	defer j.segMu.Unlock()
	return j.lookupLocked(pos)
}

func (j *journal) lookupLocked(pos uint64) *segment {
	for i := len(j.segs) - 1; i >= 0; i-- { // appends and reads are near the newest
		if s := j.segs[i]; s.start <= pos {
			if pos < s.start+segmentSize {
				return s
			}
			return nil
		}
	}
	return nil
}

// reserve returns the space for a payload of up to size bytes at the append position:
// a slice of the mapped segment with length 0, to append the payload to, and to hand to
// commit. j.mu is held. A segment that cannot take the record is ended with a marker,
// and the next one is created if prepare did not create it before.
func (j *journal) reserve(size int) ([]byte, error) {
	if size > maxPayload {
		return nil, fmt.Errorf("%w: %d bytes", errRecordTooBig, size)
	}
	frame := align8(frameHeader + uint64(size))
	if j.cur == nil || j.pos-j.cur.start+frame > segmentSize {
		if err := j.roll(); err != nil {
			return nil, err
		}
	}
	off := j.pos - j.cur.start + frameHeader
	return j.cur.data[off:off:min(off+uint64(size), segmentSize)], nil
}

// write appends a record whose payload the caller encoded before taking the lock, so
// that the lock covers only a copy of it, its checksum and, last, its length. j.mu is
// held.
func (j *journal) write(payload []byte) error {
	b, err := j.reserve(len(payload))
	if err != nil {
		return err
	}
	b = append(b, payload...)
	j.commit(b, crc32.Checksum(b, castagnoli)) // of the copy: payload stays on its caller's stack
	return nil
}

// commit completes the record whose payload reserve's slice now holds, with its
// checksum. j.mu is held.
func (j *journal) commit(payload []byte, crc uint32) {
	off := j.pos - j.cur.start
	n := uint64(len(payload))
	if n == 0 || unsafe.SliceData(payload) != &j.cur.data[off+frameHeader] {
		panic("usage: journal commit of a payload that is not in the reserved space")
	}
	binary.LittleEndian.PutUint32(j.cur.data[off+4:], crc)
	storeLen(j.cur.data[off:], uint32(n))
	j.pos += align8(frameHeader + n)
	j.appends++
	j.end.Store(j.pos)
}

// roll moves the append position to a segment that has room, ending the current one
// with a marker. j.mu is held.
func (j *journal) roll() error {
	if j.cur != nil {
		off := j.pos - j.cur.start
		if off+4 <= segmentSize {
			storeLen(j.cur.data[off:], endMarker)
		}
		j.pos = j.cur.start + segmentSize
	}
	seg, err := j.segmentAt(j.pos - j.pos%segmentSize)
	if err != nil {
		return err
	}
	if j.cur != nil && seg.start != j.cur.start+segmentSize {
		return fmt.Errorf("usage log: segment %s does not follow %s", seg.path, j.cur.path)
	}
	j.cur = seg
	j.curStart.Store(seg.start)
	j.end.Store(j.pos)
	return nil
}

// segmentAt returns the segment that starts at start, creating it when it is absent.
func (j *journal) segmentAt(start uint64) (*segment, error) {
	j.segMu.Lock()
	defer j.segMu.Unlock()
	if s := j.lookupLocked(start); s != nil {
		return s, nil
	}
	seg, err := openSegment(filepath.Join(j.dir, segmentName(start)), start, true)
	if err != nil {
		return nil, err
	}
	j.segs = append(j.segs, seg)
	slices.SortFunc(j.segs, func(a, b *segment) int { return compareU64(a.start, b.start) })
	return seg, nil
}

// prepare creates the segment after the current one once the current one is half
// full, so that appends find it ready. The publisher calls it.
func (j *journal) prepare() error {
	start, end := j.curStart.Load(), j.end.Load()
	if start == noSegment || end-start < segmentSize/2 {
		return nil
	}
	_, err := j.segmentAt(start + segmentSize)
	return err
}

// next returns the payload of the record at pos and the position after it, skipping
// segment ends; at end it returns a nil payload. The payload aliases the mapped segment.
// Only the publisher reads, and only below end.
func (j *journal) next(pos, end uint64) (payload []byte, after uint64, err error) {
	for pos < end {
		seg := j.lookup(pos)
		if seg == nil {
			return nil, pos, fmt.Errorf("usage log: no segment for position %d", pos)
		}
		off := pos - seg.start
		if segmentSize-off < frameHeader {
			pos = seg.start + segmentSize
			continue
		}
		n := loadLen(seg.data[off:])
		if n == endMarker {
			pos = seg.start + segmentSize
			continue
		}
		if n == 0 || n > maxPayload || off+frameHeader+uint64(n) > segmentSize {
			return nil, pos, fmt.Errorf("%w: usage log %s at %d: length %d", errCorrupt, seg.path, off, n)
		}
		return seg.data[off+frameHeader : off+frameHeader+uint64(n)], pos + align8(frameHeader+uint64(n)), nil
	}
	return nil, pos, nil
}

// sweep deletes the segments wholly below floor, except the one appends go to. The
// caller has synced the database, so that the floor that makes them useless is on disk
// before they go.
func (j *journal) sweep(floor uint64) (removed int, err error) {
	j.segMu.Lock()
	cur := j.curStart.Load()
	keep := j.segs[:0]
	var gone []*segment
	for _, seg := range j.segs {
		if seg.start+segmentSize > floor || seg.start == cur {
			keep = append(keep, seg)
		} else {
			gone = append(gone, seg)
		}
	}
	clear(j.segs[len(keep):])
	j.segs = keep
	j.segMu.Unlock()
	// Unmapping and deleting a segment take milliseconds (its pages leave the page
	// cache): not under segMu, which an append that moves to the next segment takes
	// while it holds j.mu, with every request behind it. Nothing reads below the floor.
	for _, seg := range gone {
		seg.unmap()
		if rerr := os.Remove(seg.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, fmt.Errorf("usage log: delete published segment: %w", rerr))
		}
		removed++
	}
	return removed, err
}

// sweepable reports whether sweep(floor) would delete a segment.
func (j *journal) sweepable(floor uint64) bool {
	j.segMu.Lock()
	defer j.segMu.Unlock()
	cur := j.curStart.Load()
	for _, seg := range j.segs {
		if seg.start+segmentSize <= floor && seg.start != cur {
			return true
		}
	}
	return false
}

// diskBytes is the size of the log's segment files.
func (j *journal) diskBytes() int64 {
	j.segMu.Lock()
	defer j.segMu.Unlock()
	return int64(len(j.segs)) * int64(segmentSize)
}

// close unmaps every segment. The recorder calls it once nothing appends or reads.
func (j *journal) close() {
	j.segMu.Lock()
	defer j.segMu.Unlock()
	for _, s := range j.segs {
		s.unmap()
	}
	j.segs = nil
}

// openSegment opens (create: creates, allocating its blocks) and maps a segment file.
func openSegment(path string, start uint64, create bool) (*segment, error) {
	flag := os.O_RDWR
	if create {
		flag |= os.O_CREATE | os.O_EXCL
	}
	f, err := os.OpenFile(path, flag, 0o644)
	if err != nil {
		return nil, fmt.Errorf("usage log: %w", err)
	}
	fail := func(err error) (*segment, error) {
		f.Close()
		if create {
			os.Remove(path)
		}
		return nil, fmt.Errorf("usage log %s: %w", path, err)
	}
	if create {
		// Allocated up front, so that a full disk fails here, with an error, and not
		// later in a write to the mapping.
		if err := allocate(f, int64(segmentSize)); err != nil {
			return fail(err)
		}
	} else if fi, err := f.Stat(); err != nil {
		return fail(err)
	} else if fi.Size() != int64(segmentSize) {
		// Its creation was cut short by a crash, before any record went in.
		if err := allocate(f, int64(segmentSize)); err != nil {
			return fail(err)
		}
	}
	data, err := mapSegment(f, int(segmentSize))
	if err != nil {
		return fail(err)
	}
	return &segment{start: start, path: path, f: f, data: data}, nil
}

func (s *segment) unmap() {
	if s.data != nil {
		unmapSegment(s.data)
		s.data = nil
	}
	s.f.Close()
}

// writeZeros writes size zero bytes to f from its start, where fallocate is missing: a
// file only truncated to size would take its blocks at the first write to the mapping,
// and a full disk then kills the process (SIGBUS) instead of failing an append.
func writeZeros(f *os.File, size int64) error {
	zeros := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(zeros)) {
		if _, err := f.WriteAt(zeros[:min(int64(len(zeros)), size-off)], off); err != nil {
			return err
		}
	}
	return nil
}
