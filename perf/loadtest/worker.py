"""One client process of the python engine (started by `perf.loadtest.engine`, not by hand).

It reads its plan (one JSON line) from stdin, opens its channels, prints `ready`, reads the
common start time (epoch seconds) from stdin, runs the load model until the end of the window
and prints, as JSON lines on stdout, one record per second (latencies of successful calls and
errors by gRPC status code, by the second the call ended in) and a final `done` record.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from perf.loadtest.requests import Call, CommandSource, QuerySource, SeedData, bearer_token, send_command
from perf.loadtest.schedule import due_offsets
from perf.loadtest.stats import Second
from shared_kernel.platform.runtime import run
from tessera_client import ChannelOptions, TesseraClient, TesseraError

# Most time a channel may take to connect before the run starts anyway (its calls then fail).
CONNECT_TIMEOUT_S = 5.0
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


@dataclass
class Plan:
    """What one client process does; the orchestrator sends it as JSON."""

    mode: str  # "read" or "write"
    targets: list[str]
    process_index: int
    processes: int
    duration_s: float
    rate: float | None = None  # the whole run's rate (open model)
    concurrency: int | None = None  # this process's loops (closed model)
    seed_path: str | None = None
    mix: dict[str, int] = field(default_factory=dict)
    hot: bool = False
    command: str = "register_user"
    product_ids: list[str] = field(default_factory=list)
    connections: int = 2
    timeout_s: float = 10.0
    max_in_flight: int = 20_000
    metadata: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The plan `to_json` wrote."""
        data = json.loads(text)
        data["metadata"] = [tuple(pair) for pair in data.get("metadata", [])]
        return cls(**data)


async def connect(channel: grpc.aio.Channel, within_s: float) -> bool:
    """Try to connect `channel`; True once READY, False when it failed or did not connect in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    state = channel.get_state(try_to_connect=True)
    while state not in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except TimeoutError:
            return False
        state = channel.get_state(try_to_connect=True)
    return state == grpc.ChannelConnectivity.READY


class Recorder:
    """Per-second records of one process, flushed as JSON lines once each second is over."""

    def __init__(self, start: float, duration_s: float, emit: Callable[[dict[str, object]], None]) -> None:
        """`start` is the window's opening on the perf_counter clock."""
        self.start = start
        self.last_index = max(0, math.ceil(duration_s) - 1)
        self.emit = emit
        self.seconds: dict[int, Second] = {}
        self.first_errors: dict[str, str] = {}
        self.last_end = start

    def record(self, intended: float, ended: float, code: str | None, details: str = "") -> None:
        """One call that was due (or sent) at `intended` and ended at `ended`; `code` None means OK."""
        # Calls that end after the window (the open model's last ones) count in its last second.
        index = min(max(0, int(ended - self.start)), self.last_index)
        second = self.seconds.get(index)
        if second is None:
            second = self.seconds[index] = Second()
        if code is None:
            second.latencies.record((ended - intended) * 1000.0)
        else:
            second.errors[code] = second.errors.get(code, 0) + 1
            self.first_errors.setdefault(code, details[:300])
        self.last_end = max(self.last_end, ended)

    def flush(self, before_index: int | None = None) -> None:
        """Emit the seconds before `before_index` (all with None)."""
        for index in sorted(self.seconds):
            if before_index is not None and index >= before_index:
                break
            second = self.seconds.pop(index)
            self.emit(
                {"type": "second", "index": index, "latencies": second.latencies.to_json(), "errors": second.errors}
            )


def command_clients(plan: Plan) -> list[list[TesseraClient]]:
    """`plan.connections` clients per write address, each on its own connection (commands only, no session)."""
    own_connection = ChannelOptions(extra=tuple(CHANNEL_OPTIONS))
    token = bearer_token(plan.metadata)
    return [
        [
            TesseraClient(target, None, token=token, options=own_connection, timeout=plan.timeout_s, session=False)
            for _ in range(plan.connections)
        ]
        for target in plan.targets
    ]


async def run_plan(  # noqa: PLR0915 - one window with its per-call closure
    plan: Plan,
    source: QuerySource | CommandSource,
    start_epoch: Awaitable[float],
    emit: Callable[[dict[str, object]], None],
) -> None:
    """Open channels, announce readiness, wait for the start, drive the load model, emit the records.

    Queries go out as pre-serialized bytes on raw channels; commands go through the client
    library (one client per connection), which keys each command and retries it under its key.
    """
    clients = command_clients(plan) if isinstance(source, CommandSource) else []
    channels = (
        [[client.write_channel for client in group] for group in clients]
        if clients
        else [
            [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(plan.connections)]
            for target in plan.targets
        ]
    )
    try:
        states = await asyncio.gather(*(connect(channel, CONNECT_TIMEOUT_S) for group in channels for channel in group))
        emit({"type": "ready", "connected": sum(states), "channels": len(states)})
        methods: dict[tuple[int, int, str], grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}

        def slot(number: int) -> tuple[int, int]:
            return number % len(channels), (number // len(channels)) % plan.connections

        def method_for(number: int, call: Call) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
            target, connection = slot(number)
            key = (target, connection, call.method)
            if key not in methods:
                methods[key] = channels[target][connection].unary_unary(call.method)
            return methods[key]

        start_at = await start_epoch
        start = time.perf_counter() + (start_at - time.time())
        end = start + plan.duration_s
        recorder = Recorder(start, plan.duration_s, emit)

        plan_metadata = tuple(plan.metadata)

        async def one(number: int, intended: float) -> None:
            code: str | None = None
            details = ""
            try:
                if isinstance(source, CommandSource):
                    target, connection = slot(number)
                    await send_command(clients[target][connection], source.next_command(), plan.timeout_s)
                else:
                    call = source.next_call()
                    await method_for(number, call)(
                        call.body, timeout=plan.timeout_s, metadata=(*plan_metadata, *call.metadata) or None
                    )
            except TesseraError as error:
                code, details = error.code.name, error.message
            except grpc.aio.AioRpcError as error:
                code, details = error.code().name, str(error.details())
            except (OSError, RuntimeError, ValueError) as error:
                code, details = f"CLIENT_{type(error).__name__}", str(error)
            recorder.record(intended, time.perf_counter(), code, details)

        async def ticker() -> None:
            while True:
                await asyncio.sleep(max(0.05, 1.0 - ((time.perf_counter() - start) % 1.0)))
                recorder.flush(int(time.perf_counter() - start))

        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        ticking = asyncio.create_task(ticker())
        try:
            if plan.rate is not None:
                await _open_model(plan, start, one)
            else:
                await _closed_model(plan, end, one)
        finally:
            ticking.cancel()
        recorder.flush()
        emit(
            {
                "type": "done",
                "elapsed_s": max(plan.duration_s, recorder.last_end - start),
                "first_errors": recorder.first_errors,
                "retries": sum(client.command_retries for group in clients for client in group),
            }
        )
    finally:
        # A client closes its own channel; raw channels are closed here.
        for client in (client for group in clients for client in group):
            await client.close()
        if not clients:
            for channel in (channel for group in channels for channel in group):
                await channel.close()


async def _open_model(plan: Plan, start: float, one: Callable[[int, float], Awaitable[None]]) -> None:
    """Fire each request when it is due (late ones at once); latency counts from the due time."""
    assert plan.rate is not None
    in_flight = asyncio.Semaphore(plan.max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def guarded(number: int, intended: float) -> None:
        try:
            await one(number, intended)
        finally:
            in_flight.release()

    for number, offset in due_offsets(plan.rate, plan.duration_s, plan.process_index, plan.processes):
        due = start + offset
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        # Past the cap the process waits; the latency still counts from `due`, so the wait shows.
        await in_flight.acquire()
        task = asyncio.create_task(guarded(number, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=plan.timeout_s + 5.0)


async def _closed_model(plan: Plan, end: float, one: Callable[[int, float], Awaitable[None]]) -> None:
    """`plan.concurrency` loops, each sending its next request when the previous one ends."""
    assert plan.concurrency is not None
    counter = iter(range(plan.process_index, 1 << 62, plan.processes))

    async def loop() -> None:
        while (now := time.perf_counter()) < end:
            await one(next(counter), now)

    await asyncio.gather(*(loop() for _ in range(plan.concurrency)))


def build_source(plan: Plan) -> QuerySource | CommandSource:
    """The request source a plan asks for."""
    if plan.mode == "read":
        assert plan.seed_path is not None
        rng = random.Random(plan.process_index * 7919 + 17)  # noqa: S311 - load spreading, not security
        return QuerySource(SeedData.load(Path(plan.seed_path)), plan.mix, hot=plan.hot, rng=rng)
    return CommandSource(plan.command, plan.process_index, plan.product_ids)


async def _main() -> int:
    plan = Plan.from_json(await asyncio.to_thread(sys.stdin.readline))
    source = build_source(plan)

    def emit(record: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    async def start_epoch() -> float:
        return float(await asyncio.to_thread(sys.stdin.readline))

    await run_plan(plan, source, start_epoch(), emit)
    return 0


if __name__ == "__main__":
    sys.exit(run(_main()))
