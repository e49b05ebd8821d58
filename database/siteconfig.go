package database

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
)

// Site config keys.
const (
	keyDeploymentID = "deployment_id"
	keyDERPMeshKey  = "derp_mesh_key"
)

// getOrInitSiteConfig returns the value stored under key, storing gen()
// first if there is none. Concurrent callers all get the one value that won.
func (db *DB) getOrInitSiteConfig(ctx context.Context, key string, gen func() (string, error)) (string, error) {
	candidate, err := gen()
	if err != nil {
		return "", fmt.Errorf("generate %s: %w", key, err)
	}
	var value string
	// One statement: insert if absent, then read whatever is there. The CTE
	// sees the pre-insert snapshot, hence the UNION over both. When another
	// replica's insert of key was in flight as the statement started, the
	// insert waits for it and does nothing, and the read's snapshot predates
	// that row: no row at all. A new statement (a new snapshot) sees it.
	for attempt := 0; ; attempt++ {
		err = db.pool.QueryRow(ctx, `
WITH ins AS (
	INSERT INTO site_configs (key, value) VALUES ($1, $2)
	ON CONFLICT (key) DO NOTHING
	RETURNING value
)
SELECT value FROM ins
UNION ALL
SELECT value FROM site_configs WHERE key = $1
LIMIT 1`, key, candidate).Scan(&value)
		if errors.Is(err, pgx.ErrNoRows) && attempt < 3 {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("get or init site config %s: %w", key, err)
		}
		return value, nil
	}
}

// DeploymentID returns the deployment's id, generating it on first use.
func (db *DB) DeploymentID(ctx context.Context) (string, error) {
	return db.getOrInitSiteConfig(ctx, keyDeploymentID, func() (string, error) {
		return uuid.NewString(), nil
	})
}

// DERPMeshKey returns the deployment's DERP mesh key (64 hex characters, the
// format key.ParseDERPMesh takes), generating it exactly once even when many
// replicas ask at once. It is a secret: never log it.
func (db *DB) DERPMeshKey(ctx context.Context) (string, error) {
	return db.getOrInitSiteConfig(ctx, keyDERPMeshKey, func() (string, error) {
		var b [32]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", err
		}
		return hex.EncodeToString(b[:]), nil
	})
}
