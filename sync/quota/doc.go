// Package quota makes hard limits exact across a fleet of sidecars (DESIGN.md section 6).
// A sidecar admits hard-limited usage only against quota it holds as a lease, and
// leases are granted by compare-and-set on the KV bucket gatehouse_quota, one key per
// (customer, feature, window), so that the grants of the fleet never add up to more than
// the limit. The Manager implements limiter.Quota: the limiter takes units from the
// lease on the counter with atomics, and calls the manager only when the lease runs low
// (a refill ahead of need, off the request path) or short (a bounded wait).
//
// It owns the bucket and the Badger keys under "q/". It must not decide admission
// (the limiter does), must not count usage (sync/usage does: usage and grants are kept
// apart), and must never make a network call on the request path except in Acquire,
// when this sidecar holds too little for a request and the fleet may still have quota.
//
// # The value
//
// Each key holds a JSON Value: the limit and the entitlement revision that set it, and
// the grant of each sidecar by sidecar id. A sidecar's grant is what it may use in the
// window, its used units included; it raises its own grant to take quota and lowers it
// to return quota, and never writes another's. A grant is raised only while the sum of
// grants stays within the limit, and the limit of a newer entitlement revision always
// wins over an older one, so a lowered limit stops every grant at once.
//
// # Lease size and refills
//
// A refill's size adapts to what is left and to this sidecar's recent rate (leaseSize
// in lease.go). Far from the limit a lease is a share of what is left: at least 1/16 of
// the free quota per sidecar holding the key, capped by Options.MaxLease, or what lasts
// Options.LeasePeriod at the recent rate if that is more (within MinLease and MaxLease,
// at most doubling per refill). A customer with a limit of 10^12 thus takes MaxLease at
// its first request and refills once per 0.75·MaxLease requests, whatever its rate.
// Near the limit a lease is never more than what is left divided by twice the number of
// sidecars holding grants (or in the fleet roster, if more), or, if more, what the
// recent rate uses while a refill is under way, within an equal share of what is left;
// down to 1 unit, and at least the request's cost. A refill starts ahead of need, off
// the request path, when the lease falls below its low-water mark (LowWaterPercent of
// its size, and at least what the recent rate uses in four refill times), but never
// takes the last 2·holders units: those go to requests that wait for them. A refill
// ahead of need that finds nothing to take is not tried again for a while, even if the
// lease still holds units. A request waits only when its sidecar holds too little, at
// most Options.Wait, and then the route's on_unavailable policy decides. The requests
// that wait for one refill share it, and it takes what they need together when that
// much is left, so that one compare-and-set serves them all. A sidecar's first lease of
// a key is taken on the request path: one compare-and-set per (customer, feature,
// window) and sidecar. A refill writes with the value it last read or wrote, which the
// compare-and-set checks; within a second of losing one to another sidecar, it reads
// the key first, since the value it holds is then most likely stale.
//
// # Asking for unused quota
//
// No sidecar sits on the last units while another refuses (want.go). A refill that
// finds too little left in the bucket while requests wait for it asks the other
// holders of the key, on the core NATS subject gatehouse.quota.<bucket>.want, for
// what they hold unused, and refills once more with what they give back (asking once
// more when another sidecar took that first while holders had yet to answer). A holder
// whose lease has gone unused for a few milliseconds returns all of it at once; a
// holder still spending its lease keeps it (its traffic uses it) and says so. A return
// made for an ask is announced on gatehouse.quota.<bucket>.freed, which lets every
// sidecar that found the key exhausted refill again at its next request; a refill that
// requests wait for and that found nothing reads the key again when such an
// announcement came while it ran (its read may have missed the return). An ask waits
// at most a quarter of Options.Wait; an ask that found nothing is not repeated until
// the key's value changes. A sidecar asked for a key's units within the last second
// takes, when it refills that key, only what its own waiting requests need, and
// nothing ahead of need: the askers' requests wait too. Far from the limit nothing is
// asked.
//
// The maintenance loop lets a counter whose ask was turned down (backoff, fleet
// exhausted, NATS away) ask again every tick (250 ms), and walks every lease once a
// second for idle returns, ended windows and failed returns, without holding the
// Manager's lock across the walk, so that the request path never waits behind it. Far
// from the limits a tick between walks touches no lease.
//
// # Returns, restarts and cleanup
//
// Unused quota goes back when the sidecar closes, when its window ends, when a lease
// sat idle for Options.IdleReturn, when another sidecar asks for it near the limit
// and this one is not using it, and when a snapshot lowers or removes the limit. A
// grant is saved under q/ after the bucket accepted it, and a return before the bucket
// hears of it, so a restarted sidecar (same data directory, same id) spends at most its
// saved grant less its restored usage even without NATS, and reconciles with its entry
// in the bucket on the next refill. Keys carry a per-message TTL that removes them
// Options.Retention after their window ends; on a bucket without TTLs the sidecars
// that held a key delete it. A sidecar that dies holding a lease loses it until the
// window ends: the fleet may under-admit by that much, never over-admit.
package quota
