package e2e_test

import (
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
)

func needHAProxy(t *testing.T) string { return clitest.NeedHAProxy(t) }

// startHAProxy runs haproxy with config until the test ends.
func startHAProxy(t *testing.T, haproxy, config string) { clitest.StartHAProxy(t, haproxy, config) }

// The documented example is a valid HAProxy configuration.
func TestHAProxyExampleConfigIsValid(t *testing.T) {
	t.Parallel()
	haproxy := needHAProxy(t)
	_, file, _, _ := runtime.Caller(0)
	cfg := filepath.Join(filepath.Dir(file), "..", "..", "docs", "examples", "haproxy.cfg")
	out, err := exec.Command(haproxy, "-c", "-f", cfg).CombinedOutput()
	if err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
}

// Three replicas behind real HAProxy, restarted one after the other
// (SIGTERM, start again) while HTTP requests and two DERP clients keep
// going through the load balancer: no HTTP request fails, and the DERP
// clients reach each other again within a few seconds of each restart.
// The grace period (2s) is longer than HAProxy's detection time
// (inter 250ms × fall 2, plus one interval of phase).
func TestRollingRestartBehindHAProxyLosesNoRequests(t *testing.T) {
	t.Parallel()
	haproxy := needHAProxy(t)
	pg := dbtest.NewURL(t)
	const grace = "2s"

	ports := []int{clitest.FreePort(t), clitest.FreePort(t), clitest.FreePort(t)}
	startReplica := func(i int) *clitest.Process {
		return clitest.StartReplica(t, clitest.ReplicaOptions{
			Name: fmt.Sprintf("coder-%d", i+1), PostgresURL: pg, Port: ports[i],
			Env: []string{"CODER_SHUTDOWN_GRACE_PERIOD=" + grace},
		})
	}
	replicas := make([]*clitest.Process, 3)
	var servers strings.Builder
	for i := range replicas {
		replicas[i] = startReplica(i)
		fmt.Fprintf(&servers, "    server coder-%d 127.0.0.1:%d check\n", i+1, ports[i])
	}
	for _, r := range replicas {
		r.WaitReady(90 * time.Second)
	}

	lbPort := clitest.FreePort(t)
	startHAProxy(t, haproxy, clitest.HAProxyConfig(lbPort, 0, servers.String()))
	lbURL := "http://127.0.0.1:" + strconv.Itoa(lbPort)
	lbProc := &clitest.Process{URL: lbURL}
	if !clitest.Eventually(10*time.Second, func() bool { return lbProc.Status("/readyz") == http.StatusOK }) {
		t.Fatal("haproxy does not route to the replicas")
	}

	// Steady HTTP load through the load balancer, bounded in time.
	var (
		sent, failed atomic.Int64
		failures     sync.Map
		stopLoad     = make(chan struct{})
		loadDone     sync.WaitGroup
	)
	client := &http.Client{Timeout: 5 * time.Second}
	for w := 0; w < 2; w++ {
		loadDone.Add(1)
		go func() {
			defer loadDone.Done()
			deadline := time.Now().Add(3 * time.Minute)
			for time.Now().Before(deadline) {
				select {
				case <-stopLoad:
					return
				default:
				}
				sent.Add(1)
				resp, err := client.Get(lbURL + "/api/v2/buildinfo")
				if err != nil {
					failed.Add(1)
					failures.Store(time.Now().Format(time.RFC3339Nano), err.Error())
				} else {
					if resp.StatusCode != http.StatusOK {
						failed.Add(1)
						failures.Store(time.Now().Format(time.RFC3339Nano), resp.Status)
					}
					resp.Body.Close()
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a, err := derptest.Connect(ctx, lbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := derptest.Connect(ctx, lbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if !derptest.Reachable(a, b, 5*time.Second) {
		t.Fatal("DERP clients behind haproxy cannot reach each other")
	}

	for i := range replicas {
		replicas[i].Signal(syscall.SIGTERM)
		if code := replicas[i].Wait(30 * time.Second); code != 0 {
			t.Fatalf("coder-%d exit %d after SIGTERM", i+1, code)
		}
		restarted := time.Now()
		replicas[i] = startReplica(i)
		replicas[i].WaitReady(60 * time.Second)
		// Both directions: a client whose replica went away reconnects
		// through haproxy to another one.
		if !derptest.Reachable(a, b, 10*time.Second) || !derptest.Reachable(b, a, 10*time.Second) {
			t.Fatalf("after restarting coder-%d the DERP clients did not reach each other again", i+1)
		}
		t.Logf("coder-%d restarted; DERP clients reach each other %s after it stopped", i+1, time.Since(restarted).Round(time.Millisecond))
	}
	close(stopLoad)
	loadDone.Wait()
	if failed.Load() != 0 {
		failures.Range(func(k, v any) bool { t.Logf("%s: %s", k, v); return true })
		t.Fatalf("%d of %d HTTP requests failed during the rolling restart", failed.Load(), sent.Load())
	}
	t.Logf("%d HTTP requests through haproxy during 3 restarts, none failed", sent.Load())
}
