// Package replica owns the entitlements coming in: it watches the KV bucket
// gatehouse_entitlements, validates each value (limiter.ParseSnapshot), stores snapshots
// and the KV revision in Badger in one transaction, and serves them to the request path
// from memory (a sharded hot map with golang-lru over Badger). It also provides Push,
// Delete and EnsureBucket, which write the bucket for the push command and bridges.
//
// It must not make a network call on the request path (a cache miss reads Badger only),
// must not write usage, and must not keep the sidecar from serving while NATS is away:
// the replica of an earlier run is served at once, and the watch is retried with backoff.
//
// # Keys
//
// One KV key per customer: "c." + id when the id is key-safe, else "b." + unpadded
// base64url of the id (see KeyFor). A value must be a snapshot whose customer_id is the
// one its key names; anything else is rejected.
//
// # Resume and resync
//
// The replica stores, with every batch it applies, the bucket's stream creation time and
// the last revision applied. On restart it resumes at that revision + 1: with history 1
// the stream keeps each key's latest message, so every key changed meanwhile arrives with
// its latest value or delete marker, and nothing older is replayed. It does a full sync
// instead (every key's latest message, then a sweep that removes local keys the bucket no
// longer has) when:
//
//   - the stream's creation time differs: the bucket was deleted and recreated;
//   - the stream's last revision is behind the stored one;
//   - a full sync was interrupted, or Resync asked for one;
//   - once caught up with nothing pending, the bucket's number of keys (subjects,
//     counting delete markers) differs from the replica's. The replica never loses a key
//     the bucket has, so a difference means keys were removed without a marker while the
//     replica was not looking (PurgeDeletes, a TTL, a stream purge): exactly the gap that
//     resuming cannot see. The check runs at every catch-up and every 5 s.
//
// # Memory
//
// CacheSize decoded snapshots (default 100,000; about 1 KiB each for a typical snapshot)
// plus negative caches of a tenth of that; everything else stays in Badger. Customer and
// CustomerByKey allocate nothing on a hit.
package replica
