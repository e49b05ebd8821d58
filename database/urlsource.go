package database

import (
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5/pgconn"
)

// maxURLFileSize bounds what is read from a URL file: a connection URL is
// a few hundred bytes, and a file of megabytes is a mistake (the wrong
// path), not a URL.
const maxURLFileSize = 64 << 10

// maxRememberedPasswords bounds how many passwords a URLSource remembers
// for redaction (the current one and those it replaced).
const maxRememberedPasswords = 8

// URLSource is where the Postgres connection URL comes from: either a
// fixed URL (--postgres-url), or a file read again every time a connection
// is opened (--postgres-url-file), so that a rotated password, written to
// the file the way the kubelet updates a mounted Secret (a new directory
// and an atomic swap of the ..data symlink), takes effect for every
// connection opened after the swap without a restart.
//
// Connections already open keep the credentials they authenticated with:
// Postgres never asks an open session again.
//
// A URLSource remembers the passwords of every URL it read (a few), so
// that Redact removes an old password from an error as well as the
// current one. It is safe for concurrent use.
type URLSource struct {
	fixed string // the URL, when not read from a file
	path  string // the file, when read from one

	mu        sync.Mutex
	last      string   // the last URL read successfully
	passwords []string // every distinct password seen, newest last
}

// StaticURL is a source that always returns rawURL.
func StaticURL(rawURL string) *URLSource {
	s := &URLSource{fixed: rawURL, last: rawURL}
	s.remember(rawURL)
	return s
}

// URLFile is a source that reads the URL from path on every Read. It
// reads the file once now, so that a missing, unreadable or empty file
// is reported at start; the error names the path, never the contents.
func URLFile(path string) (*URLSource, error) {
	s := &URLSource{path: path}
	if _, err := s.Read(); err != nil {
		return nil, err
	}
	return s, nil
}

// Path is the file the URL is read from ("" for a fixed URL).
func (s *URLSource) Path() string { return s.path }

// Read returns the URL: the fixed one, or the file's contents now (one
// line; surrounding white space, such as the newline a Secret often ends
// with, is dropped). An error names the file and why it cannot be used,
// never what it holds.
func (s *URLSource) Read() (string, error) {
	if s.path == "" {
		return s.fixed, nil
	}
	u, err := readURLFile(s.path)
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	s.last = u
	s.mu.Unlock()
	s.remember(u)
	return u, nil
}

// Last is the URL last read successfully (the fixed URL, or the file's
// contents at the last Read), without reading the file again.
func (s *URLSource) Last() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

// Describe names the database for messages, as host:port/database of the
// last URL read, without credentials.
func (s *URLSource) Describe() string { return Describe(s.Last()) }

// Origin says where the URL comes from, for log lines: "--postgres-url"
// or "--postgres-url-file <path>".
func (s *URLSource) Origin() string {
	if s.path == "" {
		return "--postgres-url"
	}
	return "--postgres-url-file " + s.path
}

// Redact removes from msg every password this source has read (the
// current one and a few it replaced), in plain and URL-escaped form.
func (s *URLSource) Redact(msg string) string {
	s.mu.Lock()
	pws := append([]string(nil), s.passwords...)
	s.mu.Unlock()
	for _, pw := range pws {
		msg = strings.ReplaceAll(msg, pw, "xxxxx")
		if esc := url.QueryEscape(pw); esc != pw {
			msg = strings.ReplaceAll(msg, esc, "xxxxx")
		}
		if esc := url.PathEscape(pw); esc != pw {
			msg = strings.ReplaceAll(msg, esc, "xxxxx")
		}
	}
	return msg
}

// remember records rawURL's password for Redact.
func (s *URLSource) remember(rawURL string) {
	pw := passwordOf(rawURL)
	if pw == "" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.passwords {
		if p == pw {
			return
		}
	}
	s.passwords = append(s.passwords, pw)
	if len(s.passwords) > maxRememberedPasswords {
		s.passwords = s.passwords[len(s.passwords)-maxRememberedPasswords:]
	}
}

// errUnencodedUserinfo is why a URL whose user information spills past
// its host is refused. It quotes nothing of the URL: what spilled is most
// likely part of the password.
var errUnencodedUserinfo = errors.New("its user name or password holds a '/', '?' or '#' that is not percent-encoded " +
	"(write them as %2F, %3F and %23; an '@' in the database name as %40)")

// unencodedUserinfo reports whether rawURL is a postgres:// URL whose
// user information did not end where its host begins: an '@' after the
// authority, with none in it. A '/', '?' or '#' left unencoded in a
// password ends the authority early, so "postgres://user:12/ab@host/db"
// parses as host "user:12" and database "ab@host/db": the server would
// dial the wrong host and print the password as a host and a database
// name in every message. Such a URL is refused instead.
func unencodedUserinfo(rawURL string) bool {
	rest, ok := strings.CutPrefix(rawURL, "postgres://")
	if !ok {
		if rest, ok = strings.CutPrefix(rawURL, "postgresql://"); !ok {
			return false
		}
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return false // unparsable: pgconn refuses it and masks the password itself
	}
	head, _, found := strings.Cut(rest, "@")
	if u.User != nil || !found {
		return false
	}
	if q := strings.Index(head, "?"); q >= 0 && !strings.Contains(head, "#") {
		// The '@' is in the query: inside a value (?password=p@ss) the
		// URL is fine; in a key, it is a password's '?' left unencoded.
		pair := head[strings.LastIndexAny(head, "?&")+1:]
		return !strings.Contains(pair, "=")
	}
	return true
}

// passwordOf is the password in a URL or keyword/value connection string
// ("" when there is none or it cannot be parsed).
func passwordOf(rawURL string) string {
	if u, err := url.Parse(rawURL); err == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok && pw != "" {
			return pw
		}
	}
	if cfg, err := pgconn.ParseConfig(rawURL); err == nil {
		return cfg.Password
	}
	return ""
}

// readURLFile reads one connection URL from path. Errors name the path
// and the reason; they never quote the contents (they may be a password
// that landed in the wrong file).
func readURLFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("%s: %s", path, fileErrReason(err))
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxURLFileSize+1))
	if err != nil {
		return "", fmt.Errorf("%s: %s", path, fileErrReason(err))
	}
	if len(b) > maxURLFileSize {
		return "", fmt.Errorf("%s is larger than %d KiB; it should hold one postgres:// URL", path, maxURLFileSize>>10)
	}
	u := strings.TrimSpace(string(b))
	switch {
	case u == "":
		return "", fmt.Errorf("%s is empty; it should hold one postgres:// URL", path)
	case strings.ContainsAny(u, "\r\n"):
		return "", fmt.Errorf("%s holds more than one line; it should hold one postgres:// URL", path)
	}
	if unencodedUserinfo(u) {
		return "", fmt.Errorf("%s does not hold a valid postgres URL: %w", path, errUnencodedUserinfo)
	}
	if _, err := pgconn.ParseConfig(u); err != nil {
		// pgconn's message quotes the string (password masked, but the
		// rest could be a secret put in the wrong file): say only what is
		// expected.
		return "", fmt.Errorf("%s does not hold a valid postgres URL (postgres://user:password@host:port/database)", path)
	}
	return u, nil
}

// fileErrReason is the reason of a file error without the path (the
// caller names it once).
func fileErrReason(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}
