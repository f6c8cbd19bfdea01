"""The final-state checks: Postgres against itself, and against the workload's own account.

Within Postgres: every user row's version equals the number of its events (versions
1..v, no gaps), every event's aggregate has a row, every event belongs to a succeeded
command-log row and the reverse, positions are exactly 1..N and all published, and per
aggregate the positions rise with the versions.

Against the workload: every acknowledged command has exactly one event, on the user and
at the version its reply named; no command has more than one event (a duplicate effect);
no event carries a correlation id the workload never sent; each user's final version is
the number of the workload's commands that took effect on it.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from typing import Any

import asyncpg

from tests.chaos.workload import Command, Workload


async def write_side_figures(database_url: str, workload: Workload, *, may_lose_acks: bool = False) -> dict[str, Any]:
    """Compare the outbox, users and command log with each other and with the workload.

    `may_lose_acks` is for a failover onto an asynchronous standby, which may lack the last
    commits the old primary acknowledged: those are counted as `acked_lost` instead of
    `lost_acks`, and what later commands on the same users met because of them (NOT_FOUND,
    a lower version than the client expected) is counted apart, not as a finding.
    """
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        events = await conn.fetch(
            "SELECT event_id::text, correlation_id, causation_id, aggregate_id, aggregate_version, position,"
            " coalesce(position <= published_position, false) AS published,"
            " extract(epoch FROM occurred_at)::float8 AS occurred FROM outbox CROSS JOIN relay_state",
            timeout=60,
        )
        users = await conn.fetch("SELECT id::text AS id, version FROM users", timeout=60)
        log = await conn.fetch(
            "SELECT command_id::text, correlation_id, event_ids::text[] AS event_ids FROM command_log"
            " WHERE outcome = 'succeeded'",
            timeout=60,
        )
        last_position = int(await conn.fetchval("SELECT last_position FROM relay_state", timeout=5) or 0)
    finally:
        await conn.close()

    total = len(events)
    positions = sorted(e["position"] for e in events if e["position"] is not None)
    unpositioned = total - len(positions)
    position_gaps = (
        0 if positions == list(range(1, len(positions) + 1)) else len(set(range(1, total + 1)) - set(positions))
    )
    unpublished = sum(1 for e in events if not e["published"])

    by_aggregate: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for event in events:
        by_aggregate[event["aggregate_id"]].append(event)
    version_of = {u["id"]: int(u["version"]) for u in users}
    order_violations = 0
    version_breaks = 0
    for rows in by_aggregate.values():
        rows.sort(key=lambda e: e["aggregate_version"])
        if [e["aggregate_version"] for e in rows] != list(range(1, len(rows) + 1)):
            version_breaks += 1
        placed = [e["position"] for e in rows if e["position"] is not None]
        if any(later <= earlier for earlier, later in itertools.pairwise(placed)):
            order_violations += 1
    state_without_events = sum(1 for uid, v in version_of.items() if len(by_aggregate.get(uid, ())) != v)
    events_without_state = sum(1 for aggregate in by_aggregate if aggregate not in version_of)

    logged_events = {event_id for row in log for event_id in row["event_ids"]}
    logged_commands = {row["command_id"] for row in log}
    event_ids = {e["event_id"] for e in events}
    events_without_log = sum(
        1 for e in events if e["event_id"] not in logged_events or e["causation_id"] not in logged_commands
    )
    log_without_events = sum(1 for row in log if not set(row["event_ids"]) <= event_ids)

    # Against the workload's own account.
    events_by_key: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for event in events:
        events_by_key[event["correlation_id"]].append(event)
    known_keys = {c.key for c in workload.commands}
    # Each finding is counted, and the first few commands behind it are named for the logs.
    findings: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)

    def found(kind: str, command: Command) -> None:
        findings[kind] += 1
        if len(examples[kind]) < 5:
            examples[kind].append(f"{command.key} ({command.kind}, answered {command.code})")

    unknown_applied = 0
    # Retried commands whose effect predates their last attempt: that attempt was answered
    # from the first one (a lost reply, an idempotent replay), not applied again.
    replayed = 0
    applied_per_user: Counter[str] = Counter()
    lost_users = _users_with_lost_acks(workload, events_by_key) if may_lose_acks else set()
    after_lost: Counter[str] = Counter()
    for command in workload.commands:
        if command.user_id in lost_users and _explained_by_loss(command, events_by_key):
            after_lost[command.outcome] += 1
            continue
        produced = events_by_key.get(command.key, [])
        if len(produced) > 1:
            found("duplicate_effects", command)
        if command.outcome == "ok":
            if not produced:
                found("lost_acks", command)
            elif _disagrees(command, produced):
                found("ack_mismatches", command)
            if command.attempts > 1 and produced and produced[0]["occurred"] < command.last_attempt_wall:
                replayed += 1
        elif produced:
            if command.outcome == "unknown":
                unknown_applied += 1
            else:
                # A command answered with a non-retryable error must have left nothing behind.
                found("rejected_but_applied", command)
        if command.outcome == "rejected":
            found("rejected", command)
        for event in produced:
            applied_per_user[event["aggregate_id"]] += 1
    phantom_events = sum(len(rows) for key, rows in events_by_key.items() if key not in known_keys)
    version_mismatch = sum(1 for uid, count in applied_per_user.items() if version_of.get(uid) != count)

    half_applied = (
        state_without_events + events_without_state + events_without_log + log_without_events + version_breaks
    )
    return {
        "events": total,
        "users": len(users),
        "relay_last_position": last_position,
        "unpositioned": unpositioned,
        "position_gaps": position_gaps,
        "unpublished": unpublished,
        "per_aggregate_order_violations": order_violations,
        "state_without_events": state_without_events,
        "events_without_state": events_without_state,
        "events_without_command_log": events_without_log,
        "command_log_without_events": log_without_events,
        "version_sequence_breaks": version_breaks,
        "half_applied": half_applied,
        "lost_acks": findings["lost_acks"],
        "rejected": findings["rejected"],
        "ack_mismatches": findings["ack_mismatches"],
        "rejected_but_applied": findings["rejected_but_applied"],
        "duplicate_effects": findings["duplicate_effects"],
        "unknown_applied": unknown_applied,
        "retried_commands": sum(1 for c in workload.commands if c.attempts > 1),
        "retries_answered_from_first_effect": replayed,
        "phantom_events": phantom_events,
        "final_version_mismatches": version_mismatch,
        "examples": dict(examples),
        **(
            {
                "acked_lost": sum(1 for c in workload.commands if _lost(c, events_by_key)),
                "commands_after_a_lost_ack": dict(after_lost),
                "lost_user_ids": sorted(u for u in lost_users if u not in version_of),
            }
            if may_lose_acks
            else {}
        ),
    }


def _lost(command: Command, events_by_key: dict[str, list[asyncpg.Record]]) -> bool:
    """An acknowledged command with no event."""
    return command.outcome == "ok" and not events_by_key.get(command.key)


def _users_with_lost_acks(workload: Workload, events_by_key: dict[str, list[asyncpg.Record]]) -> set[str]:
    """Users on which an acknowledged command has no event."""
    return {c.user_id for c in workload.commands if c.user_id is not None and _lost(c, events_by_key)}


def _explained_by_loss(command: Command, events_by_key: dict[str, list[asyncpg.Record]]) -> bool:
    """A command on a user with a lost ack that is itself lost, rejected, or acknowledged at another version.

    Anything else (a duplicate effect, a rejected command that left an event) stays a finding.
    """
    produced = events_by_key.get(command.key, [])
    if command.outcome == "ok":
        return not produced or (_disagrees(command, produced) and len(produced) == 1)
    return command.outcome == "rejected" and not produced


def _disagrees(command: Command, produced: list[asyncpg.Record]) -> bool:
    """Whether an acknowledged command's event is not on the user and at the version its reply named."""
    if any(e["aggregate_id"] != command.user_id or e["aggregate_version"] != command.version for e in produced):
        return True
    return command.expected_version is not None and command.version != command.expected_version


def invariant_failures(figures: dict[str, Any]) -> list[str]:
    """The invariants every scenario must keep, as messages for the figures that break them."""
    failures = []
    zero = (
        "lost_events",
        "lost_acks",
        "ack_mismatches",
        "rejected_but_applied",
        "duplicate_effects",
        "phantom_events",
        "half_applied",
        "final_version_mismatches",
        "out_of_order",
        "diverged_views",
        "served_absent_users",
        "rejected",
        "unpositioned",
        "position_gaps",
        "unpublished",
        "unexpected_exits",
    )
    for name in zero:
        value = figures.get(name)
        if value:
            failures.append(f"{name} = {value}")
    if figures.get("relay_last_position") != figures.get("events"):
        failures.append(
            f"relay_state.last_position {figures.get('relay_last_position')} != events {figures.get('events')}"
        )
    if figures.get("converge_s") is None and "converge_s" in figures:
        failures.append("views did not catch up before the deadline")
    if figures.get("getuser_sweep_s") is None and "getuser_sweep_s" in figures:
        failures.append("GetUser on every replica did not match Postgres before the deadline")
    return failures
