// Package store owns the one Badger database of a gatehouse process and its key layout,
// and the sidecar's identity (its stable id and the epoch of its database).
//
// Every package under sync/ that keeps state writes it here, each under its own key
// prefix, so that one database, one memory budget and one value-log GC serve them all.
// The store knows the layout but not the meaning of the values: it must not decode
// snapshots, publish anything or talk to NATS. It must not be opened twice on one
// directory (Badger's directory lock refuses that).
//
// # Directory
//
//	<Dir>/sidecar-id            the sidecar id, "sc-" and 8 hex digits, written once
//	<Dir>/badger/               the Badger database
//	<Dir>/badger.corrupt-<unix> a database that could not be opened, moved aside
//
// A database that cannot be opened (garbage in its files, a panic inside Badger) is moved
// aside and replaced by an empty one, and Rebuilt reports it: entitlements come back from
// NATS, and the new epoch tells usage consumers that the id space starts afresh. A
// directory that another process holds locked, or that cannot be read, is an error and is
// never moved.
//
// # Key layout
//
// Keys are byte strings; the first two bytes name their owner.
//
//	e/<customer id>          replica: 8-byte big-endian KV revision, then the snapshot JSON
//	                         exactly as it was received (the last good one)
//	k/<32-byte sha256>       replica: API key hash -> customer id
//	s/<kv key>               replica: state of one KV key (subject): 1 byte kind
//	                         (live, deleted, rejected), then 8-byte big-endian revision
//	m/replica                replica: its position (JSON): bucket, stream creation time,
//	                         revision, counts, caught-up flag, last contact
//	m/epoch                  store: the database epoch (32 hex digits)
//	u/...                    reserved for sync/usage: counters and outbox
//	q/...                    reserved for sync/quota: hard-limit leases
//
// # Memory and disk
//
// Options.MemoryBudget (default 64 MiB) sizes Badger's heap: a quarter for memtables (two
// of budget/8). There is no block cache: with uncompressed, memory-mapped tables a block
// is read in place, and Badger charges a cached block the capacity of its slice, which is
// the rest of the mapping, so its cache admitted almost nothing (hit ratio 1%), logged
// "Block cache might be too small" every minute and held a quarter of the budget for
// nothing. Compactions add up to ~50 MiB of table
// builders while a bulk sync is being written (tables are 2 MiB at every level, which
// bounds them). Table files are not compressed and are memory-mapped, with their indexes
// and bloom filters read in place: the mapped pages show in RSS as file-backed,
// reclaimable page cache (RssFile), not as heap. Measured with a million customers
// (sync/replica TestBigReplica): ~580 MiB on disk, ~300 table files (one descriptor
// each). Snappy would halve the disk but doubles the heap of compactions and makes every
// cache miss decompress a block.
//
// Values up to 64 KiB live in the LSM tree; larger ones go to the value log, which is
// garbage-collected every Options.GCInterval (default 5 minutes).
//
// Writes are not synced to disk on commit (Badger's SyncWrites is off): a killed process
// loses nothing that was committed, a power cut may lose the last second. Callers that
// need more call DB().Sync().
package store
