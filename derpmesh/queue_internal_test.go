package derpmesh

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"tailscale.com/types/key"
)

// queueOnly is a forwarder whose writer never runs, so a test can look at
// the queue itself.
func queueOnly(size int) (*forwarder, prometheus.Counter) {
	dropped := prometheus.NewCounter(prometheus.CounterOpts{Name: "dropped"})
	// started: as if its writer ran, so the first packet starts none.
	return &forwarder{max: size, dropped: dropped, wake: make(chan struct{}, 1), started: true}, dropped
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}

// An idle mesh link holds no queue: in a fleet of N replicas each one has
// N-1 forwarders, nearly all idle, and a preallocated 1024-slot queue (plus
// the writer's batch) cost 180 KB each.
func TestIdleForwarderHoldsNoQueueMemory(t *testing.T) {
	f := newForwarder(nil, nil, DefaultOptions.ForwardQueueSize, prometheus.NewCounter(prometheus.CounterOpts{Name: "d"}), "idle")
	defer f.close()
	f.mu.Lock()
	held := cap(f.ring)
	f.mu.Unlock()
	if held != 0 {
		t.Fatalf("an idle forwarder holds a %d-packet queue, want none", held)
	}
}

// The queue grows as packets wait, keeps them in order across growth, and
// at its size drops the oldest (counted); once drained, a grown queue is
// released.
func TestForwarderQueueGrowsKeepsOrderDropsOldestAndShrinks(t *testing.T) {
	f, dropped := queueOnly(100)
	src, dst := key.NewNode().Public(), key.NewNode().Public()
	for i := 0; i < 250; i++ {
		if err := f.ForwardPacket(src, dst, []byte{byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if got := counterValue(dropped); got != 150 {
		t.Fatalf("dropped %v packets, want 150 (the oldest beyond the queue of 100)", got)
	}
	batch := f.take(nil)
	if len(batch) != 100 {
		t.Fatalf("took %d packets, want 100", len(batch))
	}
	for i, p := range batch {
		if want := byte(150 + i); p.payload[0] != want {
			t.Fatalf("packet %d is %d, want %d: order lost", i, p.payload[0], want)
		}
	}
	if f.take(nil); cap(f.ring) != 0 {
		t.Fatalf("a drained queue of %d slots was kept, want it released", cap(f.ring))
	}
	// Small queues are kept: a link with steady light traffic does not
	// reallocate on every packet.
	for i := 0; i < 10; i++ {
		_ = f.ForwardPacket(src, dst, []byte{byte(i)})
	}
	f.take(nil)
	f.take(nil)
	if cap(f.ring) == 0 || cap(f.ring) > keepRing {
		t.Fatalf("after light traffic the queue has %d slots, want a small one kept", cap(f.ring))
	}
}
