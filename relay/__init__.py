"""The relay: moves committed outbox rows to Redis pub/sub, each with a gap-free global position.

Run it with `python -m relay`; `relay.runner.Relay` is the testable core.

Election. Exactly one relay is active: the one holding a session-level advisory lock
(`pg_try_advisory_lock(RELAY_LOCK_KEY)`) on a dedicated connection, never a pooled one
(a pool resets released connections with `pg_advisory_unlock_all()`). Standbys retry
every RELAY_STANDBY_RETRY_S. The lock lives as long as the session: a killed relay's
socket closes, the server ends its session and a standby wins the next retry. The
session sets TCP keepalives and tcp_user_timeout, so a relay whose host vanished loses
the lock within about 11 s instead of hours.

Stepping down. The active relay stops relaying the moment it cannot prove it still holds
the lock: the connection's termination callback fires, or a check every
RELAY_HEARTBEAT_INTERVAL_S (bounded by DATABASE_CONNECT_TIMEOUT_S, so at most about 6 s
by default: shorter than the server's 11 s) fails. Its relaying task is cancelled and
awaited before anything else happens, and it goes back to standby. As a second line,
every claim checks in the same transaction, against `pg_locks`, that the lock session's
backend still holds the lock, so a relay that lost the lock cannot hand out positions.

Frozen relays. A relay that is alive but frozen (SIGSTOP, a VM pause, a blocked event
loop) cannot step down by itself, and its kernel keeps the TCP session, and with it the
lock, alive. The lock session therefore sets Postgres's idle_session_timeout to
RELAY_LOCK_IDLE_TIMEOUT_S (Postgres 14+): a healthy session queries every heartbeat or
standby retry, so only a frozen one stays idle that long; the server ends it and a
standby takes over. When the frozen relay wakes, its guard sees the lost session and its
next claim fails the fence; a batch it was publishing goes out again as duplicates.

Waking. The session that holds the lock also LISTENs on `outbox_inserted` (a trigger
notifies on commit); one connection keeps the two together: whoever holds the lock is
the one woken, and losing it loses both. A poll every RELAY_POLL_INTERVAL_S covers lost
notifications.

A cycle. (1) When leading begins, and after a failed cycle, publish every position above
what this relay has published (from the published watermark at first) up to relay_state's
last_position, read back from the outbox in position order: a crash or a failed publish
left them. No new positions are handed out before they have gone out. (2) Claim: one
statement reads the oldest ids of `outbox_pending` (the events without a position, queued
by a trigger in the inserting transaction), locks the `relay_state` row (only when it found
some), takes them off the queue, writes `(id, last_position + 1 ...)` in id order to
`outbox_position`, advances `relay_state` (and records the watermark while it is behind),
and commits; the events themselves (`outbox_event`) are never rewritten (decision 0040).
Events are claimed by status, never by "id greater than the last one": a bigserial id is
taken at insert time but becomes visible at commit time, so id 41 can commit after id 42
was read, and a cursor on ids would skip it for good (the comment on `_lock_table` in
pyeventsourcing's postgres.py explains the hazard; it serializes writers with a table lock
instead, which we avoid by numbering at relay time). The claim also reports where
positions stood before it: any it did not expect (a relay that was deposed without knowing
it claimed them) go out before its own.
(3) Publish the batch with one script call that PUBLISHes each envelope in order (one reply
instead of one per event), each envelope serialized once; a full batch is published while
the next one is claimed. (4) When the cycle ends, record the highest position published as
the watermark (`relay_state.published_position`). An event's row is written once, by its
command; its position once, by the claim; nothing marks it published.

Crash safety. Positions are committed before publishing. Publishing first and crashing
before the commit would let a later claim give the same positions to other events, and a
replica that applied the first would silently diverge. Committing first means a crash
anywhere re-publishes the same event at the same position (everything between the
watermark and last_position goes out again), which replicas skip as a duplicate; an event
is never skipped. The watermark only ever names positions that went out: it is written
after the publish, never moves back, and each relay only records a run it published
contiguously from the watermark it read. Redis down: the cycle retries with capped
backoff (WARNING on each attempt); at most two claimed batches wait (the one that failed
and the one claimed beside it), and no new positions are handed out until they have gone
out. Postgres down: the lock session is lost, the relay steps down and reconnects with
capped backoff.

Per-aggregate order. The write side locks the aggregate's row for the whole command, so
the command for version v+1 inserts its outbox row only after version v's transaction
committed. Its row therefore has a higher id, and it cannot be visible to a claim while
version v is not: v is claimed in the same batch (earlier in id order) or an earlier one,
and gets the lower position. Positions across aggregates follow commit visibility, which
is all a reader can observe anyway.

Heartbeat. Every RELAY_HEARTBEAT_INTERVAL_S the active relay publishes a StreamHead with
the highest position it has published on the head channel, after the events themselves
(same Redis, sequential commands), so a replica that lost the trailing message notices
the gap without polling Postgres.

No Redis stream. Events go to pub/sub only. Catch-up and rebuilds read the outbox table,
the durable, position-indexed log; a bounded Redis stream would be a second, partial copy
with its own trimming and consistency questions.

Tracing. Each published event gets a PRODUCER span whose parent is the envelope's
traceparent, so the trace of the command that produced it continues through the relay;
events without a trace context get no span.
"""
