// Package usage carries admitted usage out of the sidecar (DESIGN.md section 7): it makes
// each request's committed usage durable in Badger before the response goes back, keeps
// the usage counters per (customer, feature, window) that survive restarts, and publishes
// the usage to JetStream stream GATEHOUSE_USAGE so that every admitted unit is billed
// exactly once, across crashes, restarts and NATS outages of any length.
//
// It owns the keys under "u/" of the process's one Badger database (sync/store), the
// stream's creation, and the publisher's sequence state. It must not decide admission
// (that is the limiter's), must not open its own database, must not drop usage to save
// space, and must never make a network call on the request path: Record waits only for
// a local group commit.
//
// # Key layout under u/
//
//	u/o/b/<bseq>  outbox batch: the usage of one group commit, summed per key; bseq is
//	              a big-endian u64
//	u/o/k/<ck>    outbox total: batches folded into one entry per key when the outbox
//	              reached its size bound
//	u/p/<mseq>    pending message: the exact bytes to publish as message mseq, fixed
//	              before the first publish attempt (at most one at a time)
//	u/c/<ck>      counter: usage of one (customer, feature, window) that has left the
//	              outbox for a message; end:i64 | quantity:i64 | overage:i64
//	u/s/ack       the last acknowledged message: mseq:u64 | stream sequence:u64
//
// where <ck> is uvarint(len(customer)) customer uvarint(len(feature)) feature
// windowStart:u64.
//
// A group commit writes one entry (its batch), whatever the number of keys it touches.
// Each unit of usage is in exactly one of a batch, a total or a counter: the cut that
// makes a pending message moves its usage from the outbox to the counters in the same
// transaction. So a counter's durable value, which Restore gives the limiter, is its
// u/c/ entry plus its deltas still in the outbox, and it changes atomically with the
// outbox entry that records the usage.
//
// # Exactly once
//
// The publisher moves the outbox entries it is about to send into one pending record,
// with its message sequence, in one Badger transaction; from then on the message's id
// (<sidecar_id>:<epoch>:<mseq>) and bytes never change. It publishes with Nats-Msg-Id
// and with the expected last subject sequence set to the stream sequence of the last
// message this sidecar saw acknowledged (persisted in u/s/ack), so the server stores
// the message only if nothing, this message included, was stored on the subject since.
// The acknowledgement's sequence and the deletion of the pending record are written in
// one transaction. When a publish is refused for a wrong last sequence, the last
// message on the subject decides: if it carries the pending id and the pending bytes, an
// earlier attempt stored it (its acknowledgement was lost) and it is recorded as
// acknowledged; if the subject holds less than this sidecar had acknowledged (a purge,
// an age limit), publishing goes on from there; if it holds only an earlier epoch's
// messages and this epoch has published nothing, they are the baseline; anything else
// is a conflict (another process with this sidecar id, or a restored copy of this data
// directory that reuses ids), which is logged, counted, reported and retried without
// dropping the message. No step relies on the duplicate window.
package usage
