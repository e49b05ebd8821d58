package derpmesh

import "sync"

// notifier delivers OnPeerBroken calls from one goroutine, so peers never
// wait on the owner's callback and the callback never runs concurrently.
// A URL already pending is not queued twice.
type notifier struct {
	fn func(string)

	mu      sync.Mutex
	pending []string
	queued  map[string]bool
	closed  bool
	wake    chan struct{} // cap 1
	stop    chan struct{}
	done    chan struct{}
}

func newNotifier(fn func(string)) *notifier {
	n := &notifier{
		fn:     fn,
		queued: map[string]bool{},
		wake:   make(chan struct{}, 1),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
	}
	if fn == nil {
		close(n.done)
		return n
	}
	go n.run()
	return n
}

// post queues a call for url. It never blocks.
func (n *notifier) post(url string) {
	if n.fn == nil {
		return
	}
	n.mu.Lock()
	if n.closed || n.queued[url] {
		n.mu.Unlock()
		return
	}
	n.queued[url] = true
	n.pending = append(n.pending, url)
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
			url := n.pending[0]
			n.pending = n.pending[1:]
			delete(n.queued, url)
			n.mu.Unlock()
			n.fn(url)
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
	if n.fn != nil {
		close(n.stop)
	}
	<-n.done
}
