"""Figure 8: resident memory of a read replica and of the write service, before and after two equal loads.

Read replica: user events are written in bulk into the outbox (as commands leave them) and
flow through one relay to one replica; a last UserRegistered marks the end of each batch, and
the batch counts as consumed when the replica answers GetUser for it. A small warm-up batch
first, then two runs of the same size. Write service: a warm-up, then two runs of AddProduct
(`python -m perf loadtest write`, closed model, several client processes), each as long
as the wanted number of commands takes at the warm-up's rate. RSS is that of the
service process and any processes in its group, read from /proc.

The row's value is the RSS after run 2, its baseline the RSS after run 1, so the ratio shows
the growth in run 2; a service that has reached its steady state stays near 1.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import grpc

from devstack.supervisor import ServiceProcess
from perf.bench.relay_bench import insert_backlog
from perf.bench.table import Goal, Row
from perf.bench.tools import LOADTEST, number
from perf.bench.write_bench import ok_rps, service_load
from perf.stack import Backing, bench_stack, process_group_rss_mb, scratch
from tessera.users.v1 import user_query_service_pb2 as user_queries
from tessera.users.v1 import user_query_service_pb2_grpc as user_queries_grpc
from tessera.users.v1.events_pb2 import UserRegistered

GROWTH_GOAL = 1.05


@dataclass(frozen=True, slots=True)
class MemorySizes:
    """Events per replica run and commands per write-service run."""

    events: int = 1_000_000
    commands: int = 100_000
    warmup_events: int = 20_000
    warmup_s: float = 10.0  # of commands; the rate it shows sizes the two runs
    processes: int = 2
    concurrency: int = 32
    timeout_s: float = 600.0


def memory_rows() -> list[Row]:
    """The rows this bench fills."""
    return [
        Row(
            key="memory",
            figure="read replica RSS after run 2 of user events",
            unit="MB",
            goal=Goal("ratio", "<=", GROWTH_GOAL),
            how="bulk outbox rows → one relay → one replica",
            ceiling_label="RSS after run 1",
        ),
        Row(
            key="memory",
            figure="write service RSS after run 2 of AddProduct commands",
            unit="MB",
            goal=Goal("ratio", "<=", GROWTH_GOAL),
            how="closed-loop AddProduct clients",
            ceiling_label="RSS after run 1",
        ),
    ]


_INSERT_SENTINEL = """
INSERT INTO outbox_event (event_id, event_type, schema_version, aggregate_type, aggregate_id, aggregate_version,
                    payload, occurred_at)
VALUES ($1, $2, 1, 'user', $3, 1, $4, $5)
"""


async def _append_sentinel(conn: asyncpg.Connection[asyncpg.Record]) -> str:
    """Append one UserRegistered after everything else in the outbox; return its user id."""
    user_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    payload = UserRegistered(
        user_id=user_id, email=f"mark-{user_id}@example.com", username=f"mark{user_id[:8]}", full_name="Marker"
    )
    payload.registered_at.FromDatetime(now)
    await conn.execute(
        _INSERT_SENTINEL, uuid.uuid4(), payload.DESCRIPTOR.full_name, user_id, payload.SerializeToString(), now
    )
    return user_id


async def _wait_user(address: str, user_id: str, timeout_s: float, process: ServiceProcess) -> float:
    """Seconds until the replica at `address` answers GetUser for `user_id`."""
    began = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = user_queries_grpc.UserQueryServiceStub(channel)
        while True:
            try:
                await stub.GetUser(user_queries.GetUserRequest(user_id=user_id), timeout=5.0)
                return time.monotonic() - began
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
            if not process.running:
                raise RuntimeError(f"the replica exited: {process.log_tail(10)}")
            if time.monotonic() - began > timeout_s:
                raise TimeoutError(f"the replica did not consume the batch within {timeout_s:g} s")
            await asyncio.sleep(0.1)


async def _replica_memory(backing: Backing, sizes: MemorySizes, row: Row) -> None:
    async with scratch(backing, "memory-read") as place:
        with bench_stack(place, relays=1, readers=1) as stack:
            reader = stack.readers[0]
            assert reader.pid is not None
            conn = await asyncpg.connect(place.database_url)
            try:
                rss: list[float] = []
                times: list[float] = []
                for seed, count in enumerate((sizes.warmup_events, sizes.events, sizes.events), start=200):
                    await insert_backlog(place.database_url, count, seed=seed)
                    marker = await _append_sentinel(conn)
                    times.append(await _wait_user(reader.address, marker, sizes.timeout_s, reader))
                    rss.append(process_group_rss_mb(reader.pid))
            finally:
                await conn.close()
    _fill(row, rss)
    row.how = f"{sizes.events:,} user events per run → one relay → one replica"
    row.notes.append(
        f"consumed in {times[1]:.1f} s and {times[2]:.1f} s ({sizes.events / times[1]:,.0f} and "
        f"{sizes.events / times[2]:,.0f} events/s, insert excluded)"
    )


async def _write_memory(backing: Backing, sizes: MemorySizes, row: Row) -> None:
    async with scratch(backing, "memory-write") as place:
        with bench_stack(place, relays=0, readers=0) as stack:
            assert stack.write is not None and stack.write.pid is not None
            rss: list[float] = []
            done: list[int] = []
            duration_s = sizes.warmup_s
            for _ in range(3):
                report = await asyncio.to_thread(
                    service_load,
                    stack.write_address,
                    processes=sizes.processes,
                    concurrency=sizes.concurrency,
                    duration_s=duration_s,
                )
                rss.append(process_group_rss_mb(stack.write.pid))
                done.append(int(number(report, "ok")))
                if report.get("errors"):
                    row.notes.append(f"failed commands: {report['errors']}")
                # Both runs last as long as `commands` takes at the warm-up's rate.
                if len(done) == 1:
                    duration_s = max(1.0, sizes.commands / max(ok_rps(report), 1.0))
    _fill(row, rss)
    row.how = f"~{sizes.commands:,} AddProduct commands per run, {LOADTEST} write, {sizes.processes} client processes"
    row.notes.append(f"commands that succeeded (warm-up, run 1, run 2): {', '.join(f'{n:,}' for n in done)}")


def _fill(row: Row, rss: list[float]) -> None:
    warm, first, second = rss
    row.value = second
    row.ceiling = first
    row.notes.append(
        f"RSS after warm-up {warm:.1f} MB, after run 1 {first:.1f} MB, after run 2 {second:.1f} MB "
        f"(growth in run 2: {(second / first - 1) * 100:+.1f} %)"
    )


async def measure_memory(backing: Backing, sizes: MemorySizes) -> list[Row]:
    """Fill both memory rows; a failure of one leaves the other measured."""
    rows = memory_rows()
    for row, measure in zip(rows, (_replica_memory, _write_memory), strict=True):
        try:
            await measure(backing, sizes, row)
        except (Exception, TimeoutError) as exc:
            row.fail(f"{type(exc).__name__}: {exc}"[:300])
    return rows
