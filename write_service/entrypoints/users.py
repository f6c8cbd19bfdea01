"""The users' command servicer: tessera.users.v1.UserCommandService."""

from __future__ import annotations

from tessera.users.v1 import user_command_service_pb2 as pb
from tessera.users.v1 import user_command_service_pb2_grpc as pb_grpc
from write_service.commands.users import DeactivateUser, RegisterUser, UpdateUserProfile
from write_service.entrypoints.command_servicer import CommandServicer, Context, expected_version

USER_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["UserCommandService"].full_name


class UserCommandServicer(CommandServicer, pb_grpc.UserCommandServiceServicer):
    """Serves tessera.users.v1.UserCommandService over the command bus."""

    id_field = "user_id"

    async def RegisterUser(self, request: pb.RegisterUserRequest, context: Context) -> pb.RegisterUserResponse:
        """Create a user."""
        fields = {
            "email": request.email,
            "username": request.username,
            "password": request.password,
            "full_name": request.full_name,
        }
        return await self._run(RegisterUser, fields, pb.RegisterUserResponse, context)

    async def UpdateUserProfile(
        self, request: pb.UpdateUserProfileRequest, context: Context
    ) -> pb.UpdateUserProfileResponse:
        """Replace a user's profile."""
        fields = {
            "user_id": request.user_id,
            "full_name": request.full_name,
            "bio": request.bio,
            "avatar_url": request.avatar_url,
            "expected_version": expected_version(request),
        }
        return await self._run(UpdateUserProfile, fields, pb.UpdateUserProfileResponse, context)

    async def DeactivateUser(self, request: pb.DeactivateUserRequest, context: Context) -> pb.DeactivateUserResponse:
        """Deactivate a user."""
        fields = {"user_id": request.user_id, "reason": request.reason, "expected_version": expected_version(request)}
        return await self._run(DeactivateUser, fields, pb.DeactivateUserResponse, context)
