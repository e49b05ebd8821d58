//go:build bench

// Relay throughput: cross-replica forwarding against one stand-alone derper,
// with TLS certificates made for the run; and the binary's footprint.

package bench_test

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/internal/testcert"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
)

// relay measures 1 KB packets between two clients (windowed, no drops): on
// the same replica, on two replicas, and on two derper processes meshed
// with --mesh-with, all over TLS with the same CA, in one run.
func relay(t *testing.T, dir, caPEM, certFile, keyFile string) []Row {
	derper := buildDerper(t, dir)
	meshKey := make([]byte, 32)
	_, _ = rand.Read(meshKey)
	pskFile := filepath.Join(dir, "mesh.key")
	_ = os.WriteFile(pskFile, []byte(hex.EncodeToString(meshKey)), 0o600)
	p1, p2 := clitest.FreePort(t), clitest.FreePort(t)
	startDerper := func(port, other int) {
		cfg := filepath.Join(dir, fmt.Sprintf("derper-%d.json", port))
		cmd := exec.Command(derper, "-a", fmt.Sprintf("127.0.0.1:%d", port), "-http-port", "-1", "-stun=false",
			"-certmode", "manual", "-certdir", filepath.Join(dir, "certs"), "-hostname", "127.0.0.1",
			"-c", cfg, "-mesh-psk-file", pskFile, "-mesh-with", fmt.Sprintf("127.0.0.1:%d,127.0.0.1:%d", port, other))
		cmd.Env = append(os.Environ(), "SSL_CERT_FILE="+caPEM)
		var out strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			if t.Failed() {
				t.Logf("derper %d:\n%s", port, out.String())
			}
		})
	}
	startDerper(p1, p2)
	startDerper(p2, p1)

	pg := dbtest.NewURL(t)
	profile := os.Getenv("BENCH_PROFILE") != ""
	var pprofPorts []int
	tlsReplica := func(name string) string {
		tlsPort := clitest.FreePort(t)
		relayURL := fmt.Sprintf("https://127.0.0.1:%d", tlsPort)
		env := []string{
			"CODER_TLS_ENABLE=true", fmt.Sprintf("CODER_TLS_ADDRESS=127.0.0.1:%d", tlsPort),
			"CODER_TLS_CERT_FILE=" + certFile, "CODER_TLS_KEY_FILE=" + keyFile,
			"CODER_DERP_SERVER_MESH_CA_FILE=" + caPEM,
		}
		if profile {
			port := clitest.FreePort(t)
			pprofPorts = append(pprofPorts, port)
			env = append(env, fmt.Sprintf("CODER_DEBUG_PPROF_ADDRESS=127.0.0.1:%d", port))
		}
		p := clitest.StartReplica(t, clitest.ReplicaOptions{Name: name, PostgresURL: pg, RelayURL: relayURL, Env: env})
		p.WaitReady(time.Minute)
		return relayURL
	}
	r1, r2 := tlsReplica("tls-1"), tlsReplica("tls-2")
	// A second pair meshed over plain HTTP (as inside a cluster, where the
	// chart's relay URLs are http://<pod IP>): the forwarder writes its
	// frames itself there.
	plain := clitest.NewCluster(t, dbtest.NewURL(t))
	defer plain.StopAll()
	h1, h2 := plain.Add(), plain.Add()
	plain.WaitReady(time.Minute)
	if profile {
		defer profileRelay(t, r1, r2, pprofPorts)
	}

	type pair struct {
		name string
		a, b string
	}
	pairs := []pair{
		{"same replica", r1, r1},
		{"two replicas (mesh)", r1, r2},
		{"two derpers (--mesh-with)", fmt.Sprintf("https://127.0.0.1:%d", p1), fmt.Sprintf("https://127.0.0.1:%d", p2)},
		{"one derper", fmt.Sprintf("https://127.0.0.1:%d", p1), fmt.Sprintf("https://127.0.0.1:%d", p1)},
		{"two replicas (mesh), plain HTTP", h1.URL, h2.URL},
	}
	const packets, window = 20000, 24
	tput := map[string][]float64{}
	lat := map[string][]float64{}
	losses := map[string]int{}
	for run := 0; run < runs; run++ {
		for _, p := range pairs { // interleaved, so the machine's state is shared fairly
			a, b := connectRetry(p.a, 20*time.Second), connectRetry(p.b, 20*time.Second)
			if a == nil || b == nil {
				t.Fatalf("%s: cannot connect", p.name)
			}
			if !derptest.Reachable(a, b, 10*time.Second) {
				t.Fatalf("%s: clients cannot reach each other", p.name)
			}
			start := time.Now()
			lost := derptest.Exchange(a, b, packets, 1024, window, 2*time.Second)
			secs := time.Since(start).Seconds()
			losses[p.name] += lost
			tput[p.name] = append(tput[p.name], float64(packets-lost)*1024/secs/1e6)
			var rtts []float64
			msg := make([]byte, 1024)
			for i := 0; i < 200; i++ {
				s := time.Now()
				_ = a.Send(b.Key, msg)
				if len(b.WaitPackets(a.Key, 1, time.Second)) == 0 {
					continue
				}
				_ = b.Send(a.Key, msg)
				if len(a.WaitPackets(b.Key, 1, time.Second)) == 0 {
					continue
				}
				rtts = append(rtts, ms(time.Since(s)))
			}
			sort.Float64s(rtts)
			if len(rtts) > 0 {
				lat[p.name] = append(lat[p.name], rtts[len(rtts)/2])
			}
			_ = a.Close()
			_ = b.Close()
		}
	}
	var rows []Row
	for _, p := range pairs {
		note := ""
		if losses[p.name] > 0 {
			note = fmt.Sprintf("%d packets lost in total", losses[p.name])
		}
		rows = append(rows, summarize(Row{Measurement: "relay throughput, 1 KB packets, " + p.name, Unit: "MB/s", Samples: tput[p.name], Note: note}, "higher", 0))
	}
	med := func(name string) float64 { return summarize(Row{Samples: tput[name]}, "", 0).Median }
	cross, same, derpers, one := med(pairs[1].name), med(pairs[0].name), med(pairs[2].name), med(pairs[3].name)
	rows = append(rows,
		summarize(Row{Measurement: "cross-replica / derper-pair throughput", Unit: "×", Samples: []float64{cross / derpers}, Target: "≥ 1.15×"}, "higher", 1.15),
		summarize(Row{Measurement: "cross-replica / one-derper throughput", Unit: "×", Samples: []float64{cross / one}, Target: "≥ 0.6×"}, "higher", 0.6),
		summarize(Row{Measurement: "cross-replica / same-replica throughput", Unit: "×", Samples: []float64{cross / same}}, "higher", 0),
	)
	for _, p := range pairs {
		rows = append(rows, summarize(Row{Measurement: "relay round trip, 1 KB, " + p.name, Unit: "ms", Samples: lat[p.name]}, "lower", 0))
	}
	latMed := func(name string) float64 { return summarize(Row{Samples: lat[name]}, "", 0).Median }
	rows = append(rows, summarize(Row{Measurement: "cross-replica / derper-pair round trip", Unit: "×",
		Samples: []float64{latMed(pairs[1].name) / latMed(pairs[2].name)}, Target: "≤ 1.0× (no worse)"}, "lower", 1.0))
	return rows
}

// profileRelay takes CPU profiles of both replicas while a client on the
// first streams windowed 1 KiB packets to a client on the second for 10 s
// (relay-cpu-replica1.pprof, relay-cpu-replica2.pprof).
func profileRelay(t *testing.T, r1, r2 string, ports []int) {
	a, b := connectRetry(r1, 20*time.Second), connectRetry(r2, 20*time.Second)
	if a == nil || b == nil {
		return
	}
	defer a.Close()
	defer b.Close()
	done := make(chan struct{})
	for i, port := range ports {
		go func() {
			saveProfile(t, port, "profile?seconds=10", fmt.Sprintf("relay-cpu-replica%d.pprof", i+1))
			done <- struct{}{}
		}()
	}
	deadline := time.Now().Add(11 * time.Second)
	for time.Now().Before(deadline) {
		derptest.Exchange(a, b, 5000, 1024, 24, 2*time.Second)
	}
	for range ports {
		<-done
	}
}

func buildDerper(t *testing.T, dir string) string {
	bin := filepath.Join(dir, "bin")
	cmd := exec.Command("go", "install", "tailscale.com/cmd/derper@v1.102.5")
	cmd.Env = append(os.Environ(), "GOBIN="+bin)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build derper: %v\n%s", err, out)
	}
	return filepath.Join(bin, "derper")
}

// footprint: idle RSS of a replica in a 3-replica cluster.
func footprint(t *testing.T) Row {
	c := clitest.NewCluster(t, dbtest.NewURL(t))
	defer c.StopAll()
	for i := 0; i < 3; i++ {
		c.Add().WaitReady(time.Minute)
	}
	time.Sleep(12 * time.Second) // a couple of beats: idle, steady state
	var rss []float64
	for _, n := range c.Nodes {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", n.Pid()))
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "VmRSS:") {
				kb, _ := strconv.ParseFloat(strings.Fields(l)[1], 64)
				rss = append(rss, kb/1024)
			}
		}
	}
	return summarize(Row{Measurement: "idle RSS per replica (3-replica cluster)", Unit: "MB", Samples: rss, Target: "≤ 40 MB"}, "lower", 40)
}

// writeCerts makes a CA and a certificate for 127.0.0.1, in the layout
// derper's manual cert mode expects (certs/127.0.0.1.crt and .key).
func writeCerts(t *testing.T, dir string) (caFile, certFile, keyFile string) {
	p := testcert.New(t)
	caFile = filepath.Join(dir, "ca.pem")
	certFile = filepath.Join(dir, "certs", "127.0.0.1.crt")
	keyFile = filepath.Join(dir, "certs", "127.0.0.1.key")
	p.WriteFiles(t, certFile, keyFile)
	if err := os.WriteFile(caFile, p.CAPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	return caFile, certFile, keyFile
}
