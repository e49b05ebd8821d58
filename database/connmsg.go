package database

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// retryable reports whether err means "the server is not there yet" rather
// than "the server said no".
func retryable(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		// 57P03: the database system is starting up.
		return pgErr.Code == "57P03"
	}
	msg := err.Error()
	for _, s := range []string{"connection refused", "no such host", "i/o timeout", "connection reset", "timeout", "network is unreachable", "server closed the connection"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// rootCause strips pgx's long prefixes ("failed to connect to `user=…`:")
// so the one-line error stays readable.
func rootCause(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return fmt.Sprintf("%s (SQLSTATE %s)", pgErr.Message, pgErr.Code)
	}
	msg := err.Error()
	if i := strings.LastIndex(msg, "): "); i >= 0 && strings.HasPrefix(msg, "failed to connect") {
		msg = msg[i+3:]
	}
	return msg
}

// Describe renders a Postgres URL as host:port/database for messages,
// without the user's password.
func Describe(rawURL string) string {
	if unencodedUserinfo(rawURL) {
		return "(unparsable URL)" // its host and path hold parts of the password
	}
	u, err := url.Parse(rawURL)
	if err != nil || u.Host == "" {
		if cfg, err := pgconnParse(rawURL); err == nil {
			return fmt.Sprintf("%s:%d/%s", cfg.Host, cfg.Port, cfg.Database)
		}
		return "(unparsable URL)"
	}
	return u.Host + u.Path
}

func pgconnParse(s string) (*pgconn.Config, error) { return pgconn.ParseConfig(s) }

// Redact removes the password of rawURL from msg.
func Redact(rawURL, msg string) string {
	if u, err := url.Parse(rawURL); err == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok && pw != "" {
			msg = strings.ReplaceAll(msg, pw, "xxxxx")
			msg = strings.ReplaceAll(msg, url.QueryEscape(pw), "xxxxx")
		}
	}
	if cfg, err := pgconn.ParseConfig(rawURL); err == nil && cfg.Password != "" {
		msg = strings.ReplaceAll(msg, cfg.Password, "xxxxx")
	}
	return msg
}
