package clitest

import (
	"net"
	"strconv"
	"testing"
)

// A hundred replicas' ports: all distinct, all bindable, none in the
// ephemeral range an outgoing connection could take them from.
func TestFreePortHandsOutDistinctPortsOutsideTheEphemeralRange(t *testing.T) {
	lo := ephemeralLow()
	seen := map[int]bool{}
	for i := 0; i < 100; i++ {
		p := FreePort(t)
		if seen[p] {
			t.Fatalf("port %d handed out twice", p)
		}
		seen[p] = true
		if lo > portRangeLow+1000 && (p < portRangeLow || p >= lo) {
			t.Fatalf("port %d is outside %d-%d", p, portRangeLow, lo-1)
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			t.Fatalf("port %d cannot be bound: %v", p, err)
		}
		_ = l.Close()
	}
}

// A reserved port is not handed out again while its test runs, even to a
// caller that does not know about it (the reservation is a file lock, so
// it holds across test processes too).
func TestReservedPortIsNotHandedOutAgain(t *testing.T) {
	held := map[int]bool{}
	t.Run("holder", func(t *testing.T) {
		for i := 0; i < 50; i++ {
			held[FreePort(t)] = true
		}
		for i := 0; i < 200; i++ {
			if p := FreePort(t); held[p] {
				t.Fatalf("reserved port %d handed out again", p)
			}
		}
	})
}
