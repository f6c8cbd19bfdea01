"""Measure the applying lease's takeover time: the replica that applies is killed (SIGKILL), how long until
the other one applies again?

Starts a stack of its own (write service, one relay, two read replicas sharing one Redis, over
DATABASE_URL / REDIS_URL when set, embedded servers otherwise), registers users at a steady
rate through the write service so that events keep flowing, then, `--rounds` times: finds the
replica holding the users projection's lease, kills it with SIGKILL, and measures from the kill
until the served checkpoint in Redis moves past where it stood at the kill (the new holder has
applied an event). The killed replica is started again before the next round. Prints each
round and the median, and optionally writes JSON.

    python -m perf lease --rounds 5 --json results/lease_takeover.json

The expected figure is about the lease TTL (READ_LEASE_TTL_MS, 2,000 ms by default) minus the
time since the holder's last renewal, plus up to a few milliseconds of polling and the new
holder's catch-up: between TTL - renew interval and TTL + a little.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import redis.asyncio as aioredis

from devstack.supervisor import ServiceProcess, Stack
from perf.report import write_json
from perf.stack import tool_stack, tool_stack_config
from read_service.generations import served_checkpoint
from read_service.lease import lease_key
from read_service.projections.users import UsersProjection
from tessera.users.v1 import user_command_service_pb2 as commands
from tessera.users.v1 import user_command_service_pb2_grpc as commands_grpc

POLL_S = 0.002


async def register_steadily(write_address: str, stop: asyncio.Event, pause_s: float = 0.01) -> int:
    """Register users one after another until `stop` is set; return how many."""
    count = 0
    tag = secrets.token_hex(3)
    async with grpc.aio.insecure_channel(write_address) as channel:
        stub = commands_grpc.UserCommandServiceStub(channel)
        while not stop.is_set():
            request = commands.RegisterUserRequest(
                email=f"lease.{tag}.{count}@example.com",
                username=f"lease_{tag}_{count}",
                password="lease-takeover-Pa55",  # noqa: S106 - a throwaway user of the measurement
                full_name=f"Lease {count}",
            )
            await stub.RegisterUser(request, timeout=10)
            count += 1
            await asyncio.sleep(pause_s)
    return count


async def holder_process(client: aioredis.Redis, key: str, readers: Sequence[ServiceProcess]) -> ServiceProcess | None:
    """The running replica whose process holds the lease (its token is `<replica id>/<pid>#<random>`)."""
    token = await client.get(key)
    if not isinstance(token, bytes):
        return None
    pid = int(token.decode().split("#", 1)[0].rsplit("/", 1)[1])
    return next((reader for reader in readers if reader.pid == pid and reader.running), None)


async def wait_for(check: object, timeout_s: float, what: str) -> None:
    """Poll the coroutine function `check` every POLL_S until it returns true; raise at the deadline."""
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_S)


async def measure(stack: Stack, rounds: int) -> list[dict[str, object]]:
    """Kill the users lease holder `rounds` times; each round's figures."""
    prefix = stack.config.redis_key_prefix
    key = lease_key(prefix, "users", int(getattr(UsersProjection, "version", 1)))
    client = aioredis.Redis.from_url(stack.redis_url)
    stop = asyncio.Event()
    load = asyncio.create_task(register_steadily(stack.write_address, stop))
    results: list[dict[str, object]] = []
    try:
        for number in range(1, rounds + 1):

            async def has_holder() -> bool:
                return await holder_process(client, key, stack.readers) is not None

            await wait_for(has_holder, 30, "a lease holder")
            holder = await holder_process(client, key, stack.readers)
            assert holder is not None
            start = await served_checkpoint(client, prefix, "users")

            async def flowing(start: int = start) -> bool:
                return await served_checkpoint(client, prefix, "users") > start

            await wait_for(flowing, 30, "events to flow")
            holder.kill()
            killed = time.monotonic()
            at_kill = await served_checkpoint(client, prefix, "users")

            async def applied_again(at_kill: int = at_kill) -> bool:
                return await served_checkpoint(client, prefix, "users") > at_kill

            await wait_for(applied_again, 60, "the other replica to apply")
            takeover_ms = (time.monotonic() - killed) * 1000
            new_holder = await holder_process(client, key, stack.readers)
            results.append(
                {
                    "round": number,
                    "takeover_ms": round(takeover_ms, 1),
                    "checkpoint_at_kill": at_kill,
                    "killed": holder.name,
                    "new_holder": None if new_holder is None else new_holder.name,
                }
            )
            print(
                f"round {number}: killed {holder.name} at checkpoint {at_kill}; "
                f"{results[-1]['new_holder']} applied again after {takeover_ms:.0f} ms",
                flush=True,
            )
            # Two replicas again for the next round.
            holder.start()
            await holder.wait_healthy_async(60)
    finally:
        stop.set()
        await load
        await client.aclose()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement; print the median and write JSON when asked."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="kills to measure")
    parser.add_argument("--ttl-ms", type=int, default=2000, help="READ_LEASE_TTL_MS of the replicas")
    parser.add_argument("--renew-ms", type=int, default=500, help="READ_LEASE_RENEW_MS of the replicas")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    config = tool_stack_config(
        "lease",
        read_ports=(0, 0),
        relays=1,
        env={
            "READ_APPLY_MODE": "lease",
            "READ_LEASE_TTL_MS": str(args.ttl_ms),
            "READ_LEASE_RENEW_MS": str(args.renew_ms),
        },
    )
    with tool_stack(config) as stack:
        rounds = asyncio.run(measure(stack, args.rounds))
    figures = [float(str(r["takeover_ms"])) for r in rounds]
    report = {
        "cores": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "lease_ttl_ms": args.ttl_ms,
        "lease_renew_ms": args.renew_ms,
        "rounds": rounds,
        "takeover_ms_median": round(statistics.median(figures), 1),
        "takeover_ms_min": min(figures),
        "takeover_ms_max": max(figures),
    }
    print(
        f"lease takeover (TTL {args.ttl_ms} ms, renew every {args.renew_ms} ms): "
        f"median {report['takeover_ms_median']} ms over {len(figures)} kills "
        f"(min {report['takeover_ms_min']}, max {report['takeover_ms_max']})"
    )
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
