-- The relay records what it has published as one watermark in relay_state instead of a
-- published_at per outbox row: every row used to be rewritten twice (positioned, then
-- published), each time with all of its index entries. Positioning is now the only
-- rewrite of a row.
--
-- published_position: every position up to it has been published. Positions in
-- (published_position, last_position] were handed out but may not have gone out; the active
-- relay publishes them again (a duplicate at the same position, which replicas skip).

ALTER TABLE relay_state ADD COLUMN published_position bigint NOT NULL DEFAULT 0;

-- Rows already published stay published: the watermark stops just before the first
-- positioned row that was never marked published (all of them are published again,
-- along with any published row after it), or at last_position when there is none.
UPDATE relay_state
SET published_position = coalesce(
    (SELECT min(position) - 1 FROM outbox WHERE position IS NOT NULL AND published_at IS NULL),
    last_position
)
WHERE singleton;

ALTER TABLE relay_state
    ADD CONSTRAINT relay_state_published_within_positioned
    CHECK (published_position >= 0 AND published_position <= last_position);

-- Nothing reads these any more: the backlog is the unpositioned rows plus
-- last_position - published_position. Dropping a column rewrites no data.
DROP INDEX outbox_unpublished_idx;
ALTER TABLE outbox DROP CONSTRAINT IF EXISTS outbox_check;
ALTER TABLE outbox DROP COLUMN published_at;
ALTER TABLE outbox DROP COLUMN positioned_at;

-- The unique constraint on position also indexed every unpositioned row (under NULL): an
-- entry written at insert, dead after positioning, and walked by the planner when it
-- answered "is any row unpositioned?" from this index instead of the partial one. Only
-- positioned rows need the index (catch-up and rebuilds read ranges of positions, and it
-- keeps positions unique), so it now holds only them.
ALTER TABLE outbox DROP CONSTRAINT outbox_position_key;
CREATE UNIQUE INDEX outbox_position_key ON outbox (position) WHERE position IS NOT NULL;

-- Nothing looks an event up by its id (the relay, catch-up, rebuilds and the write side
-- go by position or by aggregate), and each row's id is a fresh random UUID: the same
-- event written twice is already refused by the unique (aggregate_type, aggregate_id,
-- aggregate_version). The index only cost an entry at every insert and every positioning.
ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key;
