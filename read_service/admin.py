"""`python -m read_service.admin`: operate the read side's views.

    python -m read_service.admin parked [--json]
        What is parked: projections stopped at an event, and aggregates whose events wait behind
        one (decision 0029), with their errors and the operators' requests not yet carried out.
    python -m read_service.admin retry --projection orders --aggregate ID [--operator NAME] [--reason TEXT]
        Apply the parked aggregate's events again from the log, in order (after a fix).
    python -m read_service.admin skip --projection orders --aggregate ID --reason TEXT [--operator NAME]
        Drop the aggregate's first parked event and apply the rest. Recorded with who and why, and
        honoured by rebuilds (the skip holds for the code version that parked it).
    python -m read_service.admin skip --projection users --position N [--operator NAME] [--reason TEXT]
        With projection parking: let the projection apply nothing for the event it stopped at.
    python -m read_service.admin rebuild [--projection NAME | --all]
        Rebuild from the Postgres event log into a fresh key space, switch every replica to it,
        drop the old one (read_service.rebuild). Progress on standard error.

Retries and skips are requests: the replica applying the projection carries them out within a
probe interval, and the command waits for that (--wait-s). Who defaults to $USER. Reads
REDIS_URL, REDIS_KEY_PREFIX, PARKING_MODE and (for rebuild) DATABASE_URL like the replicas do.
Exit status: 0 done, 1 failed (the reason on standard error), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TextIO

import redis.asyncio as aioredis

from read_service.generations import (
    ParkedEvent,
    generation_version,
    parked_events,
    pointer_key,
    skip_field,
    skips_key,
)
from read_service.rebuild import RebuildConflict, RebuildParked, rebuild, registered_projections
from read_service.sequences import (
    find_parked,
    parked_aggregates,
    pending_requests,
    record_log,
    requests_key,
    served_keyspace,
)
from read_service.settings import ReadServiceSettings
from shared_kernel.platform.db import create_pool
from shared_kernel.platform.runtime import run

APPLICATION_NAME = "tessera-read-admin"


class AdminError(Exception):
    """A refusal or failure to report on standard error (exit status 1)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m read_service.admin", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    parked = commands.add_parser("parked", help="list parked events")
    parked.add_argument("--json", action="store_true", help="one JSON object per line")
    skip = commands.add_parser("skip", help="skip a parked aggregate's first event, or a projection's parked event")
    retry = commands.add_parser("retry", help="apply a parked aggregate's events again")
    for command in (skip, retry):
        command.add_argument("--projection", required=True)
        command.add_argument("--by", "--operator", dest="by", default=None, help="who (default: $USER)")
        command.add_argument("--reason", default="", help="why, for the record (required for an aggregate's skip)")
        command.add_argument(
            "--wait-s", type=float, default=10.0, help="how long to wait for a replica to carry it out (0: no wait)"
        )
    retry.add_argument("--aggregate", required=True, help="the parked aggregate's id")
    target = skip.add_mutually_exclusive_group(required=True)
    target.add_argument("--aggregate", help="the parked aggregate's id")
    target.add_argument("--position", type=int, help="the event a parked projection stopped at")
    build = commands.add_parser("rebuild", help="blue/green rebuild from the event log")
    which = build.add_mutually_exclusive_group(required=True)
    which.add_argument("--projection", choices=sorted(registered_projections()))
    which.add_argument("--all", action="store_true")
    build.add_argument("--batch-size", type=int, default=5000)
    build.add_argument("--grace-s", type=float, default=2.0, help="wait between the switch and the drop")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _row(event: ParkedEvent) -> str:
    return (
        f"{event.projection:<10} {event.generation or '-':<10} {event.position:>10} {event.event_type:<40} "
        f"{event.aggregate_type}/{event.aggregate_id} {event.parked_at} {event.error}"
    )


def _aggregate_row(event: ParkedEvent, request: dict[str, object] | None) -> str:
    asked = "" if request is None else f" [{request.get('action')} asked by {request.get('by')}]"
    return (
        f"{event.projection:<10} {event.generation or '-':<10} {event.position:>10} {event.event_type:<40} "
        f"{event.aggregate_type}/{event.aggregate_id} held={event.held} {event.parked_at} {event.error}{asked}"
    )


async def list_parked(client: aioredis.Redis, base: str, out: TextIO, as_json: bool) -> int:
    """Print the parked events and aggregates; return how many there are."""
    events = await parked_events(client, base)
    aggregates: list[tuple[ParkedEvent, dict[str, object] | None]] = []
    for name in sorted(registered_projections()):
        requests = await pending_requests(client, base, name)
        for field, record in await parked_aggregates(client, base, name):
            aggregates.append((record, requests.get(field)))
    if as_json:
        for event in events:
            out.write(event.to_json() + "\n")
        for record, request in aggregates:
            row = {"scope": "aggregate", **json.loads(record.to_json()), "request": request}
            out.write(json.dumps(row, sort_keys=True) + "\n")
    elif not events and not aggregates:
        out.write("no parked events\n")
    else:
        if events:
            out.write(f"{'PROJECTION':<10} {'GEN':<10} {'POSITION':>10} {'EVENT_TYPE':<40} AGGREGATE PARKED_AT ERROR\n")
            for event in events:
                out.write(_row(event) + "\n")
        if aggregates:
            out.write("parked aggregates (their later events wait behind the position):\n")
            for record, request in aggregates:
                out.write(_aggregate_row(record, request) + "\n")
    return len(events) + len(aggregates)


async def request(
    client: aioredis.Redis, base: str, projection: str, aggregate_id: str, action: str, *, by: str, reason: str
) -> tuple[str, ParkedEvent]:
    """Ask the applying replica to retry or skip a parked aggregate; AdminError when it is not parked."""
    found = find_parked(await parked_aggregates(client, base, projection), aggregate_id)
    if found is None:
        raise AdminError(
            f"no aggregate {aggregate_id!r} is parked in projection {projection!r}; "
            "see `python -m read_service.admin parked`"
        )
    field, record = found
    at = datetime.now(UTC).isoformat()
    if action == "skip":
        await _record_skip(client, base, record, by=by, reason=reason)
    asked = {"action": action, "position": record.position, "by": by, "reason": reason, "at": at}
    keyspace, _ = await served_keyspace(client, base, projection)
    await client.hset(requests_key(keyspace, projection), field, json.dumps(asked, sort_keys=True))
    await record_log(client, base, projection, {**asked, "aggregate": field, "outcome": "requested"})
    return field, record


async def _carried_out(client: aioredis.Redis, base: str, projection: str, field: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        requests = await pending_requests(client, base, projection)
        if field not in requests:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)


async def _record_skip(
    client: aioredis.Redis, base: str, event: ParkedEvent, *, by: str, reason: str
) -> dict[str, object]:
    # A projection run without generations parks with none: the skip is for this code's version.
    spec = registered_projections().get(event.projection)
    version = generation_version(event.generation) if event.generation else (spec.version if spec else 1)
    record: dict[str, object] = {
        "by": by,
        "at": datetime.now(UTC).isoformat(),
        "reason": reason,
        "event_id": event.event_id,
        "event_type": event.event_type,
        "aggregate": f"{event.aggregate_type}/{event.aggregate_id}",
        "error": event.error,
        "generation": event.generation,
    }
    field = skip_field(version, event.position)
    await client.hset(skips_key(base, event.projection), field, json.dumps(record, sort_keys=True))
    return record


async def skip(
    client: aioredis.Redis, base: str, projection: str, position: int, *, by: str, reason: str
) -> dict[str, object]:
    """Record an operator's skip of the parked event at `position`; AdminError when nothing is parked there."""
    events = [e for e in await parked_events(client, base) if e.projection == projection and e.position == position]
    if not events:
        raise AdminError(
            f"no event of projection {projection!r} is parked at position {position}; "
            "see `python -m read_service.admin parked`"
        )
    return await _record_skip(client, base, events[0], by=by, reason=reason)


async def _moved_past(client: aioredis.Redis, base: str, projection: str, position: int, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        events = await parked_events(client, base)
        if not any(e.projection == projection and e.position == position for e in events):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)


async def _main(args: argparse.Namespace, settings: ReadServiceSettings, out: TextIO, err: TextIO) -> int:
    base = settings.redis_key_prefix
    client = aioredis.Redis.from_url(str(settings.redis_url), socket_timeout=settings.redis_socket_timeout_s)
    try:
        if args.command == "parked":
            await list_parked(client, base, out, args.json)
            return 0
        if args.command in ("retry", "skip") and args.aggregate is not None:
            return await _request(client, base, args, out)
        if args.command == "skip":
            by = _operator(args)
            await skip(client, base, args.projection, args.position, by=by, reason=args.reason)
            out.write(f"skip of {args.projection} position {args.position} recorded (by {by})\n")
            if args.wait_s > 0:
                if await _moved_past(client, base, args.projection, args.position, args.wait_s):
                    out.write("the projection moved past it\n")
                else:
                    out.write(
                        f"no replica moved past it within {args.wait_s:g} s (none running?); "
                        "the skip applies when one does\n"
                    )
            return 0
        return await _rebuild(args, settings, client, out, err)
    finally:
        await client.aclose()


def _operator(args: argparse.Namespace) -> str:
    by: str = args.by or os.environ.get("USER") or getpass.getuser()
    return by


async def _request(client: aioredis.Redis, base: str, args: argparse.Namespace, out: TextIO) -> int:
    by = _operator(args)
    field, record = await request(
        client, base, args.projection, args.aggregate, args.command, by=by, reason=args.reason
    )
    out.write(
        f"{args.command} of {record.aggregate_type}/{record.aggregate_id} (parked at {record.position}, "
        f"{record.held} held) in {args.projection} asked by {by}\n"
    )
    if args.wait_s <= 0:
        return 0
    if not await _carried_out(client, base, args.projection, field, args.wait_s):
        out.write(f"no replica carried it out within {args.wait_s:g} s (none running?); it stays asked\n")
        return 0
    now = find_parked(await parked_aggregates(client, base, args.projection), args.aggregate)
    if now is not None:
        out.write(f"still parked at position {now[1].position}: {now[1].error}\n")
    else:
        out.write("settled: its events are applied\n")
    return 0


async def _rebuild(
    args: argparse.Namespace, settings: ReadServiceSettings, client: aioredis.Redis, out: TextIO, err: TextIO
) -> int:
    specs = registered_projections()
    names: Sequence[str] = sorted(specs) if args.all else [args.projection]
    pool = await create_pool(settings, APPLICATION_NAME)
    try:
        for name in names:
            spec = specs[name]
            old_raw = await client.get(pointer_key(settings.redis_key_prefix, name))
            old = old_raw.decode() if isinstance(old_raw, bytes) else old_raw
            try:
                result = await rebuild(
                    client,
                    pool,
                    settings.redis_key_prefix,
                    spec,
                    batch_size=args.batch_size,
                    grace_s=args.grace_s,
                    stream=None if args.quiet else err,
                    parking=settings.parking_mode,
                )
            except RebuildParked as exc:
                raise AdminError(
                    f"{exc}; the rebuild was abandoned and the event is parked: fix the projection, or skip it "
                    f"(python -m read_service.admin skip --projection {name} --position {exc.record.position}) "
                    "and rebuild again"
                ) from exc
            except RebuildConflict as exc:
                raise AdminError(str(exc)) from exc
            out.write(
                f"{name}: generation {result.generation} built from {result.events:,} events up to position "
                f"{result.checkpoint} in {result.elapsed_s:.2f} s ({result.events_per_s:,.0f} events/s); "
                f"replaced {old or 'nothing'}, {result.dropped_keys:,} old keys removed\n"
            )
    finally:
        await pool.close()
    return 0


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "skip" and args.position is not None and args.position < 1:
        err.write("--position must be a positive integer\n")
        return 2
    if args.command == "skip" and args.aggregate is not None and not args.reason.strip():
        err.write("--reason is required to skip an aggregate's event\n")
        return 2
    if args.command == "rebuild" and args.batch_size < 1:
        err.write("--batch-size must be a positive integer\n")
        return 2
    settings = ReadServiceSettings()
    try:
        return run(_main(args, settings, out, err))
    except AdminError as exc:
        err.write(f"error: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
