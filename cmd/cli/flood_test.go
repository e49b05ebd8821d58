package cli_test

import (
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/wait"
)

// Loopback addresses standing for two hosts: Linux routes all of
// 127.0.0.0/8 to loopback, so the flood and the kubelet come from
// different source addresses, as they do in a cluster.
const (
	floodIP   = "127.0.0.2"
	kubeletIP = "127.0.0.3"
)

// A connection flood from one address, faster than the bound on
// unfinished connections (1000) can age past its 3 s grace, must not cost
// the replica its kubelet probes: a failed readiness probe takes the pod
// out of the load balancer, failed liveness probes restart it, and either
// turns a flood into an outage. With a real server: /healthz and /readyz
// from another address answer 200 throughout.
func TestHealthProbesAnswerDuringAConnectionFlood(t *testing.T) {
	t.Parallel()
	r := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURL: dbtest.NewURL(t)})
	r.WaitReady(60 * time.Second)
	u, err := url.Parse(r.URL)
	if err != nil {
		t.Fatal(err)
	}

	// The flood: connections opened as fast as four dialers can, held
	// silent (each dialer keeps its newest 400).
	done := make(chan struct{})
	var wg sync.WaitGroup
	var dialed atomic.Int64
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(floodIP)}, Timeout: 5 * time.Second}
			var held []net.Conn
			defer func() {
				for _, nc := range held {
					_ = nc.Close()
				}
			}()
			for {
				select {
				case <-done:
					return
				default:
				}
				nc, err := d.Dial("tcp", u.Host)
				if err != nil {
					continue
				}
				dialed.Add(1)
				held = append(held, nc)
				if len(held) > 400 {
					_ = held[0].Close()
					held = held[1:]
				}
			}
		}()
	}
	stop := sync.OnceFunc(func() { close(done); wg.Wait() })
	t.Cleanup(stop)
	wait.For(t, 60*time.Second, "the flood to fill the bound", func() bool { return dialed.Load() > 5000 })

	tr := &http.Transport{
		DisableKeepAlives: true, // a kubelet probe is one request on a new connection
		DialContext:       (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(kubeletIP)}, Timeout: 5 * time.Second}).DialContext,
	}
	kubelet := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	var failures []string
	for i := 0; i < 20; i++ {
		for _, path := range []string{"/healthz", "/readyz"} {
			res, err := kubelet.Get(r.URL + path)
			switch {
			case err != nil:
				failures = append(failures, path+": "+err.Error())
			case res.StatusCode != http.StatusOK:
				failures = append(failures, path+": "+res.Status)
			}
			if err == nil {
				_ = res.Body.Close()
			}
		}
	}
	n := dialed.Load()
	stop()
	t.Logf("the flood opened %d connections; %d of 40 probes failed", n, len(failures))
	if len(failures) > 0 {
		t.Fatalf("kubelet probes failed during a connection flood from another address:\n%s", strings.Join(failures, "\n"))
	}
	if code := r.Status("/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz after the flood: %d", code)
	}
}
