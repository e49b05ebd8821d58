package e2e_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/coderd"
	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/derptest"
	"github.com/coder-ha/coder/internal/wait"
)

// secretVolume is a directory laid out the way the kubelet mounts a
// Secret: the key is a symlink through ..data to a timestamped directory,
// and an update writes a new directory and swaps ..data atomically.
type secretVolume struct {
	t   *testing.T
	dir string
	n   int
}

func newSecretVolume(t *testing.T, key, value string) (*secretVolume, string) {
	t.Helper()
	v := &secretVolume{t: t, dir: t.TempDir()}
	v.write(key, value)
	if err := os.Symlink(filepath.Join("..data", key), filepath.Join(v.dir, key)); err != nil {
		t.Fatal(err)
	}
	return v, filepath.Join(v.dir, key)
}

// write puts value under key in a new timestamped directory and points
// ..data at it with one rename, removing the previous directory.
func (v *secretVolume) write(key, value string) {
	v.t.Helper()
	v.n++
	ts := fmt.Sprintf("..%s.%d", time.Now().UTC().Format("2006_01_02_15_04_05"), v.n)
	if err := os.Mkdir(filepath.Join(v.dir, ts), 0o755); err != nil {
		v.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(v.dir, ts, key), []byte(value+"\n"), 0o644); err != nil {
		v.t.Fatal(err)
	}
	old, _ := os.Readlink(filepath.Join(v.dir, "..data"))
	tmp := filepath.Join(v.dir, "..data_tmp")
	if err := os.Symlink(ts, tmp); err != nil {
		v.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(v.dir, "..data")); err != nil {
		v.t.Fatal(err)
	}
	if old != "" {
		_ = os.RemoveAll(filepath.Join(v.dir, old))
	}
}

// listsAtLeast reports whether p's /api/v2/replicas lists every one of ids.
func listsAtLeast(p *clitest.Process, token string, ids ...string) bool {
	var rs []coderd.Replica
	if p.GetJSON("/api/v2/replicas", token, &rs) != 200 {
		return false
	}
	have := map[string]bool{}
	for _, r := range rs {
		have[r.ID.String()] = true
	}
	for _, id := range ids {
		if !have[id] {
			return false
		}
	}
	return true
}

func randomHex(t *testing.T) string {
	t.Helper()
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// The database password is rotated under two running replicas, twice,
// through --postgres-url-file on a Secret-like volume:
//
//  1. as an operator would: ALTER ROLE … PASSWORD, the file swapped the
//     way the kubelet swaps it, then every backend of the role terminated;
//  2. with the swap late: ALTER ROLE, every backend terminated, and only
//     then the file swapped. Meanwhile Postgres refuses the old password:
//     each replica says so (without the password) and serves on as in an
//     outage.
//
// Throughout, no replica exits, none drops its peer, and no packet between
// DERP clients on the two replicas is lost. A replica started afterwards
// joins with the new password. No password appears in any output.
func TestRotatedPasswordTakesEffectWithoutARestart(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	role := "rot_" + randomHex(t)[:12]
	var admin string
	t.Cleanup(func() { // after the database is dropped (cleanups run last first)
		if conn, err := pgx.Connect(ctx, admin); err == nil {
			_, _ = conn.Exec(ctx, "DROP ROLE IF EXISTS "+role)
			_ = conn.Close(ctx)
		}
	})
	admin = dbtest.NewEmptyURL(t)
	adminConn, err := pgx.Connect(ctx, admin)
	if err != nil {
		t.Fatal(err)
	}
	defer adminConn.Close(ctx)
	au, _ := url.Parse(admin)
	dbName := strings.TrimPrefix(au.Path, "/")
	exec := func(sql string) {
		t.Helper()
		if _, err := adminConn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	roleURL := func(password string) string {
		u := *au
		u.User = url.UserPassword(role, password)
		return u.String()
	}
	passwords := []string{"old" + randomHex(t), "new" + randomHex(t), "newer" + randomHex(t)}
	exec(fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'", role, passwords[0]))
	exec(fmt.Sprintf("ALTER DATABASE %s OWNER TO %s", dbName, role))
	secret, file := newSecretVolume(t, "url", roleURL(passwords[0]))

	// The role migrates (and owns) the schema.
	r1 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r1", PostgresURLFile: file})
	r1.WaitReady(60 * time.Second)
	r2 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r2", PostgresURLFile: file})
	r2.WaitReady(60 * time.Second)
	nodes := []*clitest.Process{r1, r2}
	token := clitest.CreateToken(t, admin)
	ids := map[*clitest.Process]string{}
	for _, n := range nodes {
		var info coderd.BuildInfo
		n.GetJSON("/api/v2/buildinfo", "", &info)
		ids[n] = info.ReplicaID.String()
	}
	wait.For(t, 15*time.Second, "r1 and r2 list each other", func() bool {
		return listsIDs(r1, token, ids[r1], ids[r2]) && listsIDs(r2, token, ids[r1], ids[r2])
	})

	// Traffic between clients on the two replicas, and a watch on exits
	// and membership, for the whole rotation.
	a, b := connectClient(t, r1), connectClient(t, r2)
	if !derptest.Reachable(a, b, 10*time.Second) || !derptest.Reachable(b, a, 10*time.Second) {
		t.Fatal("not meshed")
	}
	var stop atomic.Bool
	var lost, sent atomic.Int64
	var dropped atomic.Value // string: what was seen
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			lost.Add(int64(derptest.Exchange(a, b, 50, 512, 10, 3*time.Second) + derptest.Exchange(b, a, 50, 512, 10, 3*time.Second)))
			sent.Add(100)
		}
	}()
	go func() {
		defer wg.Done()
		for !stop.Load() {
			for _, n := range nodes {
				if n.Exited() {
					dropped.Store(n.Name + " exited")
				} else if !listsAtLeast(n, token, ids[r1], ids[r2]) {
					dropped.Store(n.Name + " does not list both replicas")
				}
			}
			time.Sleep(100 * time.Millisecond) // a sampling period, not a synchronization
		}
	}()

	// beatAfter: every replica's row was written after since (by the
	// database clock), i.e. through a connection opened after it.
	beatAfter := func(since time.Time, ns ...*clitest.Process) func() bool {
		return func() bool {
			for _, n := range ns {
				var at time.Time
				if err := adminConn.QueryRow(ctx, "SELECT updated_at FROM replicas WHERE id = $1", ids[n]).Scan(&at); err != nil || !at.After(since) {
					return false
				}
			}
			return true
		}
	}
	now := func() time.Time {
		var at time.Time
		if err := adminConn.QueryRow(ctx, "SELECT now()").Scan(&at); err != nil {
			t.Fatal(err)
		}
		return at
	}
	terminate := func() {
		t.Helper()
		var n int
		if err := adminConn.QueryRow(ctx, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1", role).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			t.Fatal("no backend of the role to terminate")
		}
	}

	// 1. ALTER ROLE, swap, terminate.
	exec(fmt.Sprintf("ALTER ROLE %s PASSWORD '%s'", role, passwords[1]))
	secret.write("url", roleURL(passwords[1]))
	terminate()
	swapped := now()
	wait.For(t, 30*time.Second, "both replicas beat through new connections with the new password", beatAfter(swapped, r1, r2))

	// 2. ALTER ROLE, terminate, and the swap only later: refused meanwhile.
	exec(fmt.Sprintf("ALTER ROLE %s PASSWORD '%s'", role, passwords[2]))
	terminate()
	for _, n := range nodes {
		wait.For(t, 20*time.Second, n.Name+" logs that postgres refused the password", func() bool {
			return strings.Contains(n.Output(), "postgres refused the password")
		})
	}
	for _, n := range nodes {
		wait.For(t, 20*time.Second, n.Name+" reports its heartbeats failing (an outage, as it sees it)", func() bool {
			var h coderd.HealthReport
			return n.GetJSON("/api/v2/debug/health", token, &h) == 200 && !h.Database.Healthy
		})
	}
	secret.write("url", roleURL(passwords[2]))
	swapped = now()
	wait.For(t, 30*time.Second, "both replicas beat again once the file holds the new password", beatAfter(swapped, r1, r2))
	for _, n := range nodes {
		wait.For(t, 10*time.Second, n.Name+" logs that the credentials work again", func() bool {
			return strings.Contains(n.Output(), "accepts this replica's credentials again")
		})
	}

	// 3. A replica started now joins with the file's (new) password.
	r3 := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r3", PostgresURLFile: file})
	r3.WaitReady(60 * time.Second)
	var info coderd.BuildInfo
	r3.GetJSON("/api/v2/buildinfo", "", &info)
	all := []string{ids[r1], ids[r2], info.ReplicaID.String()}
	wait.For(t, 15*time.Second, "all three list all three", func() bool {
		return listsIDs(r1, token, all...) && listsIDs(r2, token, all...) && listsIDs(r3, token, all...)
	})

	stop.Store(true)
	wg.Wait()
	if d, _ := dropped.Load().(string); d != "" {
		t.Errorf("during the rotation: %s", d)
	}
	if n := lost.Load(); n != 0 {
		t.Errorf("%d of %d packets between clients on r1 and r2 were lost during the rotation", n, sent.Load())
	}
	t.Logf("%d packets exchanged between r1's and r2's clients during the rotation, %d lost", sent.Load(), lost.Load())
	for _, n := range append(nodes, r3) {
		out := n.Output()
		for _, pw := range passwords {
			if strings.Contains(out, pw) {
				t.Errorf("%s printed a password", n.Name)
			}
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "refused the password") {
				t.Logf("%s: %s", n.Name, l)
			}
		}
	}
}
