package migrations

import (
	"fmt"
	"regexp"
	"strings"
)

// Check lists what makes f unfit as an expand migration: anything the
// previous release, still running on the new schema during a rolling
// upgrade, could trip over (a dropped, renamed or retyped object, a new
// constraint its writes may violate, deleted data), anything that blocks
// writers to an existing table for the length of a build (an index built
// without CONCURRENTLY), and statements that cannot run where the runner
// puts them (CONCURRENTLY inside a transaction; anything but a concurrent
// index build in a NO TRANSACTION file, which runs without lock_timeout).
// Tables created in the same file are new: indexes and constraints on them
// are fine. It is a conservative text check, not a SQL parser: a false
// alarm is moved to a contract step or rewritten. Contract steps are not
// checked: destroying is their job.
func Check(f File) []string {
	if f.Kind != KindExpand {
		return nil
	}
	var problems []string
	add := func(i int, msg string) {
		problems = append(problems, fmt.Sprintf("%s statement %d: %s", f.Name, i+1, msg))
	}
	created := map[string]bool{}
	for i, stmt := range f.Statements {
		s := normalize(stmt)
		if m := reCreateTable.FindStringSubmatch(s); m != nil {
			created[unquote(m[1])] = true
		}
		if f.NoTransaction {
			if !reConcurrentIndex.MatchString(s) {
				add(i, "a NO TRANSACTION file may only hold CREATE INDEX CONCURRENTLY IF NOT EXISTS statements (they run without lock_timeout, so nothing else may take locks there)")
			}
			continue
		}
		table := ""
		if m := reAlterTable.FindStringSubmatch(s); m != nil {
			table = unquote(m[1])
		}
		isNew := table != "" && created[table]
		if table != "" && !isNew && addsRequiredColumn(s) {
			add(i, "a NOT NULL column without a DEFAULT breaks the previous release's inserts: make it nullable or give it a default")
		}
		for _, r := range destructive {
			if r.re.MatchString(s) && !(isNew && r.okOnNewTable) {
				add(i, r.why)
			}
		}
		if m := reCreateIndex.FindStringSubmatch(s); m != nil {
			on := unquote(m[2])
			switch {
			case strings.Contains(m[1], "CONCURRENTLY"):
				add(i, "CREATE INDEX CONCURRENTLY cannot run in a transaction: put it alone in a file with '-- +goose NO TRANSACTION'")
			case !created[on] && strings.Contains(m[1], "UNIQUE"):
				add(i, "a unique index on an existing table tightens it (writes of the previous release may violate it): that is a contract step")
			case !created[on]:
				add(i, "an index on an existing table blocks its writers while it builds: build it with CREATE INDEX CONCURRENTLY IF NOT EXISTS in a '-- +goose NO TRANSACTION' file")
			}
		}
	}
	return problems
}

var (
	reCreateTable     = regexp.MustCompile(`^CREATE (?:UNLOGGED )?TABLE (?:IF NOT EXISTS )?([\w."]+)`)
	reAlterTable      = regexp.MustCompile(`^ALTER TABLE (?:IF EXISTS )?(?:ONLY )?([\w."]+)`)
	reCreateIndex     = regexp.MustCompile(`^CREATE ((?:UNIQUE )?INDEX(?: CONCURRENTLY)?)(?: IF NOT EXISTS)?(?: [\w."]+)? ON (?:ONLY )?([\w."]+)`)
	reConcurrentIndex = regexp.MustCompile(`^CREATE INDEX CONCURRENTLY IF NOT EXISTS [\w."]+ ON `)
)

// destructive are the patterns no expand migration may contain, matched on
// the normalized statement.
var destructive = []struct {
	re           *regexp.Regexp
	why          string
	okOnNewTable bool // allowed in ALTER TABLE of a table this file creates
}{
	{re: regexp.MustCompile(`\bDROP\b`), why: "DROP removes something the previous release may use: that is a contract step"},
	{re: regexp.MustCompile(`\bRENAME\b`), why: "RENAME breaks the previous release's queries: add the new name, copy, and drop the old one in a contract step"},
	{re: regexp.MustCompile(`\bTRUNCATE\b|\bDELETE FROM\b`), why: "deleting data is a contract step"},
	{re: regexp.MustCompile(`\bALTER COLUMN [\w"]+ (?:SET DATA )?TYPE\b`), why: "changing a column's type breaks the previous release's reads and writes (and rewrites the table under an exclusive lock)", okOnNewTable: true},
	{re: regexp.MustCompile(`\bSET NOT NULL\b`), why: "SET NOT NULL tightens a column the previous release may leave empty: that is a contract step", okOnNewTable: true},
	{re: regexp.MustCompile(`\bADD (?:CONSTRAINT|PRIMARY KEY|UNIQUE|CHECK|FOREIGN KEY|EXCLUDE)\b`), why: "a new constraint tightens the table (writes of the previous release may violate it): that is a contract step", okOnNewTable: true},
	{re: regexp.MustCompile(`\bLOCK TABLE\b|^LOCK\b`), why: "an explicit table lock blocks every replica's heartbeat"},
	{re: regexp.MustCompile(`\bREVOKE\b`), why: "REVOKE may take away what the previous release needs: that is a contract step"},
}

// addsRequiredColumn: an ALTER TABLE with an ADD [COLUMN] clause that is
// NOT NULL without a DEFAULT.
func addsRequiredColumn(s string) bool {
	depth, start := 0, 0
	var clauses []string
	for i, c := range s {
		switch c {
		case '(':
			depth++
		case ')':
			depth--
		case ',':
			if depth == 0 {
				clauses = append(clauses, s[start:i])
				start = i + 1
			}
		}
	}
	clauses = append(clauses, s[start:])
	for _, c := range clauses {
		c = strings.TrimSpace(reAlterTable.ReplaceAllString(strings.TrimSpace(c), ""))
		if !strings.HasPrefix(c, "ADD ") || reAddConstraint.MatchString(c) {
			continue
		}
		if strings.Contains(c, "NOT NULL") && !strings.Contains(c, "DEFAULT") {
			return true
		}
	}
	return false
}

var reAddConstraint = regexp.MustCompile(`^ADD (?:CONSTRAINT|PRIMARY KEY|UNIQUE|CHECK|FOREIGN KEY|EXCLUDE)\b`)

// normalize upper-cases stmt and collapses whitespace, with comments
// removed and string literals emptied (so their words never match).
func normalize(stmt string) string {
	var b strings.Builder
	for i := 0; i < len(stmt); i++ {
		c := stmt[i]
		switch {
		case c == '-' && i+1 < len(stmt) && stmt[i+1] == '-':
			for i < len(stmt) && stmt[i] != '\n' {
				i++
			}
			b.WriteByte(' ')
		case c == '/' && i+1 < len(stmt) && stmt[i+1] == '*':
			end := strings.Index(stmt[i+2:], "*/")
			if end < 0 {
				i = len(stmt)
			} else {
				i += end + 3
			}
			b.WriteByte(' ')
		case c == '\'':
			j := i + 1
			for j < len(stmt) && !(stmt[j] == '\'' && (j+1 >= len(stmt) || stmt[j+1] != '\'')) {
				if stmt[j] == '\'' {
					j++ // a doubled quote
				}
				j++
			}
			i = j
			b.WriteString("''")
		default:
			b.WriteByte(c)
		}
	}
	s := strings.Join(strings.Fields(strings.ToUpper(b.String())), " ")
	s = strings.TrimSuffix(s, ";")
	return strings.TrimSpace(s)
}

// unquote normalizes an identifier as the checks compare it.
func unquote(id string) string {
	id = strings.ReplaceAll(id, `"`, "")
	if i := strings.LastIndex(id, "."); i >= 0 {
		id = id[i+1:]
	}
	return id
}
