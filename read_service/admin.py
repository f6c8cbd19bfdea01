"""`python -m read_service.admin`: operate the read side's views.

    python -m read_service.admin parked [--json]
        Events a projection stopped at, with their errors (read_service.generations).
    python -m read_service.admin skip --projection users --position N [--by NAME] [--reason TEXT]
        Let the projection apply nothing for the parked event at N and go on; recorded with who
        and when. Only a parked position can be skipped, and the skip holds for the code version
        that parked it (a fixed version applies the event normally).
    python -m read_service.admin rebuild [--projection NAME | --all]
        Rebuild from the Postgres event log into a fresh key space, switch every replica to it,
        drop the old one (read_service.rebuild). Progress on standard error.

Reads REDIS_URL, REDIS_KEY_PREFIX and (for rebuild) DATABASE_URL like the replicas do.
Exit status: 0 done, 1 failed (the reason on standard error), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
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
from read_service.settings import ReadServiceSettings
from shared_kernel.db import create_pool
from shared_kernel.runtime import run

APPLICATION_NAME = "tessera-read-admin"


class AdminError(Exception):
    """A refusal or failure to report on standard error (exit status 1)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m read_service.admin", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    parked = commands.add_parser("parked", help="list parked events")
    parked.add_argument("--json", action="store_true", help="one JSON object per line")
    skip = commands.add_parser("skip", help="skip one parked event")
    skip.add_argument("--projection", required=True)
    skip.add_argument("--position", required=True, type=int)
    skip.add_argument("--by", default=None, help="who skips it (default: the login name)")
    skip.add_argument("--reason", default="", help="why, for the record")
    skip.add_argument(
        "--wait-s", type=float, default=10.0, help="how long to wait for the projection to move past it (0: no wait)"
    )
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


async def list_parked(client: aioredis.Redis, base: str, out: TextIO, as_json: bool) -> int:
    """Print the parked events; return how many there are."""
    events = await parked_events(client, base)
    if as_json:
        for event in events:
            out.write(event.to_json() + "\n")
    elif not events:
        out.write("no parked events\n")
    else:
        out.write(f"{'PROJECTION':<10} {'GEN':<10} {'POSITION':>10} {'EVENT_TYPE':<40} AGGREGATE PARKED_AT ERROR\n")
        for event in events:
            out.write(_row(event) + "\n")
    return len(events)


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
    event = events[0]
    # A projection run without generations parks with none: the skip is for this code's version.
    spec = registered_projections().get(projection)
    version = generation_version(event.generation) if event.generation else (spec.version if spec else 1)
    record: dict[str, object] = {
        "by": by,
        "at": datetime.now(UTC).isoformat(),
        "reason": reason,
        "event_id": event.event_id,
        "event_type": event.event_type,
        "error": event.error,
        "generation": event.generation,
    }
    await client.hset(skips_key(base, projection), skip_field(version, position), json.dumps(record, sort_keys=True))
    return record


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
        if args.command == "skip":
            by = args.by or getpass.getuser()
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
    if args.command == "skip" and args.position < 1:
        err.write("--position must be a positive integer\n")
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
