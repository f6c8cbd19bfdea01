"""The command bus: runs a command's handler, retries transient conflicts, logs rejections.

A serialization failure or deadlock (translated to `errors.Conflict` by the adapter) is
retried with a fresh unit of work a bounded number of times, with jittered exponential
backoff, as long as the command's deadline allows; then `Conflict` reaches the caller as
ABORTED. A command the rules reject is recorded in the command log in a separate small
transaction, best-effort: writing that row never replaces the original error.

A command with an idempotency key gets its fingerprint here, once, before the first
attempt. A key still held by a running command is a `Conflict` too, so it is retried
the same way: by then the first call has usually committed and its reply is returned.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from datetime import timedelta

from opentelemetry import metrics, trace

from shared_kernel.contracts import errors
from shared_kernel.platform.backoff import jittered_delay
from shared_kernel.platform.grpc_errors import status_for
from shared_kernel.platform.telemetry import records_spans
from write_service.commands.base import Command
from write_service.service_layer.command_steps import (
    CommandMeta,
    CommandResult,
    Dependencies,
    Handler,
    IdempotencyClaim,
    ReplyEncoder,
)
from write_service.service_layer.handler_table import HANDLERS
from write_service.service_layer.idempotency import fingerprint
from write_service.service_layer.ports import CommandLogEntry, IdempotencyScope, Outcome, UnitOfWorkFactory

logger = logging.getLogger(__name__)

# Errors that mean "the rules said no": the command is rejected, not failed.
_REJECTIONS = (errors.InvalidArgument, errors.NotFound, errors.AlreadyExists, errors.FailedPrecondition)

DEFAULT_IDEMPOTENCY_RETENTION = timedelta(days=1)

# One span per attempt around the unit of work (begin … commit). It is current while the
# events are appended, so the outbox rows carry its context and the relay's and the
# projectors' spans become its children (docs/decisions/0020-observability.md). A process
# that records no spans opens none: the rows then carry the server span's context.
_tracer = trace.get_tracer("tessera.write_service")
_idempotent_hits = metrics.get_meter("tessera.write_service").create_counter(
    "tessera.write.idempotency.hits", description="Keyed commands answered with their stored reply"
)


def encode_result(result: CommandResult) -> bytes:
    """The reply stored for a keyed command when the caller gives no encoder of its own."""
    return json.dumps({"aggregate_id": str(result.aggregate_id), "version": result.version}).encode()


def _log_extra(command: Command, meta: CommandMeta) -> dict[str, str]:
    """The context of a log record about `command`."""
    extra = {
        "command_type": command.command_type,
        "command_id": str(meta.command_id),
        "correlation_id": meta.correlation_id,
        "principal": meta.principal,
    }
    if meta.idempotency_key is not None:
        extra["idempotency_key"] = meta.idempotency_key
    return extra


class CommandBus:
    """Dispatches each command to its handler with a fresh unit of work per attempt."""

    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        deps: Dependencies,
        *,
        handlers: Mapping[type[Command], Handler] = HANDLERS,
        max_attempts: int = 3,
        retry_backoff_s: float = 0.02,
        idempotency_retention: timedelta = DEFAULT_IDEMPOTENCY_RETENTION,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if idempotency_retention <= timedelta(0):
            raise ValueError("idempotency_retention must be positive")
        self._idempotency_retention = idempotency_retention
        self._uow_factory = uow_factory
        self._deps = deps
        self._handlers = dict(handlers)
        self._max_attempts = max_attempts
        self._retry_backoff_s = retry_backoff_s
        self._sleep = sleep

    async def dispatch(
        self, command: Command, meta: CommandMeta, *, encode_reply: ReplyEncoder = encode_result
    ) -> CommandResult:
        """Run the command; return its result or raise the error that ended it.

        With `meta.idempotency_key` set, `encode_reply` serializes the reply that is stored
        and returned, byte for byte, to a retry.
        """
        handler = self._handlers[type(command)]
        if meta.idempotency_key is not None and meta.idempotency is None:
            meta = replace(meta, idempotency=await self._claim(command, meta, encode_reply))
        try:
            result = await self._with_retries(handler, command, meta)
        except _REJECTIONS as exc:
            logger.info("command rejected: %s", exc.message, extra=_log_extra(command, meta))
            await self._log_outcome(command, meta, "rejected", exc)
            raise
        except errors.Unavailable:
            # The database is what failed (or the time ran out): a log write would only delay the reply.
            raise
        except errors.Conflict as exc:
            # INFO: the error interceptor already warns about every ABORTED reply.
            logger.info("command gave up on a transient conflict: %s", exc.message, extra=_log_extra(command, meta))
            await self._log_outcome(command, meta, "failed", exc)
            raise
        except Exception as exc:
            await self._log_outcome(command, meta, "failed", exc)
            raise
        if result.replay_of is not None:
            _idempotent_hits.add(1, {"command_type": command.command_type})
            logger.info(
                "idempotent hit: returned the stored reply",
                extra={
                    **_log_extra(command, meta),
                    "replay_of": str(result.replay_of),
                    "aggregate_id": str(result.aggregate_id),
                },
            )
            return result
        if logger.isEnabledFor(logging.DEBUG):  # the record's context is built only when it is written
            logger.debug(
                "command succeeded",
                extra={
                    **_log_extra(command, meta),
                    "aggregate_id": str(result.aggregate_id),
                    "version": result.version,
                },
            )
        return result

    async def _claim(self, command: Command, meta: CommandMeta, encode_reply: ReplyEncoder) -> IdempotencyClaim:
        """The keyed command's scope and fingerprint (computed once, not per attempt)."""
        assert meta.idempotency_key is not None
        scope = IdempotencyScope(meta.principal, command.command_type, meta.idempotency_key)
        return IdempotencyClaim(
            scope=scope,
            fingerprint=await fingerprint(command, scope, self._deps.hasher),
            retention=self._idempotency_retention,
            encode_reply=encode_reply,
        )

    async def _with_retries(self, handler: Handler, command: Command, meta: CommandMeta) -> CommandResult:
        attempt = 1
        while True:
            try:
                if not records_spans():
                    # Nothing would record the span: the rows carry the server span's context.
                    return await self._attempt(handler, command, meta, attempt)
                with _tracer.start_as_current_span(
                    f"transaction {command.command_type}",
                    attributes={"db.system": "postgresql", "tessera.command.attempt": attempt},
                ) as span:
                    result = await self._attempt(handler, command, meta, attempt)
                    if span.is_recording():  # a parent that is not sampled leaves it non-recording
                        span.set_attribute("tessera.outbox.event_ids", [str(e.event_id) for e in result.events])
                    return result
            except errors.Conflict:
                # Uncapped: the attempts are few, and the deadline bounds the wait.
                delay = jittered_delay(attempt, self._retry_backoff_s, cap=float("inf"))
                if attempt >= self._max_attempts or meta.deadline.remaining() <= delay:
                    raise
                logger.info(
                    "transient conflict, retrying",
                    extra={"command_id": str(meta.command_id), "attempt": attempt, "delay_s": round(delay, 4)},
                )
                attempt += 1
                await self._sleep(delay)

    async def _attempt(self, handler: Handler, command: Command, meta: CommandMeta, attempt: int) -> CommandResult:
        """One attempt of the command, with a unit of work of its own."""
        uow = self._uow_factory(meta.deadline)
        if attempt > 1:
            # The first attempt lost a guard (or a key's lock): this one locks what it reads.
            uow.lock_reads()
        return await handler(command, uow, self._deps, meta)

    async def _log_outcome(self, command: Command, meta: CommandMeta, outcome: Outcome, exc: Exception) -> None:
        """Write a command-log row for a command that did not succeed; never raises."""
        if meta.deadline.expired:
            return
        if isinstance(exc, errors.DomainError):
            status_code = status_for(exc).code.name
            message = exc.message
        else:
            # A bug: its text may hold anything, so only its type is recorded.
            status_code, message = "INTERNAL", type(exc).__name__
        entry = CommandLogEntry(
            command_id=meta.command_id,
            command_type=command.command_type,
            aggregate_type=command.aggregate_type,
            aggregate_id=command.aggregate_id,
            correlation_id=meta.correlation_id,
            received_at=meta.received_at,
            completed_at=self._deps.clock(),
            outcome=outcome,
            status_code=status_code,
            error_message=message,
            summary=command.summary(),
            principal=meta.principal,
            idempotency_key=meta.idempotency_key or "",
        )
        try:
            async with self._uow_factory(meta.deadline) as uow:
                await uow.log_command(entry)
                await uow.commit()
        except Exception:
            logger.warning(
                "could not write the command-log row for a %s command",
                outcome,
                exc_info=True,
                extra={"command_id": str(meta.command_id)},
            )
