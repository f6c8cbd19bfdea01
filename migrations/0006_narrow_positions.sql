-- Positions move out of the wide outbox row into a narrow table, so positioning an event
-- writes a small new row instead of a new version of the whole event (payload, trace
-- context, three index entries, one of them in the middle of the aggregate key).
--
-- - outbox_event: the events as commands write them; a row is never changed.
-- - outbox_pending: ids of the events without a position yet, filled by a trigger in the
--   inserting transaction (so visible exactly when the event is), emptied by the claim.
-- - outbox_position: event id -> gap-free position, written once by the claim.
-- - outbox: a view joining them, with the old table's columns, so the log is read as before
--   (catch-up, rebuilds, the log guard, the consistency gate, the saga). Writes through the
--   view still work (INSTEAD OF triggers), for tools and tests; the write service and the
--   relay write the tables themselves.

ALTER TABLE outbox RENAME TO outbox_event;

CREATE TABLE outbox_position (
    outbox_id bigint PRIMARY KEY,
    position  bigint NOT NULL CHECK (position > 0),
    -- Catch-up and rebuilds read ranges of positions; with the id in the index they need not
    -- visit this table (once a vacuum has marked its pages all-visible).
    CONSTRAINT outbox_position_position_key UNIQUE (position) INCLUDE (outbox_id)
);
INSERT INTO outbox_position (outbox_id, position)
SELECT id, position FROM outbox_event WHERE position IS NOT NULL;

CREATE TABLE outbox_pending (
    id bigint PRIMARY KEY
);
INSERT INTO outbox_pending (id)
SELECT id FROM outbox_event WHERE position IS NULL;

DROP INDEX outbox_position_key;
DROP INDEX outbox_unpositioned_idx;
ALTER TABLE outbox_event DROP COLUMN position;

-- One statement for all the rows an INSERT (or COPY) wrote; the NOTIFY trigger of 0001
-- moved with the table.
CREATE FUNCTION outbox_event_pending() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_pending (id) SELECT id FROM inserted;
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_event_pending_after_insert
    AFTER INSERT ON outbox_event
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_event_pending();

CREATE VIEW outbox AS
SELECT e.id, e.event_id, e.event_type, e.schema_version, e.aggregate_type, e.aggregate_id,
       e.aggregate_version, e.payload, e.occurred_at, e.correlation_id, e.causation_id,
       e.traceparent, e.tracestate, p.position
FROM outbox_event e
LEFT JOIN outbox_position p ON p.outbox_id = e.id;

ALTER VIEW outbox ALTER COLUMN id SET DEFAULT nextval('outbox_id_seq');
ALTER VIEW outbox ALTER COLUMN correlation_id SET DEFAULT '';
ALTER VIEW outbox ALTER COLUMN causation_id SET DEFAULT '';
ALTER VIEW outbox ALTER COLUMN traceparent SET DEFAULT '';
ALTER VIEW outbox ALTER COLUMN tracestate SET DEFAULT '';

-- Writing through the view (row by row: slow, for tools and tests, not for the services).
CREATE FUNCTION outbox_view_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO outbox_event (id, event_id, event_type, schema_version, aggregate_type, aggregate_id,
                                  aggregate_version, payload, occurred_at, correlation_id, causation_id,
                                  traceparent, tracestate)
        VALUES (NEW.id, NEW.event_id, NEW.event_type, NEW.schema_version, NEW.aggregate_type, NEW.aggregate_id,
                NEW.aggregate_version, NEW.payload, NEW.occurred_at, NEW.correlation_id, NEW.causation_id,
                NEW.traceparent, NEW.tracestate);
        IF NEW.position IS NOT NULL THEN
            DELETE FROM outbox_pending WHERE id = NEW.id;
            INSERT INTO outbox_position (outbox_id, position) VALUES (NEW.id, NEW.position);
        END IF;
        RETURN NEW;
    ELSIF TG_OP = 'UPDATE' THEN
        IF NEW.id IS DISTINCT FROM OLD.id THEN
            RAISE EXCEPTION 'an outbox row keeps its id';
        END IF;
        IF (NEW.event_id, NEW.event_type, NEW.schema_version, NEW.aggregate_type, NEW.aggregate_id,
            NEW.aggregate_version, NEW.payload, NEW.occurred_at, NEW.correlation_id, NEW.causation_id,
            NEW.traceparent, NEW.tracestate)
           IS DISTINCT FROM
           (OLD.event_id, OLD.event_type, OLD.schema_version, OLD.aggregate_type, OLD.aggregate_id,
            OLD.aggregate_version, OLD.payload, OLD.occurred_at, OLD.correlation_id, OLD.causation_id,
            OLD.traceparent, OLD.tracestate) THEN
            UPDATE outbox_event
            SET event_id = NEW.event_id, event_type = NEW.event_type, schema_version = NEW.schema_version,
                aggregate_type = NEW.aggregate_type, aggregate_id = NEW.aggregate_id,
                aggregate_version = NEW.aggregate_version, payload = NEW.payload, occurred_at = NEW.occurred_at,
                correlation_id = NEW.correlation_id, causation_id = NEW.causation_id,
                traceparent = NEW.traceparent, tracestate = NEW.tracestate
            WHERE id = OLD.id;
        END IF;
        IF NEW.position IS DISTINCT FROM OLD.position THEN
            DELETE FROM outbox_position WHERE outbox_id = OLD.id;
            IF NEW.position IS NULL THEN
                INSERT INTO outbox_pending (id) VALUES (OLD.id) ON CONFLICT DO NOTHING;
            ELSE
                DELETE FROM outbox_pending WHERE id = OLD.id;
                INSERT INTO outbox_position (outbox_id, position) VALUES (OLD.id, NEW.position);
            END IF;
        END IF;
        RETURN NEW;
    ELSE
        DELETE FROM outbox_position WHERE outbox_id = OLD.id;
        DELETE FROM outbox_pending WHERE id = OLD.id;
        DELETE FROM outbox_event WHERE id = OLD.id;
        RETURN OLD;
    END IF;
END;
$$;
CREATE TRIGGER outbox_view_write
    INSTEAD OF INSERT OR UPDATE OR DELETE ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_view_write();
