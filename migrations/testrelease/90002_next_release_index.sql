-- +goose NO TRANSACTION
-- +goose Up
-- TEST ONLY (build tag upgradetest): an index on an existing, busy table is
-- built concurrently, outside a transaction.
CREATE INDEX CONCURRENTLY IF NOT EXISTS replicas_next_release_note_idx ON replicas (next_release_note);
