"""A bounded command workload that keeps its own account of what the write service acknowledged.

Each client task owns its users: it registers one, updates its profile a few times and
deactivates it, then starts the next, so the commands on one user are strictly
sequential and the expected version of each is known without asking the server. Every
logical command carries its own correlation id (`x-correlation-id`), which the write
service copies into the events, so afterwards each command can be matched with exactly
the outbox rows it produced.

Answers are sorted into three outcomes: `ok` (a reply; its user id and version are
recorded), `unknown` (a retryable code such as UNAVAILABLE, after which the command may
or may not have been applied), and `rejected` (any other code: none is expected, since
every request is valid and every user active). With `idempotency=True` a retryable
answer is retried with the same `idempotency-key` and the same request until it succeeds;
without it the command stays `unknown` and the client moves on (a register is then
repeated with a fresh identity, so that the client has a user to work on).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from google.protobuf.message import Message

from tessera.users.v1 import user_command_service_pb2 as pb
from tessera.users.v1 import user_command_service_pb2_grpc as pb_grpc

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)
IDEMPOTENCY_HEADER = "idempotency-key"
CORRELATION_HEADER = "x-correlation-id"
UPDATES_PER_USER = 3
# Reconnect quickly after the write service restarts: gRPC's default backoff starts at 1 s.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass
class Command:
    """One logical command and what became of it."""

    key: str
    kind: str
    request: Message
    user_id: str | None = None
    expected_version: int | None = None
    outcome: str = "pending"
    code: str = ""
    version: int = 0
    attempts: int = 0
    sent_at: float = 0.0
    answered_at: float = 0.0
    last_attempt_wall: float = 0.0  # wall clock, comparable with an event's occurred_at


@dataclass
class WorkloadStats:
    """Counts by outcome and by status code, and the reply latencies of acknowledged commands."""

    outcomes: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


class Workload:
    """Runs `total` logical commands from `clients` concurrent tasks against the write service."""

    def __init__(
        self,
        address: str,
        *,
        total: int,
        clients: int = 8,
        idempotency: bool = False,
        rpc_timeout_s: float = 5.0,
        retry_budget_s: float = 90.0,
    ) -> None:
        self.address = address
        self.total = total
        self.clients = clients
        self.idempotency = idempotency
        self.rpc_timeout_s = rpc_timeout_s
        self.retry_budget_s = retry_budget_s
        self.run_id = secrets.token_hex(3)
        self.commands: list[Command] = []
        self.stats = WorkloadStats()
        self.progress = 0  # logical commands answered so far
        self.started_at = 0.0
        self.finished_at = 0.0
        self._serial = 0
        self._stop = asyncio.Event()

    # -- running

    async def run(self) -> None:
        """Issue every command and wait for the last answer."""
        self.started_at = time.monotonic()
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.UserCommandServiceStub(channel)
            quota = [
                self.total // self.clients + (1 if i < self.total % self.clients else 0) for i in range(self.clients)
            ]
            await asyncio.gather(*(self._client(stub, i, n) for i, n in enumerate(quota)))
        self.finished_at = time.monotonic()

    async def honours_idempotency_keys(self) -> bool:
        """Send one register twice with the same key: True when the second reply repeats the first.

        The pair counts as one logical command of the workload (its event is accounted for).
        """
        command = self._register(-1)
        request = cast(pb.RegisterUserRequest, command.request)
        metadata = [(CORRELATION_HEADER, command.key), (IDEMPOTENCY_HEADER, command.key)]
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.UserCommandServiceStub(channel)
            self.commands.append(command)
            first = await stub.RegisterUser(request, metadata=metadata, timeout=self.rpc_timeout_s)
            command.attempts, command.outcome, command.code = 1, "ok", "OK"
            command.user_id, command.version = first.user_id, int(first.version)
            self.stats.outcomes["ok"] += 1
            command.last_attempt_wall = time.time()
            try:
                second = await stub.RegisterUser(request, metadata=metadata, timeout=self.rpc_timeout_s)
            except grpc.aio.AioRpcError:
                return False
            finally:
                command.attempts = 2
        return bool(second.user_id == first.user_id and second.version == first.version)

    def stop(self) -> None:
        """Ask the clients to stop after their current command (used when a scenario fails early)."""
        self._stop.set()

    async def wait_progress(self, fraction: float, timeout_s: float) -> None:
        """Wait until `fraction` of the commands have been answered."""
        deadline = time.monotonic() + timeout_s
        while self.progress < fraction * self.total:
            if time.monotonic() > deadline:
                raise AssertionError(f"workload reached {self.progress}/{self.total} commands within {timeout_s}s")
            await asyncio.sleep(0.05)

    async def _client(self, stub: pb_grpc.UserCommandServiceStub, index: int, quota: int) -> None:
        issued = 0
        user: str | None = None
        version = 0
        step = 0
        pause = _Pause()
        while issued < quota and not self._stop.is_set():
            if user is None or step > UPDATES_PER_USER + 1:
                command = self._register(index)
            elif step <= UPDATES_PER_USER:
                command = self._update(user, version, step)
            else:
                command = self._deactivate(user, version)
            issued += 1
            await self._send(stub, command)
            self.progress += 1
            if command.outcome == "ok":
                pause.reset()
                if command.kind == "register":
                    user, version, step = command.user_id, command.version, 1
                else:
                    version, step = command.version, step + 1
            else:
                # Give a failing dependency room to come back instead of spinning through the quota.
                await pause.wait()
                if command.kind == "register":
                    user = None
                else:
                    # The outcome is unknown, so the version is too: go on without an expected one.
                    version, step = 0, step + 1

    async def _send(self, stub: pb_grpc.UserCommandServiceStub, command: Command) -> None:
        methods: dict[str, Any] = {
            "register": stub.RegisterUser,
            "update": stub.UpdateUserProfile,
            "deactivate": stub.DeactivateUser,
        }
        method = methods[command.kind]
        metadata: list[tuple[str, str]] = [(CORRELATION_HEADER, command.key)]
        if self.idempotency:
            metadata.append((IDEMPOTENCY_HEADER, command.key))
        self.commands.append(command)
        command.sent_at = time.monotonic()
        retry_until = command.sent_at + self.retry_budget_s
        pause = _Pause()
        while True:
            command.attempts += 1
            command.last_attempt_wall = time.time()
            try:
                reply: Any = await method(command.request, metadata=metadata, timeout=self.rpc_timeout_s)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                command.code = code.name
                self.stats.codes[code.name] += 1
                retry = self.idempotency and code in RETRYABLE and time.monotonic() < retry_until
                if retry and not self._stop.is_set():
                    await pause.wait()
                    continue
                command.outcome = "unknown" if code in RETRYABLE else "rejected"
                break
            command.code = "OK"
            self.stats.codes["OK"] += 1
            command.outcome = "ok"
            command.user_id = reply.user_id
            command.version = int(reply.version)
            self.stats.latencies.append(time.monotonic() - command.sent_at)
            break
        command.answered_at = time.monotonic()
        self.stats.outcomes[command.outcome] += 1

    # -- the commands

    def _key(self) -> str:
        self._serial += 1
        return f"chaos-{self.run_id}-{self._serial}"

    def _register(self, client: int) -> Command:
        key = self._key()
        name = f"u{self.run_id}{self._serial}"
        request = pb.RegisterUserRequest(
            email=f"{name}@example.com",
            username=name,
            password="correct horse battery staple",
            full_name=f"Chaos Client {client} #{self._serial}",
        )
        return Command(key=key, kind="register", request=request, expected_version=1)

    def _update(self, user_id: str, version: int, step: int) -> Command:
        key = self._key()
        request = pb.UpdateUserProfileRequest(
            user_id=user_id,
            full_name=f"Chaos Update {step} {key}",
            bio=f"step {step}",
            avatar_url=f"https://example.com/{key}.png",
        )
        return Command(
            key=key, kind="update", request=request, user_id=user_id, expected_version=version + 1 if version else None
        )

    def _deactivate(self, user_id: str, version: int) -> Command:
        key = self._key()
        request = pb.DeactivateUserRequest(user_id=user_id, reason=f"chaos run {key}")
        return Command(
            key=key,
            kind="deactivate",
            request=request,
            user_id=user_id,
            expected_version=version + 1 if version else None,
        )

    # -- figures

    def figures(self) -> dict[str, Any]:
        """Counts by outcome and code, throughput and reply latency."""
        elapsed = max(self.finished_at - self.started_at, 1e-9)
        latencies = sorted(self.stats.latencies)
        return {
            "commands": len(self.commands),
            "acked": self.stats.outcomes["ok"],
            "unknown": self.stats.outcomes["unknown"],
            "rejected": self.stats.outcomes["rejected"],
            "retries": sum(c.attempts - 1 for c in self.commands),
            "codes": dict(self.stats.codes),
            "commands_per_s": round(len(self.commands) / elapsed, 1),
            "reply_p50_ms": round(_percentile(latencies, 0.5) * 1000, 1),
            "reply_p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
            "reply_max_ms": round((latencies[-1] if latencies else 0.0) * 1000, 1),
        }


class _Pause:
    """Jittered exponential pause between attempts: 50 ms doubling up to 1 s."""

    def __init__(self) -> None:
        self._delay = 0.05

    def reset(self) -> None:
        self._delay = 0.05

    async def wait(self) -> None:
        await asyncio.sleep(random.uniform(self._delay / 2, self._delay))
        self._delay = min(self._delay * 2, 1.0)


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
