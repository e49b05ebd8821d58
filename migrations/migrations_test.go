package migrations_test

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/coder-ha/coder/migrations"
)

// allExpand reads every expand file from disk: the shipped ones and the
// test-only next release's (which `go test` does not embed without its
// build tag), so `make test` checks them all.
func allExpand(t *testing.T) []migrations.File {
	t.Helper()
	var out []migrations.File
	for _, dir := range []string{".", "testrelease"} {
		files, err := migrations.Load(os.DirFS(dir), ".", migrations.KindExpand)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, files...)
	}
	if len(out) < 3 {
		t.Fatalf("found only %d expand files", len(out))
	}
	return out
}

// The check `make test` runs: no expand migration drops, renames,
// tightens or blocks writers (see migrations.Check).
func TestExpandMigrationsOnlyAdd(t *testing.T) {
	for _, f := range allExpand(t) {
		for _, p := range migrations.Check(f) {
			t.Errorf("%s\n  (move it to a contract step in migrations/contract/, see docs/upgrading.md)", p)
		}
	}
}

// What the check must catch, and what it must let through.
func TestCheckRejectsDestructiveStatements(t *testing.T) {
	bad := map[string]string{
		"drop table":           "DROP TABLE replicas;",
		"drop column":          "ALTER TABLE replicas DROP COLUMN error;",
		"drop default":         "ALTER TABLE replicas ALTER COLUMN error DROP DEFAULT;",
		"rename column":        "ALTER TABLE replicas RENAME COLUMN error TO failure;",
		"rename table":         "ALTER TABLE replicas RENAME TO members;",
		"retype":               "ALTER TABLE replicas ALTER COLUMN region_id TYPE bigint;",
		"set not null":         "alter table replicas alter column version set not null;",
		"required new column":  "ALTER TABLE replicas ADD COLUMN zone text NOT NULL;",
		"required, 2nd clause": "ALTER TABLE replicas ADD COLUMN a text, ADD COLUMN b int NOT NULL;",
		"new constraint":       "ALTER TABLE replicas ADD CONSTRAINT r_pos CHECK (region_id > 0) NOT VALID;",
		"unique index":         "CREATE UNIQUE INDEX replicas_host ON replicas (hostname);",
		"blocking index":       "CREATE INDEX replicas_host ON replicas (hostname);",
		"concurrently in tx":   "CREATE INDEX CONCURRENTLY IF NOT EXISTS replicas_host ON replicas (hostname);",
		"delete":               "DELETE FROM replicas WHERE stopped_at IS NOT NULL;",
		"truncate":             "TRUNCATE api_keys;",
		"lock":                 "LOCK TABLE replicas IN ACCESS EXCLUSIVE MODE;",
		"revoke":               "REVOKE SELECT ON replicas FROM reporting;",
	}
	for name, sql := range bad {
		f := parse(t, "00009_x.sql", "-- +goose Up\n"+sql+"\n")
		if len(migrations.Check(f)) == 0 {
			t.Errorf("%s: %q passed the check", name, sql)
		}
	}
	noTx := parse(t, "00009_x.sql", "-- +goose NO TRANSACTION\n-- +goose Up\nALTER TABLE replicas ADD COLUMN zone text;\n")
	if len(migrations.Check(noTx)) == 0 {
		t.Error("a NO TRANSACTION file with an ALTER TABLE passed the check")
	}

	good := map[string]string{
		"new table with its index and key": "CREATE TABLE widgets (id int PRIMARY KEY, name text NOT NULL);\nCREATE UNIQUE INDEX widgets_name ON widgets (name);\nALTER TABLE widgets ADD CONSTRAINT w CHECK (id > 0);",
		"nullable column":                  "ALTER TABLE replicas ADD COLUMN zone text;",
		"defaulted required column":        "ALTER TABLE replicas ADD COLUMN IF NOT EXISTS zone text NOT NULL DEFAULT '';",
		"words in strings and comments":    "-- we never DROP anything here\nALTER TABLE replicas ADD COLUMN note text DEFAULT 'DROP TABLE x; RENAME';",
		"backfill":                         "UPDATE replicas SET error = '' WHERE error IS NULL;",
		"on delete cascade":                "CREATE TABLE owned (id int PRIMARY KEY, owner uuid REFERENCES replicas (id) ON DELETE CASCADE);",
	}
	for name, sql := range good {
		f := parse(t, "00009_x.sql", "-- +goose Up\n"+sql+"\n")
		if p := migrations.Check(f); len(p) != 0 {
			t.Errorf("%s: rejected: %v", name, p)
		}
	}
	concurrent := parse(t, "00009_x.sql", "-- +goose NO TRANSACTION\n-- +goose Up\nCREATE INDEX CONCURRENTLY IF NOT EXISTS replicas_host ON replicas (hostname);\n")
	if p := migrations.Check(concurrent); len(p) != 0 {
		t.Errorf("a concurrent index build in a NO TRANSACTION file was rejected: %v", p)
	}
	contract := parse(t, "00009_x.sql", "-- +goose Up\nDROP TABLE replicas;\n")
	contract.Kind = migrations.KindContract
	if p := migrations.Check(contract); len(p) != 0 {
		t.Errorf("a contract step was checked like an expand migration: %v", p)
	}
}

func parse(t *testing.T, name, sql string) migrations.File {
	t.Helper()
	f, err := migrations.Parse(name, migrations.KindExpand, []byte(sql))
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// The parser reads goose's format: statements end at a ';' line end,
// StatementBegin/End keep a block whole, Down is never run.
func TestParseReadsGooseFormat(t *testing.T) {
	f := parse(t, "00007_body.sql", `-- leading comment
-- +goose Up
CREATE TABLE a (
    x int -- a comment; not the end
);
-- between statements
-- +goose StatementBegin
CREATE FUNCTION f() RETURNS int AS $$
BEGIN
    RETURN 1;
END;
$$ LANGUAGE plpgsql;
-- +goose StatementEnd
INSERT INTO a VALUES (1); -- trailing
-- +goose Down
DROP TABLE a;
`)
	if f.Version != 7 || f.NoTransaction || len(f.Statements) != 3 {
		t.Fatalf("parsed %+v", f)
	}
	if !strings.HasPrefix(f.Statements[1], "CREATE FUNCTION") || !strings.HasSuffix(f.Statements[1], "plpgsql;") {
		t.Fatalf("the StatementBegin block was split: %q", f.Statements[1])
	}
	for _, s := range f.Statements {
		if strings.Contains(s, "DROP") {
			t.Fatalf("the Down section was read: %q", s)
		}
	}
	for _, broken := range []string{
		"CREATE TABLE a (x int);\n",                           // no Up
		"-- +goose Up\nCREATE TABLE a (x int)\n",              // no ';'
		"-- +goose Up\n-- +goose StatementBegin\nSELECT 1;\n", // no StatementEnd
		"-- +goose Up\n-- +goose Sideways\n",                  // unknown annotation
	} {
		if _, err := migrations.Parse("00001_x.sql", migrations.KindExpand, []byte(broken)); err == nil {
			t.Errorf("parsed a broken file: %q", broken)
		}
	}
	if _, err := migrations.Parse("x.sql", migrations.KindExpand, []byte("-- +goose Up\n")); err == nil {
		t.Error("a file without a version number parsed")
	}
}

// Every contract step names an expand version the same release carries
// (it may run only once every replica knows it).
func TestContractStepsRequireAKnownExpandVersion(t *testing.T) {
	expand := allExpand(t)
	known := migrations.Known(expand)
	for _, dir := range []string{"contract", filepath.Join("testrelease", "contract")} {
		files, err := migrations.Load(os.DirFS(dir), ".", migrations.KindContract)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			if f.Version > known {
				t.Errorf("%s/%s requires expand version %d, but the newest is %d", dir, f.Name, f.Version, known)
			}
		}
	}
}

// Released migration files never change: a replica of the previous
// release has already applied them (add a new file instead).
func TestReleasedMigrationsAreUnchanged(t *testing.T) {
	released := map[string]string{
		"00001_init.sql":     "1a701c4e585968960e8c241aa79354723cd90a3d1736a6ebd14f0a444f07adfc",
		"00002_releases.sql": "3da9477ab1752e290af9bce539bd435251e2edb8b255f8724253832da5305d4d",
	}
	for name, want := range released {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatalf("%s: %v (released migrations are never removed)", name, err)
		}
		sum := sha256.Sum256(b)
		if got := hex.EncodeToString(sum[:]); got != want {
			t.Errorf("%s changed (sha256 %s): released migrations are never edited; add a new one", name, got)
		}
	}
}
