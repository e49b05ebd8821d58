-- +goose Up
-- TEST ONLY (build tag upgradetest): the next release's contract step.
ALTER TABLE next_release_widgets DROP COLUMN legacy;
