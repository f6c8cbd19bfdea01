-- Idempotency keys, and the command log as an audit trail (who, with which key, replays).

-- The first successful reply to a command sent with an `idempotency-key` header, written
-- in the command's own transaction. A retry with the same key (same principal and command
-- type) gets `reply` back without running again. The request itself is never stored: only
-- a SHA-256 fingerprint of its canonical form (a password enters that form only as a
-- salted argon2id digest). Rows live until expires_at; the write service deletes expired
-- ones, skipping any whose advisory lock (lock_id) a running command holds.
CREATE TABLE idempotency_keys (
    principal         text        NOT NULL,
    command_type      text        NOT NULL,
    idempotency_key   text        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    -- Key of the transaction-level advisory lock that serializes commands using this key.
    lock_id           bigint      NOT NULL,
    fingerprint       bytea       NOT NULL CHECK (length(fingerprint) = 32),
    -- The command that produced the reply (its command_log row).
    command_id        uuid        NOT NULL,
    aggregate_id      text        NOT NULL,
    aggregate_version bigint      NOT NULL CHECK (aggregate_version > 0),
    reply             bytea       NOT NULL,
    created_at        timestamptz NOT NULL,
    expires_at        timestamptz NOT NULL,
    PRIMARY KEY (principal, command_type, idempotency_key),
    CHECK (expires_at > created_at)
);
CREATE INDEX idempotency_keys_expires_idx ON idempotency_keys (expires_at);

-- Who sent each command and with which key; a replayed retry gets its own row pointing at
-- the command whose reply it returned. Rows written before this migration keep ''.
ALTER TABLE command_log
    ADD COLUMN principal       text NOT NULL DEFAULT '',
    ADD COLUMN idempotency_key text NOT NULL DEFAULT '',
    ADD COLUMN replay_of       uuid;

-- NOT VALID: every existing row satisfies both checks (old outcomes, no replay_of), so
-- skipping the scan of a long log keeps the migration's exclusive lock short.
ALTER TABLE command_log DROP CONSTRAINT command_log_outcome_check;
ALTER TABLE command_log ADD CONSTRAINT command_log_outcome_check
    CHECK (outcome IN ('succeeded', 'rejected', 'failed', 'replayed')) NOT VALID;
ALTER TABLE command_log ADD CONSTRAINT command_log_replay_of_check
    CHECK ((outcome = 'replayed') = (replay_of IS NOT NULL)) NOT VALID;

-- The audit queries `python -m write_service.audit` runs most: by aggregate, by caller, by
-- key. IF NOT EXISTS lets an operator with a long log build them CONCURRENTLY beforehand.
CREATE INDEX IF NOT EXISTS command_log_aggregate_idx ON command_log (aggregate_id, received_at);
CREATE INDEX IF NOT EXISTS command_log_principal_idx ON command_log (principal, received_at);
CREATE INDEX IF NOT EXISTS command_log_idempotency_key_idx ON command_log (idempotency_key)
    WHERE idempotency_key <> '';
