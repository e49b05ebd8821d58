// This file holds the classification of errors: which store errors may
// pass on their own, and the short text of a failed probe.

package replicasync

import (
	"context"
	"errors"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// transient reports whether a store error may pass on its own: a broken
// or refused connection, or one of the server's "not now" answers
// (starting up, read-only during a failover, too many connections, a
// lock or serialization conflict).
func transient(err error) bool {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) {
		return true
	}
	switch pgErr.Code {
	case "57P03", "25006", "53300", "55P03", "40001", "40P01":
		return true
	}
	return false
}

// describeProbeError turns a probe failure into a short, stable message.
func describeProbeError(err error) string {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "connection refused"):
		return "connection refused"
	case errors.Is(err, context.DeadlineExceeded) || strings.Contains(msg, "Client.Timeout") || strings.Contains(msg, "deadline exceeded"):
		return "timed out"
	}
	return msg
}
