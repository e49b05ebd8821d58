package database

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
)

// ErrInvalidToken is returned for a token that is malformed, unknown or
// does not match its stored hash.
var ErrInvalidToken = errors.New("invalid token")

const tokenAlphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

func randomString(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	for i := range b {
		b[i] = tokenAlphabet[int(b[i])%len(tokenAlphabet)]
	}
	return string(b), nil
}

// CreateAPIKey stores a new API key and returns its token ("<id>-<secret>").
// Only the SHA-256 of the secret is stored, so the token cannot be read back.
func (db *DB) CreateAPIKey(ctx context.Context, name string) (string, error) {
	id, err := randomString(10)
	if err != nil {
		return "", fmt.Errorf("create api key: %w", err)
	}
	secret, err := randomString(22)
	if err != nil {
		return "", fmt.Errorf("create api key: %w", err)
	}
	sum := sha256.Sum256([]byte(secret))
	if _, err := db.pool.Exec(ctx, `INSERT INTO api_keys (id, hashed_secret, name) VALUES ($1, $2, $3)`, id, sum[:], name); err != nil {
		return "", fmt.Errorf("insert api key: %w", err)
	}
	return id + "-" + secret, nil
}

// ValidateAPIKey checks token against the stored hash. It returns
// ErrInvalidToken for any token that does not authenticate.
func (db *DB) ValidateAPIKey(ctx context.Context, token string) error {
	id, secret, ok := strings.Cut(token, "-")
	if !ok || !validID(id) || secret == "" {
		return ErrInvalidToken
	}
	var hashed []byte
	err := db.pool.QueryRow(ctx, `SELECT hashed_secret FROM api_keys WHERE id = $1`, id).Scan(&hashed)
	if errors.Is(err, pgx.ErrNoRows) {
		return ErrInvalidToken
	}
	if err != nil {
		return fmt.Errorf("get api key: %w", err)
	}
	sum := sha256.Sum256([]byte(secret))
	if subtle.ConstantTimeCompare(sum[:], hashed) != 1 {
		return ErrInvalidToken
	}
	return nil
}

// APIKeyRevokedChannel is the pubsub channel a revocation is announced on.
// The payload is the revoked key's id: the part of the token before the
// "-", which authenticates nothing by itself.
const APIKeyRevokedChannel = "coder_api_key_revoked"

// APIKeyID returns the id of a token ("<id>-<secret>"), or s itself when it
// is an id; ok is false when s is neither.
func APIKeyID(s string) (id string, ok bool) {
	id, _, _ = strings.Cut(strings.TrimSpace(s), "-")
	return id, validID(id)
}

// validID reports whether id could name a key: 10 characters of the token
// alphabet. Anything else (bytes that are not UTF-8 included, which
// Postgres would refuse with an error rather than find no row for) never
// reaches the database.
func validID(id string) bool {
	if len(id) != 10 {
		return false
	}
	for i := 0; i < len(id); i++ {
		if !strings.Contains(tokenAlphabet, id[i:i+1]) {
			return false
		}
	}
	return true
}

// RevokeAPIKey deletes the key with id and announces it on
// APIKeyRevokedChannel in the same transaction: replicas that listen hear
// of it as the deletion commits, never before. It reports whether the key
// existed.
func (db *DB) RevokeAPIKey(ctx context.Context, id string) (bool, error) {
	ids, err := db.revokeAPIKeys(ctx, `DELETE FROM api_keys WHERE id = $1 RETURNING id`, id)
	return len(ids) > 0, err
}

// RevokeAPIKeysNamed revokes every key created with name (as RevokeAPIKey
// does) and returns their ids.
func (db *DB) RevokeAPIKeysNamed(ctx context.Context, name string) ([]string, error) {
	return db.revokeAPIKeys(ctx, `DELETE FROM api_keys WHERE name = $1 RETURNING id`, name)
}

func (db *DB) revokeAPIKeys(ctx context.Context, del string, arg string) ([]string, error) {
	tx, err := db.pool.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("revoke api key: %w", err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	rows, err := tx.Query(ctx, del, arg)
	if err != nil {
		return nil, fmt.Errorf("revoke api key: %w", err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("revoke api key: %w", err)
	}
	for _, id := range ids {
		if _, err := tx.Exec(ctx, `SELECT pg_notify($1, $2)`, APIKeyRevokedChannel, id); err != nil {
			return nil, fmt.Errorf("revoke api key: announce: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("revoke api key: %w", err)
	}
	return ids, nil
}

// ExistingAPIKeyIDs returns which of ids still name a key: a replica that
// may have missed revocations checks the tokens it trusts with it.
func (db *DB) ExistingAPIKeyIDs(ctx context.Context, ids []string) ([]string, error) {
	rows, err := db.pool.Query(ctx, `SELECT id FROM api_keys WHERE id = ANY($1)`, ids)
	if err != nil {
		return nil, fmt.Errorf("list api keys: %w", err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list api keys: %w", err)
	}
	return out, nil
}
