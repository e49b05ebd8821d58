//go:build !race

package relayguard

const raceEnabled = false
