// Package flexprice is the bridge between Flexprice and gatehouse: one long-running
// process per deployment (`gatehouse bridge flexprice`), not one per sidecar.
//
// # Entitlements in
//
// For each customer it fetches the effective entitlements
// (GET /customers/external/{id}/entitlements) and the subscriptions
// (GET /customers/external/{id}/subscriptions), maps them to the snapshot of DESIGN.md
// section 3, keyed by the external customer id, and writes it to KV bucket
// gatehouse_entitlements (through package replica, which owns the bucket and its key
// encoding) when, and only when, its content changed; updated_at is the time of the
// change. A full sync runs on start and every sync_interval; webhooks
// (POST /webhooks/flexprice) re-fetch the customers they affect at once; customers that
// Flexprice answers 404 for are deleted from KV, and a full sync of all customers
// re-fetches (and so deletes) every KV key the listing did not return.
//
// The mapping:
//
//   - Billing: among the active and trialing subscriptions that have started, active
//     before trialing, then the earliest start_date, then the smallest id. Its current
//     period gives period_start and period_end, billing_period (with
//     billing_period_count folded in: 3 MONTHLY is QUARTERLY) the interval, its timezone
//     the timezone (UTC when absent or unknown). No such subscription: no billing section.
//   - Features: response entries are grouped by lookup key and folded with Flexprice's
//     rules: metered limits summed, any unlimited (absent usage_limit) contributor makes
//     it unlimited, soft is the OR, booleans OR'd, static values de-duplicated in order,
//     the reset period and a config value from the first contributor in the order plan,
//     addon, override. An aggregated entry folds to itself; per-source entries give the
//     same result. Types are lowercased, reset periods uppercased, config_value
//     forwarded.
//   - Overrides: an entry all of whose sources carry dates, none in effect now, is left
//     out. The earliest start_date or end_date after now among all sources (and a
//     subscription's period end, trial end, end date or cancel date) schedules a
//     re-fetch of that customer at that instant plus BoundaryDelay, since Flexprice fires
//     no webhook then.
//   - Fan-out: an index built from each customer's last re-fetch (plan ids and addon
//     line items of its subscriptions, entitlement sources, features) maps a plan, an
//     addon, a subscription or a feature to the customers it reaches.
//   - A feature (or billing) that the sidecars would reject is left out, logged and
//     counted; the bridge never writes a snapshot that fails limiter validation.
//
// # Usage out
//
// A durable JetStream consumer (gatehouse_flexprice) on GATEHOUSE_USAGE turns each delta
// into events: mode sum is one event with the quantity in a property, mode count one
// event per unit. Event ids are "<Nats-Msg-Id>/<delta>" and "<Nats-Msg-Id>/<delta>/<unit>",
// timestamps the message's `to`, so that every delivery sends the same events. Events go
// out in POST /events/bulk calls of at most 1,000. A message is acknowledged only once
// every one of its events was accepted or parked; while a send is retried (5xx, 429 after
// its Retry-After, timeouts) the messages are kept in progress. A 400 naming event k
// means the events before k were accepted: k is parked and the rest sent again. What
// Flexprice refuses, deltas of unmapped features, invalid deltas and undecodable
// messages are parked on GATEHOUSE_USAGE_DEAD (subject gatehouse.usage_dead.flexprice)
// with the original message and the error, and counted; nothing is dropped.
//
// It must not decide anything at request time (the sidecars do), must not write KV keys
// other than customers' snapshots, and must never log the API key.
package flexprice
