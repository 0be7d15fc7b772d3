//go:build !race

package proxy

// chkRace is true under the race detector; see check_race_test.go.
const chkRace = false
