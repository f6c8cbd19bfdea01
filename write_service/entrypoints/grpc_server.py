"""The gRPC servicer: maps protobuf requests to commands and results to replies, nothing more.

Errors are not handled here: shared_kernel's ErrorMappingInterceptor turns them into
status codes. The servicer only builds each command's metadata (id, correlation id,
deadline) from the call.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import grpc
from opentelemetry import trace

from shared_kernel.errors import FieldViolation
from tessera.users.v1 import user_command_service_pb2 as pb
from tessera.users.v1 import user_command_service_pb2_grpc as pb_grpc
from write_service.domain.commands import Command, DeactivateUser, RegisterUser, UpdateUserProfile
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.handlers import CommandMeta, CommandResult, utc_now
from write_service.service_layer.messagebus import CommandBus

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["UserCommandService"].full_name
CORRELATION_HEADER = "x-correlation-id"
CORRELATION_ID_MAX = 128

Context = grpc.aio.ServicerContext[Any, Any]


def correlation_violation(value: str) -> FieldViolation | None:
    """A violation when a caller's correlation id is not 1..128 printable ASCII characters."""
    if len(value) > CORRELATION_ID_MAX or not (value.isascii() and value.isprintable()):
        return FieldViolation(CORRELATION_HEADER, f"must be 1 to {CORRELATION_ID_MAX} printable ASCII characters")
    return None


class UserCommandServicer(pb_grpc.UserCommandServiceServicer):
    """Serves tessera.users.v1.UserCommandService over the command bus."""

    def __init__(self, bus: CommandBus, *, max_command_s: float, clock: Callable[[], datetime] = utc_now) -> None:
        self._bus = bus
        self._max_command_s = max_command_s
        self._clock = clock

    async def RegisterUser(self, request: pb.RegisterUserRequest, context: Context) -> pb.RegisterUserResponse:
        """Create a user."""
        meta, extra = self._meta(context)
        command = RegisterUser.parse(
            {
                "email": request.email,
                "username": request.username,
                "password": request.password,
                "full_name": request.full_name,
            },
            extra,
        )
        result = await self._dispatch(command, meta)
        return pb.RegisterUserResponse(user_id=str(result.aggregate_id), version=result.version)

    async def UpdateUserProfile(
        self, request: pb.UpdateUserProfileRequest, context: Context
    ) -> pb.UpdateUserProfileResponse:
        """Replace a user's profile."""
        meta, extra = self._meta(context)
        command = UpdateUserProfile.parse(
            {
                "user_id": request.user_id,
                "full_name": request.full_name,
                "bio": request.bio,
                "avatar_url": request.avatar_url,
            },
            extra,
        )
        result = await self._dispatch(command, meta)
        return pb.UpdateUserProfileResponse(user_id=str(result.aggregate_id), version=result.version)

    async def DeactivateUser(self, request: pb.DeactivateUserRequest, context: Context) -> pb.DeactivateUserResponse:
        """Deactivate a user."""
        meta, extra = self._meta(context)
        command = DeactivateUser.parse({"user_id": request.user_id, "reason": request.reason}, extra)
        result = await self._dispatch(command, meta)
        return pb.DeactivateUserResponse(user_id=str(result.aggregate_id), version=result.version)

    def _meta(self, context: Context) -> tuple[CommandMeta, list[FieldViolation]]:
        """The command's metadata, and a violation when the correlation header is malformed."""
        received_at = self._clock()
        command_id = uuid.uuid4()
        correlation_id = str(command_id)
        violations: list[FieldViolation] = []
        for key, value in context.invocation_metadata() or ():
            if key == CORRELATION_HEADER and isinstance(value, str) and value:
                violation = correlation_violation(value)
                if violation is None:
                    correlation_id = value
                else:
                    violations.append(violation)
        remaining = context.time_remaining()
        budget = self._max_command_s if remaining is None else min(remaining, self._max_command_s)
        meta = CommandMeta(
            command_id=command_id,
            correlation_id=correlation_id,
            received_at=received_at,
            deadline=Deadline.after(budget),
        )
        return meta, violations

    async def _dispatch(self, command: Command, meta: CommandMeta) -> CommandResult:
        span = trace.get_current_span()
        # Ids only: a span never carries a field of the request itself.
        span.set_attribute("tessera.command.id", str(meta.command_id))
        span.set_attribute("tessera.command.type", command.command_type)
        span.set_attribute("tessera.correlation_id", meta.correlation_id)
        result = await self._bus.dispatch(command, meta)
        span.set_attribute("tessera.aggregate.id", str(result.aggregate_id))
        span.set_attribute("tessera.aggregate.version", result.version)
        return result
