//go:build bench

// The benchmark's own Postgres with pg_stat_statements: statements and
// transactions per database, the server processes, the top statements.

package bench_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/database/postgres"
)

// statsPostgres is a dedicated Postgres with pg_stat_statements loaded, so
// the fleet rows count the replicas' own statements (not autovacuum).
type statsPostgres struct {
	c    *postgres.Cluster
	conn *pgx.Conn // to the cluster's own database, never a fleet's
}

func newStatsPostgres(t *testing.T) *statsPostgres {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Its own cluster, with room for a 100-replica fleet's connections
	// (about three per replica) and the joiners'.
	dir := t.TempDir()
	c, err := postgres.Run(ctx, postgres.Options{Dir: dir, Ephemeral: true, MaxConnections: 1000})
	if err != nil {
		t.Fatalf("start the stats postgres: %v", err)
	}
	t.Cleanup(func() { _ = c.Close() })
	conn, err := pgx.Connect(ctx, c.URL())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"); err != nil {
		t.Fatal(err)
	}
	_ = conn.Close(ctx)
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	conn, err = pgx.Connect(ctx, c.URL())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	return &statsPostgres{c: c, conn: conn}
}

// newDatabase creates an empty database (the replicas migrate it).
func (s *statsPostgres) newDatabase(t *testing.T, name string) string {
	t.Helper()
	if _, err := s.conn.Exec(context.Background(), "CREATE DATABASE "+name); err != nil {
		t.Fatal(err)
	}
	return s.c.DatabaseURL(name)
}

// counts are the fleet database's statements (pg_stat_statements calls)
// and transactions (pg_stat_database, background work included).
func (s *statsPostgres) counts(db string) (statements, xacts float64) {
	ctx := context.Background()
	_ = s.conn.QueryRow(ctx, `SELECT coalesce(sum(calls), 0)::float8 FROM pg_stat_statements s
		JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1`, db).Scan(&statements)
	_ = s.conn.QueryRow(ctx, `SELECT (xact_commit + xact_rollback)::float8 FROM pg_stat_database WHERE datname = $1`, db).Scan(&xacts)
	return statements, xacts
}

// pids are the cluster's processes: the postmaster (found by its port
// argument) and its children.
func (s *statsPostgres) pids() []int {
	port := strconv.Itoa(s.c.Port())
	var master int
	procs := map[int]int{} // pid → ppid
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil {
			continue
		}
		procs[pid] = st.ppid
		if st.comm == "postgres" && master == 0 {
			cmd, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
			args := strings.Split(string(cmd), "\x00")
			for i := 0; i+1 < len(args); i++ {
				if args[i] == "-p" && args[i+1] == port {
					master = pid
				}
			}
		}
	}
	if master == 0 {
		return nil
	}
	out := []int{master}
	for pid, ppid := range procs {
		if ppid == master {
			out = append(out, pid)
		}
	}
	return out
}

// resetStatements clears pg_stat_statements (the profile's top list covers
// the idle window only).
func (s *statsPostgres) resetStatements() {
	_, _ = s.conn.Exec(context.Background(), "SELECT pg_stat_statements_reset()")
}

// topStatements lists the fleet database's statements by total time (a
// lock's time is its wait).
func (s *statsPostgres) topStatements(db string) string {
	rows, err := s.conn.Query(context.Background(), `SELECT calls, round(total_exec_time::numeric, 1)::float8, regexp_replace(query, '\s+', ' ', 'g')
		FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 ORDER BY total_exec_time DESC LIMIT 20`, db)
	if err != nil {
		return err.Error()
	}
	defer rows.Close()
	var b strings.Builder
	for rows.Next() {
		var calls int64
		var total float64
		var q string
		if rows.Scan(&calls, &total, &q) == nil {
			fmt.Fprintf(&b, "%8d calls %10.1f ms  %s\n", calls, total, q)
		}
	}
	return b.String()
}
