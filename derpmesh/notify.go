package derpmesh

import "sync"

// Peer events delivered by the notifier.
const (
	eventBroken    = iota // OnPeerBroken
	eventConnected        // OnPeerConnected
)

// peerEvent is one callback owed for a relay URL.
type peerEvent struct {
	url  string
	kind int
}

// notifier delivers OnPeerBroken and OnPeerConnected calls from one
// goroutine, so peers never wait on the owner's callbacks and the callbacks
// never run concurrently. An event already pending for a URL is not queued
// twice.
type notifier struct {
	fns [2]func(string) // by event kind; nil: not wanted

	mu      sync.Mutex
	pending []peerEvent
	queued  map[peerEvent]bool
	closed  bool
	wake    chan struct{} // cap 1
	stop    chan struct{}
	done    chan struct{}
}

func newNotifier(broken, connected func(string)) *notifier {
	n := &notifier{
		fns:    [2]func(string){eventBroken: broken, eventConnected: connected},
		queued: map[peerEvent]bool{},
		wake:   make(chan struct{}, 1),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	if broken == nil && connected == nil {
		close(n.done)
		return n
	}
	go n.run()
	return n
}

// post queues the callback of kind for url. It never blocks.
func (n *notifier) post(url string, kind int) {
	if n.fns[kind] == nil {
		return
	}
	e := peerEvent{url: url, kind: kind}
	n.mu.Lock()
	if n.closed || n.queued[e] {
		n.mu.Unlock()
		return
	}
	n.queued[e] = true
	n.pending = append(n.pending, e)
	n.mu.Unlock()
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

func (n *notifier) run() {
	defer close(n.done)
	for {
		select {
		case <-n.stop:
			return
		case <-n.wake:
		}
		for {
			n.mu.Lock()
			if n.closed || len(n.pending) == 0 {
				n.mu.Unlock()
				break
			}
			e := n.pending[0]
			n.pending = n.pending[1:]
			delete(n.queued, e)
			n.mu.Unlock()
			n.fns[e.kind](e.url)
		}
	}
}

// close drops pending calls and waits for a call in progress to return.
func (n *notifier) close() {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		<-n.done
		return
	}
	n.closed = true
	n.pending = nil
	n.mu.Unlock()
	if n.fns[eventBroken] != nil || n.fns[eventConnected] != nil {
		close(n.stop)
	}
	<-n.done
}
