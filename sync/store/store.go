package store

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
	"go.uber.org/zap"
)

// Key prefixes and keys of the layout described in the package doc.
const (
	PrefixEntitlement = "e/" // e/<customer id> -> revision (8 bytes BE) ‖ snapshot JSON
	PrefixAPIKey      = "k/" // k/<32-byte sha256> -> customer id
	PrefixSubject     = "s/" // s/<kv key> -> kind (1 byte) ‖ revision (8 bytes BE)
	PrefixMeta        = "m/" // metadata
	PrefixUsage       = "u/" // reserved for sync/usage
	PrefixQuota       = "q/" // reserved for sync/quota

	KeyReplica = "m/replica" // replica position
	KeyEpoch   = "m/epoch"   // database epoch
)

// Defaults of Options.
const (
	DefaultMemoryBudget = 64 << 20
	DefaultGCInterval   = 5 * time.Minute
)

const (
	badgerDir      = "badger"
	sidecarIDFile  = "sidecar-id"
	valueThreshold = 64 << 10
)

// Options configure Open. The zero value of each field means its documented default.
type Options struct {
	// Dir is the data directory: it holds the sidecar id and, under badger/, the database.
	Dir string
	// Log receives the store's and Badger's messages; nil discards them.
	Log *zap.Logger
	// MemoryBudget bounds Badger's memtables and caches, in bytes; 0 means 64 MiB.
	// Values below 16 MiB are raised to 16 MiB.
	MemoryBudget int64
	// GCInterval is how often the value log is garbage-collected; 0 means 5 minutes,
	// a negative value disables it.
	GCInterval time.Duration
}

// Store is the process's Badger database and identity.
type Store struct {
	dir       string
	db        *badger.DB
	log       *zap.Logger
	sidecarID string
	epoch     string
	rebuilt   bool

	closeOnce sync.Once
	closeErr  error
	stop      chan struct{}
	wg        sync.WaitGroup // the GC goroutine
}

// Open opens (or creates) the store in opts.Dir. A database that cannot be opened is
// moved aside to <Dir>/badger.corrupt-<unix> and replaced by an empty one; Rebuilt then
// reports true.
func Open(opts Options) (*Store, error) {
	if opts.Dir == "" {
		return nil, errors.New("open store: no directory")
	}
	log := opts.Log
	if log == nil {
		log = zap.NewNop()
	}
	log = log.Named("store")
	if opts.MemoryBudget == 0 {
		opts.MemoryBudget = DefaultMemoryBudget
	}
	opts.MemoryBudget = max(opts.MemoryBudget, 16<<20)
	if opts.GCInterval == 0 {
		opts.GCInterval = DefaultGCInterval
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("open store %s: %w", opts.Dir, err)
	}
	id, err := sidecarID(opts.Dir, log)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", opts.Dir, err)
	}
	s := &Store{dir: opts.Dir, log: log, sidecarID: id, stop: make(chan struct{})}

	dir := filepath.Join(opts.Dir, badgerDir)
	db, err := openBadger(dir, opts.MemoryBudget, log)
	if err != nil {
		if !movable(err) {
			return nil, fmt.Errorf("open store %s: %w", dir, err)
		}
		aside := fmt.Sprintf("%s.corrupt-%d", dir, time.Now().Unix())
		for i := 1; exists(aside); i++ {
			aside = fmt.Sprintf("%s.corrupt-%d.%d", dir, time.Now().Unix(), i)
		}
		log.Error("database cannot be opened: moving it aside and starting empty; entitlements will be rebuilt from NATS, usage not yet published is lost",
			zap.String("dir", dir), zap.String("moved_to", aside), zap.Error(err))
		if rerr := os.Rename(dir, aside); rerr != nil {
			return nil, fmt.Errorf("open store %s: %w (and moving it aside failed: %v)", dir, err, rerr)
		}
		s.rebuilt = true
		db, err = openBadger(dir, opts.MemoryBudget, log)
		if err != nil {
			return nil, fmt.Errorf("open store %s after moving the old one aside: %w", dir, err)
		}
	}
	s.db = db
	if s.epoch, err = loadEpoch(db); err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: %w", dir, err)
	}
	log.Info("store open", zap.String("dir", dir), zap.String("sidecar_id", s.sidecarID),
		zap.String("epoch", s.epoch), zap.Bool("rebuilt", s.rebuilt), zap.Int64("memory_budget", opts.MemoryBudget))
	if opts.GCInterval > 0 {
		s.wg.Add(1)
		go s.gcLoop(opts.GCInterval)
	}
	return s, nil
}

// Dir is the data directory. Callers that keep files beside the database (the usage
// log) keep to their own subdirectory.
func (s *Store) Dir() string { return s.dir }

// DB is the Badger database. Callers keep to their key prefix.
func (s *Store) DB() *badger.DB { return s.db }

// SidecarID is the sidecar's stable id, kept in <Dir>/sidecar-id.
func (s *Store) SidecarID() string { return s.sidecarID }

// Epoch names this database: it is new whenever the database is new (first start, wiped
// or rebuilt directory), so that ids derived from it never repeat.
func (s *Store) Epoch() string { return s.epoch }

// Rebuilt reports whether Open found the database unusable and started an empty one.
func (s *Store) Rebuilt() bool { return s.rebuilt }

// Close stops the GC goroutine and closes the database. It is safe to call twice.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		close(s.stop)
		s.wg.Wait()
		s.closeErr = s.db.Close()
	})
	return s.closeErr
}

func (s *Store) gcLoop(every time.Duration) {
	defer s.wg.Done()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		n := 0
		for n < 16 {
			select {
			case <-s.stop:
				return
			default:
			}
			if err := s.db.RunValueLogGC(0.5); err != nil {
				if !errors.Is(err, badger.ErrNoRewrite) && !errors.Is(err, badger.ErrRejected) {
					s.log.Warn("value log gc", zap.Error(err))
				}
				break
			}
			n++
		}
		if n > 0 {
			s.log.Info("value log gc rewrote files", zap.Int("files", n))
		}
	}
}

// badgerOptions sizes Badger for a sidecar; see the package doc.
func badgerOptions(dir string, budget int64, log *zap.Logger) badger.Options {
	o := badger.DefaultOptions(dir).
		WithLogger(badgerLogger{log.Named("badger").Sugar()}).
		WithMemTableSize(budget / 8).
		WithNumMemtables(2).
		WithBlockCacheSize(0). // blocks are read in place from the mapping; see the package doc
		WithCompression(options.None).
		WithNumLevelZeroTables(4).
		WithNumLevelZeroTablesStall(12).
		WithNumCompactors(2).
		WithNumGoroutines(4).
		WithValueThreshold(valueThreshold).
		WithValueLogFileSize(64 << 20).
		WithChecksumVerificationMode(options.OnBlockRead).
		WithMetricsEnabled(false)
	o.TableSizeMultiplier = 1
	return o
}

// openBadger opens the database, turning a panic inside Badger (it panics on some
// corruptions) into an error.
func openBadger(dir string, budget int64, log *zap.Logger) (db *badger.DB, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("badger panicked: %v", p)
		}
	}()
	if err := checkTables(dir); err != nil {
		return nil, err
	}
	if err := clearInterruptedOpen(dir, log); err != nil {
		return nil, err
	}
	return badger.Open(badgerOptions(dir, budget, log))
}

// errLocked is a database another process holds open.
var errLocked = errors.New("another process is using this data directory")

// clearInterruptedOpen removes the empty memtable (.mem) and value log (.vlog) files that
// a process killed while Badger was opening leaves behind: Badger creates the next file
// of each on every open and sizes it afterwards, and refuses to open over an empty one
// (dgraph-io/badger#2207). An empty file holds no data, so removing it loses nothing;
// without this, the whole database would be taken for corrupt and moved aside. It holds
// Badger's directory lock while it looks, so a database open in another process is left
// alone.
func clearInterruptedOpen(dir string, log *zap.Logger) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	lock, err := os.OpenFile(filepath.Join(dir, "LOCK"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return fmt.Errorf("%w: %s: %v", errLocked, dir, err)
	}
	defer syscall.Flock(int(lock.Fd()), syscall.LOCK_UN) //nolint:errcheck
	removed := false
	for _, e := range entries {
		name := e.Name()
		if !e.Type().IsRegular() || (!strings.HasSuffix(name, ".mem") && !strings.HasSuffix(name, ".vlog")) {
			continue
		}
		info, err := e.Info()
		if err != nil || info.Size() != 0 {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			return err
		}
		log.Warn("removed an empty file left by an interrupted open", zap.String("file", name))
		removed = true
	}
	if removed {
		if d, err := os.Open(dir); err == nil {
			d.Sync() //nolint:errcheck
			d.Close()
		}
	}
	return nil
}

// movable reports whether an open error means a damaged database (move it aside and
// start again) rather than one that is busy or out of reach (report it).
func movable(err error) bool {
	msg := err.Error()
	return !errors.Is(err, errLocked) && !strings.Contains(msg, "Cannot acquire directory lock") &&
		!errors.Is(err, os.ErrPermission) && !strings.Contains(msg, "permission denied") &&
		!strings.Contains(msg, "read-only file system") && !strings.Contains(msg, "no space left")
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// sidecarID reads <dir>/sidecar-id, writing a new id there when it is missing or unusable.
func sidecarID(dir string, log *zap.Logger) (string, error) {
	path := filepath.Join(dir, sidecarIDFile)
	b, err := os.ReadFile(path)
	if err == nil {
		id := strings.TrimSpace(string(b))
		if validSidecarID(id) {
			return id, nil
		}
		log.Warn("sidecar id file is unusable: writing a new id", zap.String("path", path), zap.String("content", id))
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read sidecar id: %w", err)
	}
	var r [4]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", err
	}
	id := "sc-" + hex.EncodeToString(r[:])
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(id+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("write sidecar id: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("write sidecar id: %w", err)
	}
	return id, nil
}

// validSidecarID accepts what an operator may have written by hand too: 1 to 64 of
// A-Z a-z 0-9 - _, since the id names a NATS subject token and a message id part.
func validSidecarID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// loadEpoch reads the database epoch, creating it when the database is new.
func loadEpoch(db *badger.DB) (string, error) {
	var epoch string
	err := db.Update(func(txn *badger.Txn) error {
		item, err := txn.Get([]byte(KeyEpoch))
		if err == nil {
			return item.Value(func(v []byte) error { epoch = string(v); return nil })
		}
		if !errors.Is(err, badger.ErrKeyNotFound) {
			return err
		}
		if epoch, err = newEpoch(time.Now()); err != nil {
			return err
		}
		return txn.Set([]byte(KeyEpoch), []byte(epoch))
	})
	if err != nil {
		return "", fmt.Errorf("epoch: %w", err)
	}
	return epoch, nil
}

// newEpoch returns 32 hex digits, ULID-like: 48 bits of unix milliseconds, then 80
// random bits, so that epochs sort by creation time.
func newEpoch(now time.Time) (string, error) {
	var b [16]byte
	var ms [8]byte
	binary.BigEndian.PutUint64(ms[:], uint64(now.UnixMilli()))
	copy(b[:6], ms[2:])
	if _, err := rand.Read(b[6:]); err != nil {
		return "", err
	}
	return hex.EncodeToString(b[:]), nil
}

// badgerLogger routes Badger's messages to zap. Badger is chatty at info level, so its
// info messages become debug messages.
type badgerLogger struct{ s *zap.SugaredLogger }

func (l badgerLogger) Errorf(f string, a ...any)   { l.s.Errorf(strings.TrimSpace(f), a...) }
func (l badgerLogger) Warningf(f string, a ...any) { l.s.Warnf(strings.TrimSpace(f), a...) }
func (l badgerLogger) Infof(f string, a ...any)    { l.s.Debugf(strings.TrimSpace(f), a...) }
func (l badgerLogger) Debugf(f string, a ...any)   { l.s.Debugf(strings.TrimSpace(f), a...) }
