-- Users, the transactional outbox (which is also the event log) and the command log.

CREATE TABLE users (
    id                  uuid PRIMARY KEY,
    email               text        NOT NULL,
    username            text        NOT NULL,
    password_hash       text        NOT NULL,
    full_name           text        NOT NULL,
    bio                 text        NOT NULL DEFAULT '',
    avatar_url          text        NOT NULL DEFAULT '',
    active              boolean     NOT NULL DEFAULT true,
    deactivation_reason text        NOT NULL DEFAULT '',
    version             bigint      NOT NULL CHECK (version > 0),
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);

-- Uniqueness is case-insensitive; the stored values keep the caller's case.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));
CREATE UNIQUE INDEX users_username_lower_key ON users (lower(username));

-- One row per domain event. Rows are written in the command's transaction with
-- position NULL; the relay assigns the gap-free global position and later marks the
-- row published. Rows are never deleted: this table is the durable event log that
-- read replicas catch up from and rebuild their views from.
CREATE TABLE outbox (
    id                bigserial   PRIMARY KEY,
    event_id          uuid        NOT NULL UNIQUE,
    event_type        text        NOT NULL,
    schema_version    integer     NOT NULL CHECK (schema_version > 0),
    aggregate_type    text        NOT NULL,
    aggregate_id      text        NOT NULL,
    aggregate_version bigint      NOT NULL CHECK (aggregate_version > 0),
    payload           bytea       NOT NULL,
    occurred_at       timestamptz NOT NULL,
    correlation_id    text        NOT NULL DEFAULT '',
    causation_id      text        NOT NULL DEFAULT '',
    traceparent       text        NOT NULL DEFAULT '',
    tracestate        text        NOT NULL DEFAULT '',
    position          bigint      UNIQUE,
    positioned_at     timestamptz,
    published_at      timestamptz,
    -- An event is published only after it has a position.
    CHECK (published_at IS NULL OR position IS NOT NULL),
    -- One event per aggregate version: a lost update cannot slip through.
    UNIQUE (aggregate_type, aggregate_id, aggregate_version)
);

-- The relay's two work queues stay small however long the log grows.
CREATE INDEX outbox_unpositioned_idx ON outbox (id) WHERE position IS NULL;
CREATE INDEX outbox_unpublished_idx ON outbox (position) WHERE position IS NOT NULL AND published_at IS NULL;

-- Single-row table holding the last position handed out, so positions stay gap-free.
CREATE TABLE relay_state (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_position bigint  NOT NULL DEFAULT 0
);
INSERT INTO relay_state (singleton, last_position) VALUES (true, 0);

-- Audit trail: one row per command that reached a handler, written in the command's
-- own transaction when it succeeds and in a separate one when it is rejected.
CREATE TABLE command_log (
    command_id     uuid        PRIMARY KEY,
    command_type   text        NOT NULL,
    aggregate_type text        NOT NULL DEFAULT '',
    aggregate_id   text        NOT NULL DEFAULT '',
    correlation_id text        NOT NULL DEFAULT '',
    received_at    timestamptz NOT NULL,
    completed_at   timestamptz NOT NULL,
    outcome        text        NOT NULL CHECK (outcome IN ('succeeded', 'rejected', 'failed')),
    status_code    text        NOT NULL DEFAULT 'OK',
    error_message  text        NOT NULL DEFAULT '',
    event_ids      uuid[]      NOT NULL DEFAULT '{}',
    summary        jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX command_log_received_idx ON command_log (received_at);

-- Wake the relay as soon as an outbox row commits; the relay also polls as a fallback.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_inserted', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_notify_after_insert
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
