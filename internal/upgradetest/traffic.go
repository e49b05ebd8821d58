// What users do during the roll: HTTP requests through the load balancer
// and paced DERP flows between clients on different replicas.

package upgradetest

import (
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder-ha/coder/internal/derptest"
)

// load sends GET /api/v2/buildinfo through the load balancer from two
// workers, 5 ms apart each, and counts what did not answer 200.
type load struct {
	sent, failed atomic.Int64
	mu           sync.Mutex
	msgs         []string
	done         chan struct{}
	wg           sync.WaitGroup
	once         sync.Once
}

func startLoad(lbURL string) *load {
	l := &load{done: make(chan struct{})}
	client := &http.Client{Timeout: 5 * time.Second}
	for w := 0; w < 2; w++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.done:
					return
				case <-time.After(5 * time.Millisecond):
				}
				l.sent.Add(1)
				resp, err := client.Get(lbURL + "/api/v2/buildinfo")
				switch {
				case err != nil:
					l.fail(err.Error())
				case resp.StatusCode != http.StatusOK:
					l.fail(resp.Status)
				}
				if resp != nil {
					resp.Body.Close()
				}
			}
		}()
	}
	return l
}

func (l *load) fail(msg string) {
	l.failed.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.msgs) < 20 {
		l.msgs = append(l.msgs, time.Now().Format("15:04:05.000")+" "+msg)
	}
}

func (l *load) failures() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.msgs...)
}

func (l *load) stop() {
	l.once.Do(func() { close(l.done) })
	l.wg.Wait()
}

// flows keeps paced packet flows in a ring over a set of DERP clients
// (each on its own replica), so every replica sends to and receives from
// another one; set replaces the ring.
type flows struct {
	active     []*flow
	sent, lost int
}

type flow struct {
	a, b       *derptest.Client
	stop, done chan struct{}
	sent, lost int
}

func (f *flows) set(clients []*derptest.Client) {
	f.stopAll()
	if len(clients) < 2 {
		return
	}
	for i, a := range clients {
		b := clients[(i+1)%len(clients)]
		if len(clients) == 2 && i == 1 {
			b = clients[0]
		}
		fl := &flow{a: a, b: b, stop: make(chan struct{}), done: make(chan struct{})}
		f.active = append(f.active, fl)
		go fl.run()
	}
}

func (f *flows) stopAll() {
	for _, fl := range f.active {
		close(fl.stop)
	}
	for _, fl := range f.active {
		<-fl.done
		f.sent += fl.sent
		f.lost += fl.lost
	}
	f.active = nil
}

// run exchanges windows of packets, 32 at a time with a pause between, so
// that the relays' queues never overflow (real traffic is paced too).
func (fl *flow) run() {
	defer close(fl.done)
	for {
		select {
		case <-fl.stop:
			return
		case <-time.After(20 * time.Millisecond):
		}
		fl.lost += derptest.Exchange(fl.a, fl.b, 32, 256, 8, 3*time.Second)
		fl.sent += 32
	}
}
