//go:build ha

package hatest_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/database/postgres"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/faultproxy"
)

// asPostgres runs a server binary as the postgres user when we are root
// (Postgres refuses to run as root), as the postgres package does.
func asPostgres(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if os.Geteuid() != 0 {
		return
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
}

// findBasebackup finds pg_basebackup beside the server binaries the
// postgres package uses (following a symlinked bin directory), or on PATH.
func findBasebackup(t *testing.T) string {
	t.Helper()
	bin, err := postgres.FindBinDir()
	if err != nil {
		t.Fatal(err)
	}
	candidates := []string{filepath.Join(bin, "pg_basebackup")}
	if real, err := filepath.EvalSymlinks(filepath.Join(bin, "initdb")); err == nil {
		candidates = append(candidates, filepath.Join(filepath.Dir(real), "pg_basebackup"))
	}
	for _, c := range candidates {
		if _, err := os.Stat(c); err == nil {
			return c
		}
	}
	if p, err := exec.LookPath("pg_basebackup"); err == nil {
		return p
	}
	t.Fatalf("pg_basebackup not found (looked in %v and on PATH); it ships with the PostgreSQL client package", candidates)
	return ""
}

// startStandby makes a streaming standby of primary (pg_basebackup -R) and
// starts it as its own cluster, with the same superuser and password.
func startStandby(t *testing.T, primary *postgres.Cluster) *postgres.Cluster {
	t.Helper()
	basebackup := findBasebackup(t)
	dir, err := os.MkdirTemp("", "coder-test-standby-*")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	pu, _ := url.Parse(primary.URL())
	password, _ := pu.User.Password()
	if err := os.WriteFile(filepath.Join(dir, "password"), []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		u, _ := user.Lookup("postgres")
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		for _, p := range []string{dir, filepath.Join(dir, "password")} {
			if err := os.Chown(p, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
	}
	cmd := exec.Command(basebackup, "-D", filepath.Join(dir, "data"), "-R", "-X", "stream", "-c", "fast",
		"-d", primary.DatabaseURL("postgres"))
	cmd.Dir = os.TempDir()
	asPostgres(t, cmd)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("pg_basebackup: %v: %s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	standby, err := postgres.Run(ctx, postgres.Options{Dir: dir, Ephemeral: true})
	if err != nil {
		t.Fatalf("start standby: %v", err)
	}
	t.Cleanup(func() { _ = standby.Close() })
	return standby
}

func connect(t *testing.T, rawURL string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, rawURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return conn
}

// viaProxy is rawURL with its host replaced by the proxy's address.
func viaProxy(rawURL string, p *faultproxy.Proxy) string {
	u, _ := url.Parse(rawURL)
	u.Host = p.Addr()
	return u.String()
}

// A real failover behind one endpoint: the primary stops, the endpoint
// (a TCP proxy every replica uses) flips to the streaming standby while it
// is still read-only, then the standby is promoted. No replica exits,
// /readyz stays 200, DERP clients on different replicas keep exchanging
// packets throughout, replicas notice the read-only server (SQLSTATE
// 25006) and recycle their connections rather than retrying them forever,
// and the cluster is back in sync (every replica lists every other, every
// heartbeat lands on the new primary) within seconds of the promotion.
func TestFailoverToAPromotedStandbyKeepsTheClusterServing(t *testing.T) {
	t.Parallel()
	primary := dbtest.NewCluster(t)
	standby := startStandby(t, primary)
	endpoint, err := faultproxy.New(fmt.Sprintf("127.0.0.1:%d", primary.Port()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = endpoint.Close() })
	pg := viaProxy(primary.URL(), endpoint)
	token := clitest.CreateToken(t, pg)
	r1, r2, r3 := start(t, "r1", pg), start(t, "r2", pg), start(t, "r3", pg)
	ready(t, r1, r2, r3)
	nodes := []*node{r1, r2, r3}
	clients := map[string]*derptest.Client{"on-r1": client(t, r1), "on-r2": client(t, r2), "on-r3": client(t, r3)}
	for an, a := range clients {
		for bn, b := range clients {
			if a != b && !derptest.Reachable(a, b, 5*time.Second) {
				t.Fatalf("not meshed: %s→%s", an, bn)
			}
		}
	}
	// The standby has everything the replicas wrote so far.
	pconn := connect(t, primary.URL())
	sconn := connect(t, standby.URL())
	within(t, 10*time.Second, "the standby caught up", func() bool {
		var lsn string
		var caught bool
		ctx := context.Background()
		if pconn.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text").Scan(&lsn) != nil {
			return false
		}
		return sconn.QueryRow(ctx, "SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn", lsn).Scan(&caught) == nil && caught
	})

	// Packets and readiness are watched for the whole failover.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var problems []string
	var rounds int
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			for an, a := range clients {
				for bn, b := range clients {
					if a == b {
						continue
					}
					if lost := derptest.Exchange(a, b, 50, 512, 16, 2*time.Second); lost > 0 {
						mu.Lock()
						problems = append(problems, fmt.Sprintf("%s→%s lost %d of 50", an, bn, lost))
						mu.Unlock()
					}
				}
			}
			for _, n := range nodes {
				if n.Exited() {
					mu.Lock()
					problems = append(problems, n.Name+" exited")
					mu.Unlock()
				} else if code := n.Status("/readyz"); code != http.StatusOK {
					mu.Lock()
					problems = append(problems, fmt.Sprintf("%s /readyz = %d", n.Name, code))
					mu.Unlock()
				}
			}
			mu.Lock()
			rounds++
			mu.Unlock()
		}
	}()

	if err := primary.Stop(); err != nil {
		t.Fatal(err)
	}
	// The endpoint flips before the standby is promoted: every replica
	// now talks to a read-only server.
	endpoint.SetTarget(fmt.Sprintf("127.0.0.1:%d", standby.Port()))
	within(t, 15*time.Second, "a replica reports the read-only server and recycles its connections", func() bool {
		for _, n := range nodes {
			if strings.Contains(n.Output(), "recycling database connections") && strings.Contains(n.Output(), "read-only") {
				return true
			}
		}
		return false
	})
	within(t, 15*time.Second, "every replica's heartbeat fails on the read-only server", func() bool {
		for _, n := range nodes {
			if !strings.Contains(n.Output(), "SQLSTATE 25006") {
				return false
			}
		}
		return true
	})

	var promoted bool
	if err := sconn.QueryRow(context.Background(), "SELECT pg_promote(true, 60)").Scan(&promoted); err != nil || !promoted {
		t.Fatalf("promote: %v %v", promoted, err)
	}
	var promotedAt time.Time // on the new primary's clock
	if err := sconn.QueryRow(context.Background(), "SELECT now()").Scan(&promotedAt); err != nil {
		t.Fatal(err)
	}
	var firstBeat, firstListed time.Duration
	since := time.Now()
	took := within(t, 30*time.Second, "cluster back in sync after the promotion", func() bool {
		defer func() {
			var beaten int
			if firstBeat == 0 && sconn.QueryRow(context.Background(), "SELECT count(*) FROM replicas WHERE stopped_at IS NULL AND updated_at > $1", promotedAt).Scan(&beaten) == nil && beaten == 3 {
				firstBeat = time.Since(since)
			}
			if firstListed == 0 && len(replicas(r1, token)) == 3 && len(replicas(r2, token)) == 3 && len(replicas(r3, token)) == 3 {
				firstListed = time.Since(since)
			}
		}()
		var beaten int
		if sconn.QueryRow(context.Background(), "SELECT count(*) FROM replicas WHERE stopped_at IS NULL AND updated_at > $1", promotedAt).Scan(&beaten) != nil || beaten != 3 {
			return false
		}
		for _, n := range nodes {
			if len(replicas(n, token)) != 3 || !health(n, token).Database.Healthy {
				return false
			}
		}
		return true
	})
	t.Logf("all three rows re-beaten after %s; all listing three after %s", firstBeat.Round(time.Millisecond), firstListed.Round(time.Millisecond))
	if took > 2*time.Second {
		t.Logf("NOTE: back in sync %s after the promotion; the goal is 2s", took.Round(time.Millisecond))
	}
	// Keep exchanging a little past the resync, then check the record.
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	if len(problems) > 0 {
		t.Fatalf("during the failover: %s", strings.Join(problems, "; "))
	}
	t.Logf("%d rounds of packets along 6 pairs during the failover, none lost", rounds)
}
