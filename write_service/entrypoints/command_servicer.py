"""The gRPC command servicers' shared machinery; each context's servicer lives in `entrypoints.<context>`.

A servicer maps protobuf requests to commands and results to replies, nothing more.
Errors are not handled here: shared_kernel's ErrorMappingInterceptor turns them into
status codes. `CommandServicer` builds each command's metadata (id, correlation id,
principal, idempotency key, deadline) from the call, and turns the result into the reply.
A keyed command's reply is parsed from the bytes that were stored with it, so a retry
gets exactly the first reply.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, ClassVar, Protocol, Self, TypeVar

import grpc
from opentelemetry import trace

from shared_kernel.contracts import errors
from shared_kernel.contracts.consistency import encode_token
from shared_kernel.contracts.errors import FieldViolation
from shared_kernel.platform.security.authn import current_principal
from write_service.commands.base import Command
from write_service.service_layer.command_steps import CommandMeta, CommandResult, utc_now
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.idempotency import IDEMPOTENCY_KEY_FIELD, key_violation
from write_service.service_layer.messagebus import CommandBus

CORRELATION_HEADER = "x-correlation-id"
CORRELATION_ID_MAX = 128
IDEMPOTENCY_HEADER = IDEMPOTENCY_KEY_FIELD
# A caller with this little time left when the command gave up had its own deadline run out.
_DEADLINE_SLACK_S = 0.02

Context = grpc.aio.ServicerContext[Any, Any]


class _Reply(Protocol):
    """What every command's response message has: the aggregate id, its version and a consistency token."""

    # Keyword arguments: the aggregate's id field (`user_id`, `product_id`, ...), `version`, `consistency_token`.
    def __init__(self, **fields: Any) -> None: ...

    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...

    @classmethod
    def FromString(cls, data: bytes) -> Self: ...


ReplyT = TypeVar("ReplyT", bound=_Reply)
CommandT = TypeVar("CommandT", bound=Command)
# Adds what a reply carries beyond id, version and token (from the command's events).
ReplyExtras = Callable[[ReplyT, CommandResult], None]


def correlation_violation(value: str) -> FieldViolation | None:
    """A violation when a caller's correlation id is not 1..128 printable ASCII characters."""
    if len(value) > CORRELATION_ID_MAX or not (value.isascii() and value.isprintable()):
        return FieldViolation(CORRELATION_HEADER, f"must be 1 to {CORRELATION_ID_MAX} printable ASCII characters")
    return None


class CommandServicer:
    """Base of the command servicers: request metadata in, the bus's result out as the reply."""

    # The reply field that holds the aggregate's id.
    id_field: ClassVar[str]

    def __init__(self, bus: CommandBus, *, max_command_s: float, clock: Callable[[], datetime] = utc_now) -> None:
        self._bus = bus
        self._max_command_s = max_command_s
        self._clock = clock

    def _meta(self, context: Context) -> tuple[CommandMeta, list[FieldViolation]]:
        """The command's metadata, and violations for a malformed correlation or idempotency header."""
        received_at = self._clock()
        command_id = uuid.uuid4()
        correlation_id = str(command_id)
        idempotency_key: str | None = None
        violations: list[FieldViolation] = []
        for key, value in context.invocation_metadata() or ():
            if key == CORRELATION_HEADER and isinstance(value, str) and value:
                violation = correlation_violation(value)
                if violation is None:
                    correlation_id = value
                else:
                    violations.append(violation)
            elif key == IDEMPOTENCY_HEADER:
                # Present but empty (or sent twice, or binary) is a caller's mistake, not "no key".
                text = value if isinstance(value, str) else ""
                violation = key_violation(text)
                if idempotency_key is not None:
                    violation = FieldViolation(IDEMPOTENCY_HEADER, "must be sent at most once")
                if violation is None:
                    idempotency_key = text
                else:
                    violations.append(violation)
        remaining = context.time_remaining()
        budget = self._max_command_s if remaining is None else min(remaining, self._max_command_s)
        meta = CommandMeta(
            command_id=command_id,
            correlation_id=correlation_id,
            received_at=received_at,
            deadline=Deadline.after(budget),
            principal=current_principal(),
            idempotency_key=idempotency_key,
        )
        return meta, violations

    async def _run(
        self,
        command_type: type[CommandT],
        fields: Mapping[str, object],
        reply_type: type[ReplyT],
        context: Context,
        extras: ReplyExtras[ReplyT] | None = None,
    ) -> ReplyT:
        """Parse the command (with the headers' violations), dispatch it, and build or replay the reply."""
        meta, violations = self._meta(context)
        command = command_type.parse(fields, violations)
        return await self._dispatch(command, meta, reply_type, context, extras)

    async def _dispatch(
        self,
        command: Command,
        meta: CommandMeta,
        reply_type: type[ReplyT],
        context: Context,
        extras: ReplyExtras[ReplyT] | None = None,
    ) -> ReplyT:
        span = trace.get_current_span()
        # Without an exporter no span records: skip building the attributes' text.
        recording = span.is_recording()
        if recording:
            # Ids only: a span never carries a field of the request itself.
            span.set_attribute("tessera.command.id", str(meta.command_id))
            span.set_attribute("tessera.command.type", command.command_type)
            span.set_attribute("tessera.correlation_id", meta.correlation_id)

        # The reply last built for this command, by the version it answers: a keyed command's
        # stored bytes are serialized from it, and the caller gets it without parsing them back.
        built: dict[tuple[uuid.UUID, int], ReplyT] = {}

        def build(result: CommandResult) -> ReplyT:
            # The token goes into the stored bytes, so an idempotent replay hands out the same one.
            token = encode_token(command.aggregate_type, str(result.aggregate_id), result.version)
            fields = {self.id_field: str(result.aggregate_id), "version": result.version, "consistency_token": token}
            reply = reply_type(**fields)
            if extras is not None:
                extras(reply, result)
            built.clear()
            built[result.aggregate_id, result.version] = reply
            return reply

        def encode(result: CommandResult) -> bytes:
            return build(result).SerializeToString(deterministic=True)

        try:
            result = await self._bus.dispatch(command, meta, encode_reply=encode)
        except errors.Unavailable:
            # When the caller's own deadline is what ran out, say so: the caller chose that
            # limit, and UNAVAILABLE would invite a retry against a healthy database.
            remaining = context.time_remaining()
            if remaining is not None and remaining <= _DEADLINE_SLACK_S:
                raise errors.DeadlineExceeded("the caller's deadline ran out before the command finished") from None
            raise
        if recording:
            span.set_attribute("tessera.aggregate.id", str(result.aggregate_id))
            span.set_attribute("tessera.aggregate.version", result.version)
            if result.replay_of is not None:
                span.set_attribute("tessera.command.replay_of", str(result.replay_of))
        if result.replay_of is not None:
            return reply_type.FromString(result.reply)
        reply = built.get((result.aggregate_id, result.version))
        return build(result) if reply is None else reply


class _HasExpectedVersion(Protocol):
    expected_version: int

    def HasField(self, field_name: Any) -> bool: ...


def expected_version(request: _HasExpectedVersion) -> int | None:
    """The request's expected_version, or None when the caller did not set it (proto3 optional)."""
    return request.expected_version if request.HasField("expected_version") else None
