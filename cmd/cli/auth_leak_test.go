package cli_test

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
	"github.com/coder-ha/coder/internal/faultproxy"
)

// While Postgres is unreachable, a request with a token the replica has
// never seen gets a 503 that says nothing about the database: not its
// host, port, user or name, and no driver error.
func TestBadTokenDuringDatabaseOutageLeaksNoDatabaseDetails(t *testing.T) {
	t.Parallel()
	proxy, pgURL := faultproxy.InFrontOf(t, dbtest.NewURL(t))
	u, err := url.Parse(pgURL)
	if err != nil {
		t.Fatal(err)
	}
	r := clitest.StartReplica(t, clitest.ReplicaOptions{Name: "r", PostgresURL: pgURL})
	r.WaitReady(60 * time.Second)

	proxy.Cut()
	t.Cleanup(proxy.Heal)

	// The first request may find a pooled connection dead; later ones try
	// new connections, whose errors name the host, user and database.
	ask := func(i int) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, r.URL+"/api/v2/replicas", nil)
		req.Header.Set("Coder-Session-Token", fmt.Sprintf("abcdefg%03d-notarealsecretatall", i))
		resp, err := (&http.Client{Timeout: 15 * time.Second}).Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	dbName := strings.TrimPrefix(u.Path, "/")
	unavailable := 0
	for i := 0; i < 6; i++ {
		status, body := ask(i)
		if status == http.StatusServiceUnavailable {
			unavailable++
		}
		for _, secret := range []string{proxy.Addr(), "127.0.0.1", dbName, u.User.Username(), "user=", "database=", "failed to connect", "SQLSTATE", "EOF"} {
			if secret != "" && strings.Contains(body, secret) {
				t.Errorf("the answer to an unauthenticated caller contains %q: %s", secret, body)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if unavailable == 0 {
		t.Fatal("no request was answered 503 while the database was down")
	}
	if !strings.Contains(r.Output(), "cannot check api tokens") {
		t.Errorf("the database failure was not logged server-side")
	}
}
