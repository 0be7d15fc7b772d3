package store

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/gatehouse-dev/gatehouse/internal/testutil"
)

func open(t *testing.T, dir string) *Store {
	t.Helper()
	s, err := Open(Options{Dir: dir, Log: testutil.Logger(t), GCInterval: -1})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	return s
}

func TestIdentityStableAcrossRestarts(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := open(t, dir)
	id, epoch := s.SidecarID(), s.Epoch()
	if !regexp.MustCompile(`^sc-[0-9a-f]{8}$`).MatchString(id) {
		t.Errorf("sidecar id %q: want sc- and 8 hex digits", id)
	}
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(epoch) {
		t.Errorf("epoch %q: want 32 hex digits", epoch)
	}
	if err := s.DB().Update(func(txn *badger.Txn) error { return txn.Set([]byte("e/x"), []byte("v")) }); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "sidecar-id"))
	if strings.TrimSpace(string(b)) != id {
		t.Errorf("sidecar-id file holds %q, want %q", b, id)
	}

	s = open(t, dir)
	if s.SidecarID() != id || s.Epoch() != epoch || s.Rebuilt() {
		t.Errorf("reopen: id %q epoch %q rebuilt %v; want %q %q false", s.SidecarID(), s.Epoch(), s.Rebuilt(), id, epoch)
	}
	s.Close()

	// A wiped database keeps the sidecar id and starts a fresh epoch.
	if err := os.RemoveAll(filepath.Join(dir, badgerDir)); err != nil {
		t.Fatal(err)
	}
	s = open(t, dir)
	defer s.Close()
	if s.SidecarID() != id {
		t.Errorf("sidecar id changed after wipe: %q, want %q", s.SidecarID(), id)
	}
	if s.Epoch() == epoch {
		t.Errorf("epoch unchanged after wipe: %q", epoch)
	}
}

func TestCorruptDirectoryMovedAside(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		match func(file string) bool
	}{
		{"every file", func(string) bool { return true }},
		// Badger panics in its own goroutine on these unless Open checks them first.
		{"table files", func(f string) bool { return strings.HasSuffix(f, ".sst") }},
		{"manifest", func(f string) bool { return f == "MANIFEST" }},
		{"value log", func(f string) bool { return strings.HasSuffix(f, ".vlog") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			s := open(t, dir)
			epoch := s.Epoch()
			// Close flushes the memtable to a table file; the large value goes to the
			// value log.
			wb := s.DB().NewWriteBatch()
			for j := 0; j < 2000; j++ {
				if err := wb.Set(fmt.Appendf(nil, "k/%d", j), make([]byte, 100)); err != nil {
					t.Fatal(err)
				}
			}
			if err := wb.Set([]byte("k/big"), make([]byte, 100<<10)); err != nil {
				t.Fatal(err)
			}
			if err := wb.Flush(); err != nil {
				t.Fatal(err)
			}
			s.Close()

			bdir := filepath.Join(dir, badgerDir)
			files, _ := os.ReadDir(bdir)
			n := 0
			for _, f := range files {
				if f.Name() == "LOCK" || !tc.match(f.Name()) {
					continue
				}
				fi, _ := f.Info()
				garbage := []byte(strings.Repeat("not badger\x00\xff", int(fi.Size()/12)+1))
				if err := os.WriteFile(filepath.Join(bdir, f.Name()), garbage, 0o644); err != nil {
					t.Fatal(err)
				}
				n++
			}
			if n == 0 {
				t.Fatal("no file to damage")
			}

			s = open(t, dir)
			defer s.Close()
			if !s.Rebuilt() {
				t.Fatal("Rebuilt() = false after garbage in the files")
			}
			if s.Epoch() == epoch {
				t.Error("a rebuilt database kept the old epoch")
			}
			aside, _ := filepath.Glob(bdir + ".corrupt-*")
			if len(aside) != 1 {
				t.Fatalf("moved-aside directories: %v, want one", aside)
			}
			if err := s.DB().View(func(txn *badger.Txn) error {
				_, err := txn.Get([]byte(KeyEpoch))
				return err
			}); err != nil {
				t.Errorf("fresh database unusable: %v", err)
			}
		})
	}
}

func TestLockedDirectoryIsNotMoved(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s := open(t, dir)
	defer s.Close()
	_, err := Open(Options{Dir: dir, Log: testutil.Logger(t), GCInterval: -1})
	if err == nil {
		t.Fatal("second Open on a locked directory succeeded")
	}
	if aside, _ := filepath.Glob(filepath.Join(dir, badgerDir) + ".corrupt-*"); len(aside) != 0 {
		t.Fatalf("a locked database was moved aside: %v", aside)
	}
}

func TestBadSidecarIDFileReplaced(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "sidecar-id"), []byte("not a valid id!\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	s := open(t, dir)
	defer s.Close()
	if !strings.HasPrefix(s.SidecarID(), "sc-") {
		t.Errorf("sidecar id %q", s.SidecarID())
	}
}

func TestGCLoopStops(t *testing.T) {
	t.Parallel()
	s, err := Open(Options{Dir: t.TempDir(), Log: testutil.Logger(t), GCInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}
