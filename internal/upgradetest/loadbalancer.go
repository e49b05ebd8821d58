// The load balancer in front of the rolling cluster: a real HAProxy and
// what its stats page says of each server.

package upgradetest

import (
	"bufio"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/wait"
)

// startLoadBalancer runs HAProxy in front of every old and new port (the
// new ones are down until their replicas start and pass /readyz) and
// waits until it routes to the old ones and holds the new ones down.
func startLoadBalancer(t testing.TB, haproxy string, oldPorts, newPorts []int) string {
	var servers strings.Builder
	for i, p := range oldPorts {
		fmt.Fprintf(&servers, "    server old-%d 127.0.0.1:%d check\n", i+1, p)
	}
	for i, p := range newPorts {
		fmt.Fprintf(&servers, "    server new-%d 127.0.0.1:%d check\n", i+1, p)
	}
	lbPort, statsPort := clitest.FreePort(t), clitest.FreePort(t)
	clitest.StartHAProxy(t, haproxy, clitest.HAProxyConfig(lbPort, statsPort, servers.String()))
	statsURL := fmt.Sprintf("http://127.0.0.1:%d/stats;csv", statsPort)
	ok := wait.Until(30*time.Second, func() bool {
		st := serverStates(statsURL)
		for i := range oldPorts {
			if !strings.HasPrefix(st[fmt.Sprintf("old-%d", i+1)], "UP") {
				return false
			}
		}
		for i := range newPorts {
			if !strings.HasPrefix(st[fmt.Sprintf("new-%d", i+1)], "DOWN") {
				return false
			}
		}
		return true
	})
	if !ok {
		t.Fatalf("haproxy did not settle: %v", serverStates(statsURL))
	}
	return "http://127.0.0.1:" + strconv.Itoa(lbPort)
}

// serverStates reads HAProxy's CSV stats: server name → status.
func serverStates(statsURL string) map[string]string {
	out := map[string]string{}
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Get(statsURL)
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	status := -1
	for sc.Scan() {
		f := strings.Split(sc.Text(), ",")
		if strings.HasPrefix(sc.Text(), "# ") {
			for i, name := range f {
				if name == "status" {
					status = i
				}
			}
			continue
		}
		if status >= 0 && len(f) > status && f[0] == "coder" {
			out[f[1]] = f[status]
		}
	}
	return out
}
