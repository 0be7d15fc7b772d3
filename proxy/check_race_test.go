//go:build race

package proxy

// chkRace is true under the race detector, which makes sync.Pool drop items on purpose,
// so that allocation counts mean nothing.
const chkRace = true
