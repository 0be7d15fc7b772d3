package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/pb"
	"github.com/dgraph-io/badger/v4/table"
	"github.com/dgraph-io/badger/v4/y"
	"google.golang.org/protobuf/proto"
)

// checkTables verifies the footer and index checksum of every table file in dir that
// the MANIFEST lists, before Badger opens them. Badger reads a table's index at open
// time in its own goroutines and, on a damaged footer, panics or calls log.Fatal there,
// which no recover can catch: the process would crash-loop. The check reads only each
// table's footer and index, a few KiB per 2 MiB table. Data blocks are verified by
// Badger when it reads them (ChecksumVerificationMode OnBlockRead).
//
// A table file the MANIFEST does not list is skipped: it is one that a process killed
// while flushing a memtable or compacting had not finished (its manifest entry is
// written, and synced, only after the file is complete), and Badger deletes it on open.
// Checking it would take a half-written file for a damaged database and move a sound
// one aside. A MANIFEST that cannot be read is reported as it is: Badger could not open
// the database either.
func checkTables(dir string) error {
	files, err := filepath.Glob(filepath.Join(dir, "*.sst"))
	if err != nil || len(files) == 0 {
		return err
	}
	listed, err := manifestTables(dir)
	if err != nil {
		return err
	}
	for _, name := range files {
		id, ok := table.ParseFileID(name)
		if _, inManifest := listed[id]; !ok || !inManifest {
			continue
		}
		if err := checkTable(name); err != nil {
			return fmt.Errorf("table %s: %w", filepath.Base(name), err)
		}
	}
	return nil
}

// manifestTables returns the tables that dir's MANIFEST lists, by id; none when there is
// no MANIFEST.
func manifestTables(dir string) (map[uint64]badger.TableManifest, error) {
	f, err := os.Open(filepath.Join(dir, badger.ManifestFilename))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	opts := badger.DefaultOptions(dir).WithLogger(nil)
	mf, _, err := badger.ReplayManifestFile(f, opts.ExternalMagicVersion, opts)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", badger.ManifestFilename, err)
	}
	return mf.Tables, nil
}

// checkTable mirrors the reads of badger/table.(*Table).initIndex, with bounds checks.
func checkTable(name string) error {
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	size := fi.Size()
	read := func(off, n int64) ([]byte, error) {
		if off < 0 || n < 0 || off+n > size {
			return nil, errors.New("footer points outside the file")
		}
		b := make([]byte, n)
		if _, err := f.ReadAt(b, off); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
		return b, nil
	}
	pos := size - 4
	b, err := read(pos, 4)
	if err != nil {
		return err
	}
	chkLen := int64(binary.BigEndian.Uint32(b))
	pos -= chkLen
	b, err = read(pos, chkLen)
	if err != nil {
		return err
	}
	var chk pb.Checksum
	if err := proto.Unmarshal(b, &chk); err != nil {
		return fmt.Errorf("checksum: %w", err)
	}
	pos -= 4
	b, err = read(pos, 4)
	if err != nil {
		return err
	}
	idxLen := int64(binary.BigEndian.Uint32(b))
	pos -= idxLen
	if idxLen == 0 {
		return errors.New("empty index")
	}
	idx, err := read(pos, idxLen)
	if err != nil {
		return err
	}
	if err := y.VerifyChecksum(idx, &chk); err != nil {
		return fmt.Errorf("index: %w", err)
	}
	return nil
}
