-- +goose Up
-- Deployment-wide settings: deployment_id, derp_mesh_key, ...
CREATE TABLE site_configs (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per coder server process. Every timestamp is written with the
-- database clock (now()), so clock skew between machines cannot kill a
-- replica.
CREATE TABLE replicas (
    id               uuid PRIMARY KEY,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz NOT NULL DEFAULT now(),
    stopped_at       timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    hostname         text NOT NULL,
    region_id        integer NOT NULL,
    relay_address    text NOT NULL DEFAULT '',
    version          text NOT NULL DEFAULT '',
    database_latency bigint NOT NULL DEFAULT 0, -- microseconds
    error            text NOT NULL DEFAULT '',
    -- what this replica measured of its peers: [{"id","latency_ms","error"}]
    peers            jsonb NOT NULL DEFAULT '[]',
    warnings         jsonb NOT NULL DEFAULT '[]'
);
CREATE INDEX replicas_updated_at_idx ON replicas (updated_at);

-- API tokens: only a SHA-256 hash of the secret is stored.
CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    hashed_secret bytea NOT NULL,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_used   timestamptz
);

-- +goose Down
DROP TABLE api_keys;
DROP TABLE replicas;
DROP TABLE site_configs;
