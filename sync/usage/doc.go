// Package usage carries admitted usage out of the sidecar (DESIGN.md section 7): it makes
// each request's usage durable before the response goes back, keeps the usage counters
// per (customer, feature, window) that survive restarts, and publishes the usage to
// JetStream stream GATEHOUSE_USAGE so that every admitted unit is billed exactly once,
// across crashes, restarts and NATS outages of any length.
//
// It owns the usage log (<data dir>/usage-log-<epoch>/, see journal.go), the keys under
// "u/" of the process's one Badger database (sync/store), the stream's creation, and the
// publisher's sequence state. It must not decide admission (that is the limiter's), must
// not open its own database, must not drop usage to save space, and must never make a
// network call on the request path: Record copies the usage into the mapped log.
//
// # Where usage is
//
// Record appends one record to the log: a copy of a few dozen bytes into a memory-mapped
// segment file under a short lock, durable against a crash of the process when Record
// returns, with no Badger write, no system call and no other goroutine involved (the
// record is encoded before the lock, and a goroutine of its own faults the next pages
// in ahead of the appends; see journal.prefault). The publisher reads the log from its
// floor into the next message, in small steps between cuts (readAheadStep), and a cut
// moves it into a message; everything else is in Badger:
//
//	u/p/<mseq>    message mseq: its deltas in binary, with their windows' ends; the one
//	              above the acknowledged sequence is pending (at most one), the others
//	              are acknowledged and not yet settled into the counters
//	u/o/k/<ck>    outbox total: the log folded into one entry per key when the outbox
//	              reached its size bound
//	u/c/<ck>      counter: settled usage of one (customer, feature, window);
//	              end:i64 | quantity:i64 | overage:i64
//	u/s/ack       the last acknowledged message: mseq:u64 | stream sequence:u64
//	u/s/logfloor  log records below this position are in messages or folded totals
//	              (the segments wholly below it are deleted, after a sync)
//	u/s/settled   2 | lo:u64 | hi:u64 | 0, or 1 ck: messages below lo are settled into
//	              the counters; of messages lo..hi (a merged pass under way), the
//	              deltas of keys before ck are; none above hi (see settleMark)
//
// where <ck> is uvarint(len(customer)) customer uvarint(len(feature)) feature
// windowStart:u64. (u/o/b/ and u/s/floor are an earlier version's batches, moved into
// outbox totals once at start; see migrateBatches.)
//
// Each unit of usage is, at every moment, in exactly one of a log record at or above the
// floor, a folded total, a message not settled as far as the settle mark says, and a
// counter: the cut writes a message and raises the floor in one transaction; a fold
// writes totals and raises the floor in one; each settle step adds some keys' deltas,
// summed over the acknowledged messages of a merged pass, to the counters and moves the
// mark past those keys in one. So a counter's durable value, which Restore gives the
// limiter, is the sum of its parts in those four places. Every transaction is the
// publisher's, and small (the cut writes three entries or so, a settle step 256
// counters). A pass merges up to 16 messages (or waits at most a minute for them, or
// until they hold 262,144 deltas), so that a busy key is written once per pass rather
// than once per message.
//
// Overage of a limited feature is computed as records leave the log, from the key's
// durable total in log order, which is the order in which usage became durable.
//
// # Exactly once
//
// The publisher moves the outbox content it is about to send into one pending record,
// with its message sequence, in one Badger transaction; from then on the message's id
// (<sidecar_id>:<epoch>:<mseq>) and bytes never change (the JSON is a function of the
// record, see appendMessageJSON). It publishes with Nats-Msg-Id and with the expected
// last subject sequence set to the stream sequence of the last message this sidecar saw
// acknowledged (persisted in u/s/ack), so the server stores the message only if
// nothing, this message included, was stored on the subject since. Writing the
// acknowledged sequence turns the pending record into an acknowledged one. When a
// publish is refused for a wrong last sequence, the last message on the subject
// decides: if it carries the pending id and the pending bytes, an earlier attempt
// stored it (its acknowledgement was lost) and it is recorded as acknowledged; if the
// subject holds less than this sidecar had acknowledged (a purge, an age limit),
// publishing goes on from there; if it holds only an earlier epoch's messages and this
// epoch has published nothing, they are the baseline; anything else is a conflict
// (another process with this sidecar id, or a restored copy of this data directory
// that reuses ids), which is logged, counted, reported and retried without dropping the
// message. No step relies on the duplicate window.
package usage
