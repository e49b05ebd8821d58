-- +goose Up
-- Which expand schema version each release knows. Every replica from this
-- release on records its version here when it starts; `coder server migrate
-- --finalize` reads it to tell which live replicas are too old for a
-- contract step, and to name the oldest release that may still run.
CREATE TABLE releases (
    version        text PRIMARY KEY,
    schema_version bigint NOT NULL,
    first_seen     timestamptz NOT NULL DEFAULT now(),
    last_seen      timestamptz NOT NULL DEFAULT now()
);

-- Contract steps applied by `coder server migrate --finalize`.
CREATE TABLE contract_steps (
    name           text PRIMARY KEY,
    schema_version bigint NOT NULL,
    applied_at     timestamptz NOT NULL DEFAULT now(),
    applied_by     text NOT NULL DEFAULT ''
);
