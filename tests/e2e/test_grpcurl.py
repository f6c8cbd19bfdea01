"""The stack driven by the real grpcurl binary through server reflection, as a person would."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from devstack.supervisor import Stack
from tests.e2e.grpcurl import grpcurl

pytestmark = pytest.mark.e2e


def test_reflection_lists_and_describes_services(stack: Stack) -> None:
    listed = grpcurl(stack.write_address, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"tessera.users.v1.UserCommandService", "grpc.health.v1.Health"} <= services

    described = grpcurl(stack.write_address, "describe", "tessera.users.v1.RegisterUserRequest")
    assert described.returncode == 0, described.stderr
    assert "string email = 1;" in described.stdout

    for address in stack.read_addresses:
        listed = grpcurl(address, "list", "tessera.users.v1.UserQueryService")
        assert listed.returncode == 0, listed.stderr
        assert "tessera.users.v1.UserQueryService.ListUsers" in listed.stdout


async def test_register_then_read_back_from_each_replica(stack: Stack, unique: str) -> None:
    request = json.dumps(
        {
            "email": f"grace.{unique}@example.com",
            "username": f"grace_{unique}",
            "password": "correct horse battery staple",
            "full_name": "Grace Hopper",
        }
    )
    registered = grpcurl("-d", request, stack.write_address, "tessera.users.v1.UserCommandService/RegisterUser")
    assert registered.returncode == 0, registered.stderr
    reply = json.loads(registered.stdout)
    user_id = reply["user_id"]
    assert reply["version"] == "1"

    for address in stack.read_addresses:
        deadline = time.monotonic() + 15
        while True:
            got = await asyncio.to_thread(
                grpcurl, "-d", json.dumps({"user_id": user_id}), address, "tessera.users.v1.UserQueryService/GetUser"
            )
            if got.returncode == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert got.returncode == 0, got.stderr
        view = json.loads(got.stdout)["user"]
        assert view["full_name"] == "Grace Hopper"
        assert view["email"] == f"grace.{unique}@example.com"


def test_errors_come_back_with_their_codes(stack: Stack) -> None:
    bad = grpcurl(
        "-d",
        json.dumps({"email": "nope", "username": "ok_name", "password": "long enough pw", "full_name": "N"}),
        stack.write_address,
        "tessera.users.v1.UserCommandService/RegisterUser",
    )
    assert bad.returncode != 0
    assert "Code: InvalidArgument" in bad.stderr
    assert "email" in bad.stderr

    missing = grpcurl(
        "-d",
        json.dumps({"userId": "123e4567-e89b-12d3-a456-426614174000"}),
        stack.read_addresses[0],
        "tessera.users.v1.UserQueryService/GetUser",
    )
    assert "Code: NotFound" in missing.stderr


def test_health_check_through_grpcurl(stack: Stack) -> None:
    checked = grpcurl(stack.read_addresses[0], "grpc.health.v1.Health/Check")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["status"] == "SERVING"


def test_verbose_output_names_the_replica(stack: Stack) -> None:
    """Query replies carry the replica as a trailer, health checks as a header; grpcurl -v shows both."""
    missing = grpcurl(
        "-v",
        "-d",
        json.dumps({"userId": "123e4567-e89b-12d3-a456-426614174000"}),
        stack.read_addresses[0],
        "tessera.users.v1.UserQueryService/GetUser",
    )
    assert "Code: NotFound" in missing.stderr
    trailers = missing.stdout.partition("Response trailers received:")[2]
    assert "x-tessera-replica: " in trailers, missing.stdout

    checked = grpcurl("-v", stack.read_addresses[0], "grpc.health.v1.Health/Check")
    assert checked.returncode == 0, checked.stderr
    headers = checked.stdout.partition("Response headers received:")[2].partition("Response contents:")[0]
    assert "x-tessera-replica: " in headers, checked.stdout
