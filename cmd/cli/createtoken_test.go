package cli_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/coder-ha/coder/database/dbtest"
	"github.com/coder-ha/coder/internal/clitest"
)

// `coder server create-token` run first on an empty database migrates it
// like `coder server` does, recording its release with the schema: an
// older replica that joins later names the release the schema came from
// (its skew warning says "from release …").
func TestCreateTokenOnAnEmptyDatabaseRecordsItsRelease(t *testing.T) {
	t.Parallel()
	pg := dbtest.NewEmptyURL(t)
	clitest.CreateToken(t, pg)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close(ctx) }()
	var release string
	if err := conn.QueryRow(ctx, `SELECT coalesce(string_agg(version, ','), '') FROM releases`).Scan(&release); err != nil {
		t.Fatal(err)
	}
	if release != "dev" {
		t.Fatalf("releases recorded after create-token: %q, want the binary's (dev)", release)
	}
}
