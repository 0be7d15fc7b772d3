// Package e2e holds gatehouse's end-to-end tests: whole sidecars (the built binary, or
// internal/sidecar in process) against a real nats-server with JetStream, real Badger in
// temporary directories, a real echo upstream and, for the Flexprice bridge, the
// in-process Flexprice API of internal/flexpricetest, all over real HTTP on 127.0.0.1.
//
// The tests check the contracts of DESIGN.md sections 1, 7, 9 and 10 from the outside:
// usage is published to GATEHOUSE_USAGE exactly once across SIGKILLs, NATS outages
// longer than the stream's duplicate window and restarts with an undrained outbox; the
// replica keeps serving decisions while NATS is away and catches up when it returns; and
// a customer defined in Flexprice flows through the bridge into a sidecar's decisions,
// and its usage back into Flexprice events.
//
// The package holds tests only; nothing may import it.
package e2e
