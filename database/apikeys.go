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
	if !ok || len(id) != 10 || secret == "" {
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
