"""Read your writes through the real processes: a command's consistency token on every replica."""

from __future__ import annotations

import grpc
import pytest

from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_command_service_pb2_grpc as cmd_grpc
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera.users.v1 import user_query_service_pb2_grpc as qry_grpc

pytestmark = pytest.mark.e2e


async def test_a_reply_token_makes_every_replica_show_the_write(
    write_channel: grpc.aio.Channel, read_channels: list[grpc.aio.Channel], unique: str
) -> None:
    commands = cmd_grpc.UserCommandServiceStub(write_channel)
    registered = await commands.RegisterUser(
        cmd.RegisterUserRequest(
            email=f"ryw.{unique}@example.com",
            username=f"ryw_{unique}",
            password="read-your-writes-Pa55",
            full_name="Read Writes",
        ),
        timeout=10,
    )
    assert registered.consistency_token
    for channel in read_channels:
        # Immediately, with no retry: the token makes the replica wait for the registration.
        reply = await qry_grpc.UserQueryServiceStub(channel).GetUser(
            qry.GetUserRequest(user_id=registered.user_id, consistency_token=registered.consistency_token),
            timeout=10,
        )
        assert not reply.stale
        assert reply.user.version == 1
        assert reply.view_position >= 1

    updated = await commands.UpdateUserProfile(
        cmd.UpdateUserProfileRequest(user_id=registered.user_id, full_name="Read Writes II", expected_version=1),
        timeout=10,
    )
    assert updated.version == 2
    assert updated.consistency_token != registered.consistency_token
    for channel in read_channels:
        reply = await qry_grpc.UserQueryServiceStub(channel).GetUser(
            qry.GetUserRequest(user_id=registered.user_id, consistency_token=updated.consistency_token),
            timeout=10,
        )
        assert not reply.stale
        assert reply.user.version == 2
        assert reply.user.full_name == "Read Writes II"


async def test_an_idempotent_replay_returns_the_same_token(write_channel: grpc.aio.Channel, unique: str) -> None:
    commands = cmd_grpc.UserCommandServiceStub(write_channel)
    request = cmd.RegisterUserRequest(
        email=f"replay.{unique}@example.com",
        username=f"replay_{unique}",
        password="read-your-writes-Pa55",
        full_name="Re Play",
    )
    key = (("idempotency-key", f"ryw-{unique}"),)
    first = await commands.RegisterUser(request, metadata=key, timeout=10)
    again = await commands.RegisterUser(request, metadata=key, timeout=10)
    assert again.consistency_token == first.consistency_token != ""
