// Package limiter is gatehouse's decision engine: the entitlement model of a customer
// (boolean, metered, static and config features; finite or unlimited limits; hard or soft),
// the usage windows that metered features reset on, the usage counters per (customer,
// feature, window), and reservations that are committed or refunded once the upstream has
// answered.
//
// The package does no I/O. It reads snapshots through [Source], which the replica
// implements, and reports committed usage to its caller, which makes it durable. Every
// method on the request path is safe for concurrent use, takes no lock held across work and
// allocates nothing once a customer's counters exist.
package limiter
