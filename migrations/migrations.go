// Package migrations holds the SQL schema, embedded in the binary so every
// replica carries the schema it expects, in two kinds of numbered files:
//
//   - expand migrations (NNNNN_name.sql, directly in this folder) only add:
//     tables, nullable or defaulted columns, indexes built concurrently. A
//     replica applies the pending ones when it starts, so the previous
//     release keeps running on the new schema during a rolling upgrade.
//     Their number is the schema version they bring.
//   - contract steps (contract/NNNNN_name.sql) drop, rename or tighten.
//     They run only through `coder server migrate --finalize`, once no
//     live replica runs a release that does not know expand version NNNNN
//     (the file's number).
//
// Both use goose's format ("-- +goose Up", "-- +goose StatementBegin",
// "-- +goose NO TRANSACTION"; Down sections are never run), and expand
// versions are recorded in goose's goose_db_version table, which releases
// before this format also read. A file must never be edited once
// released: add a new one. Check (run by `make test`) rejects destructive
// statements in expand files.
package migrations

import (
	"embed"
	"fmt"
	"io/fs"
	"path"
	"sort"
	"strconv"
	"strings"
)

// FS holds the shipped expand migrations.
//
//go:embed *.sql
var FS embed.FS

// contractFS holds the shipped contract steps (contract/*.sql; the folder
// keeps a README so that it embeds while it has no step).
//
//go:embed contract
var contractFS embed.FS

// testExpand and testContract are a test-only next release's files, set
// only in binaries built with the upgradetest tag (testrelease.go). They
// never ship.
var testExpand, testContract fs.FS

// Kind tells expand migrations and contract steps apart.
type Kind string

// The kinds of File.
const (
	KindExpand   Kind = "expand"
	KindContract Kind = "contract"
)

// File is one parsed migration file.
type File struct {
	// Kind is KindExpand or KindContract.
	Kind Kind
	// Version is the number the name starts with. For an expand migration
	// it is the schema version the file brings; for a contract step, the
	// expand version every live replica must know before it may run.
	Version int64
	// Name is the file name without folders, e.g. "00002_releases.sql".
	// It identifies a contract step.
	Name string
	// Statements are the Up section's statements, in order.
	Statements []string
	// NoTransaction: "-- +goose NO TRANSACTION"; the statements run
	// outside a transaction (CREATE INDEX CONCURRENTLY needs that).
	NoTransaction bool
}

// Expand returns every expand migration this binary carries, oldest
// first.
func Expand() ([]File, error) {
	out, err := Load(FS, ".", KindExpand)
	if err != nil {
		return nil, err
	}
	if testExpand != nil {
		more, err := Load(testExpand, ".", KindExpand)
		if err != nil {
			return nil, err
		}
		out = append(out, more...)
	}
	return sortFiles(out)
}

// Contract returns every contract step this binary carries, in the order
// they run (by Version, then Name).
func Contract() ([]File, error) {
	out, err := Load(contractFS, "contract", KindContract)
	if err != nil {
		return nil, err
	}
	if testContract != nil {
		more, err := Load(testContract, ".", KindContract)
		if err != nil {
			return nil, err
		}
		out = append(out, more...)
	}
	return sortFiles(out)
}

// Known is the newest expand version in files (0 with none).
func Known(files []File) int64 {
	var v int64
	for _, f := range files {
		if f.Kind == KindExpand && f.Version > v {
			v = f.Version
		}
	}
	return v
}

// Load parses every *.sql file directly in dir of fsys as kind.
func Load(fsys fs.FS, dir string, kind Kind) ([]File, error) {
	entries, err := fs.ReadDir(fsys, dir)
	if err != nil {
		return nil, fmt.Errorf("migrations: read %s: %w", dir, err)
	}
	var out []File
	for _, e := range entries {
		if e.IsDir() || !strings.HasSuffix(e.Name(), ".sql") {
			continue
		}
		b, err := fs.ReadFile(fsys, path.Join(dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("migrations: read %s: %w", e.Name(), err)
		}
		f, err := Parse(e.Name(), kind, b)
		if err != nil {
			return nil, err
		}
		out = append(out, f)
	}
	return out, nil
}

func sortFiles(files []File) ([]File, error) {
	sort.Slice(files, func(i, j int) bool {
		if files[i].Version != files[j].Version {
			return files[i].Version < files[j].Version
		}
		return files[i].Name < files[j].Name
	})
	for i := 1; i < len(files); i++ {
		if files[i].Kind == KindExpand && files[i].Version == files[i-1].Version {
			return nil, fmt.Errorf("migrations: %s and %s have the same version", files[i-1].Name, files[i].Name)
		}
	}
	return files, nil
}

// VersionOf reads the number a migration file's name starts with.
func VersionOf(name string) (int64, error) {
	base := path.Base(name)
	num, _, ok := strings.Cut(base, "_")
	if !ok {
		return 0, fmt.Errorf("migrations: %s: the name must be NNNNN_description.sql", base)
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || v < 1 {
		return 0, fmt.Errorf("migrations: %s: the name must start with a positive number", base)
	}
	return v, nil
}

// Parse reads one goose-format file: the statements of its Up section (a
// statement ends on a line ending with ";", or spans StatementBegin to
// StatementEnd) and whether it asks for NO TRANSACTION. The Down section
// is ignored: migrations are never run backwards.
func Parse(name string, kind Kind, data []byte) (File, error) {
	v, err := VersionOf(name)
	if err != nil {
		return File{}, err
	}
	f := File{Kind: kind, Version: v, Name: path.Base(name)}
	fail := func(line int, msg string) (File, error) {
		return File{}, fmt.Errorf("migrations: %s:%d: %s", f.Name, line, msg)
	}
	const (
		before = iota
		up
		down
	)
	state, inBlock := before, false
	var buf strings.Builder
	for i, line := range strings.Split(string(data), "\n") {
		n := i + 1
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "--") && strings.Contains(trimmed, "+goose") {
			switch annotation := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(strings.TrimPrefix(trimmed, "--")), "+goose")); annotation {
			case "Up":
				if state != before {
					return fail(n, "a second '-- +goose Up'")
				}
				state = up
			case "Down":
				if state != up || inBlock || strings.TrimSpace(buf.String()) != "" {
					return fail(n, "'-- +goose Down' must follow a complete Up section")
				}
				state = down
			case "StatementBegin":
				if state == up {
					if inBlock || strings.TrimSpace(buf.String()) != "" {
						return fail(n, "StatementBegin inside an unfinished statement")
					}
					inBlock = true
				}
			case "StatementEnd":
				if state == up {
					if !inBlock {
						return fail(n, "StatementEnd without StatementBegin")
					}
					inBlock = false
					f.Statements = append(f.Statements, strings.TrimSpace(buf.String()))
					buf.Reset()
				}
			case "NO TRANSACTION":
				f.NoTransaction = true
			default:
				return fail(n, fmt.Sprintf("unknown annotation %q", annotation))
			}
			continue
		}
		if state != up {
			continue
		}
		if !inBlock && buf.Len() == 0 && (trimmed == "" || strings.HasPrefix(trimmed, "--")) {
			continue // comments and blank lines between statements
		}
		buf.WriteString(line)
		buf.WriteByte('\n')
		if !inBlock && endsWithSemicolon(line) {
			f.Statements = append(f.Statements, strings.TrimSpace(buf.String()))
			buf.Reset()
		}
	}
	switch {
	case state == before:
		return fail(1, "no '-- +goose Up' section")
	case inBlock:
		return fail(0, "StatementBegin without StatementEnd")
	case strings.TrimSpace(buf.String()) != "":
		return fail(0, "the last statement does not end with ';'")
	}
	return f, nil
}

// endsWithSemicolon: the line, without a trailing "--" comment, ends with
// ";" (goose's rule).
func endsWithSemicolon(line string) bool {
	if i := strings.Index(line, "--"); i >= 0 {
		line = line[:i]
	}
	return strings.HasSuffix(strings.TrimSpace(line), ";")
}
