//go:build !race

package e2e

// raceEnabled is set when the tests run with the race detector.
const raceEnabled = false
