//go:build bench

// Forwarding across a SIGSTOPped peer, and summing a metric's series.

package bench_test

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
)

// sigstopForwarding: three replicas; a client on replica 1 streams ~10 MB/s
// to a client on replica 3, which is then SIGSTOPped, while it exchanges
// windowed packets with a client on replica 2. Row: a→b throughput while
// replica 3 is stopped, relative to before; and the drops replica 1
// counted for replica 3.
func sigstopForwarding(t *testing.T) []Row {
	pg := dbtest.NewURL(t)
	promPort := clitest.FreePort(t)
	c := clitest.NewCluster(t, pg)
	defer c.StopAll()
	r1 := c.Add("CODER_PROMETHEUS_ENABLE=true", fmt.Sprintf("CODER_PROMETHEUS_ADDRESS=127.0.0.1:%d", promPort))
	r2, r3 := c.Add(), c.Add()
	c.WaitReady(2 * time.Minute)
	a, b, cc := connectRetry(r1.URL, 20*time.Second), connectRetry(r2.URL, 20*time.Second), connectRetry(r3.URL, 20*time.Second)
	if a == nil || b == nil || cc == nil {
		t.Fatal("sigstop: cannot connect clients")
	}
	defer a.Close()
	defer b.Close()
	defer cc.Close()
	if !derptest.Reachable(a, b, 20*time.Second) || !derptest.Reachable(a, cc, 20*time.Second) {
		t.Fatal("sigstop: clients cannot reach each other")
	}
	const packets = 5000
	exchange := func() float64 {
		start := time.Now()
		lost := derptest.Exchange(a, b, packets, 1024, 24, 2*time.Second)
		return float64(packets-lost) * 1024 / time.Since(start).Seconds() / 1e6
	}
	var before, during []float64
	for i := 0; i < runs; i++ {
		before = append(before, exchange())
	}
	r3.Signal(syscall.SIGSTOP)
	defer r3.Signal(syscall.SIGCONT)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		payload := make([]byte, 1024)
		for ctx.Err() == nil {
			for i := 0; i < 10; i++ {
				_ = a.Send(cc.Key, payload)
			}
			time.Sleep(time.Millisecond)
		}
	}()
	time.Sleep(1500 * time.Millisecond) // the kernel buffers toward replica 3 fill
	for i := 0; i < runs; i++ {
		during = append(during, exchange())
	}
	cancel()
	wg.Wait()
	dropped := scrapeSum(fmt.Sprintf("http://127.0.0.1:%d/metrics", promPort), "coderd_derpmesh_forward_dropped_total")
	med := func(v []float64) float64 { return summarize(Row{Samples: v}, "", 0).Median }
	ratio := med(during) / med(before)
	return []Row{
		summarize(Row{Measurement: "forwarding with one peer SIGSTOPped: a→b throughput before", Unit: "MB/s", Samples: before}, "higher", 0),
		summarize(Row{Measurement: "forwarding with one peer SIGSTOPped: a→b throughput while a streams to the stopped peer", Unit: "MB/s", Samples: during,
			Note: fmt.Sprintf("replica 1 counted %.0f packets dropped for the stopped peer (coderd_derpmesh_forward_dropped_total)", dropped)}, "higher", 0),
		summarize(Row{Measurement: "forwarding with one peer SIGSTOPped: during / before", Unit: "×", Samples: []float64{ratio}, Target: "≥ 0.8× (unchanged)"}, "higher", 0.8),
	}
}

// scrapeSum adds up every series of a metric in a Prometheus text page.
func scrapeSum(url, name string) float64 {
	resp, err := http.Get(url)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, name+"{") || strings.HasPrefix(l, name+" ") {
			f := strings.Fields(l)
			v, _ := strconv.ParseFloat(f[len(f)-1], 64)
			sum += v
		}
	}
	return sum
}
