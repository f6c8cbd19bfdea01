"""`python -m write_service.audit` run as a process against a test database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from shared_kernel.contracts import errors
from tests.unit.write_service import helpers
from write_service.service_layer.messagebus import CommandBus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


async def audit(database_url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_")}
    env["DATABASE_URL"] = database_url
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "write_service.audit",
        *args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return subprocess.CompletedProcess(list(args), process.returncode, stdout.decode(), stderr.decode())


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
async def history(pg_bus: CommandBus) -> dict[str, Any]:
    """Four commands by two principals: a keyed registration, its retry, a rejection, an update."""
    key = helpers.key()
    command = helpers.register()
    first_meta = helpers.meta(principal="svc-a", idempotency_key=key)
    registered = await pg_bus.dispatch(command, first_meta)
    await pg_bus.dispatch(command, helpers.meta(principal="svc-a", idempotency_key=key))
    missing = uuid.uuid4()
    with pytest.raises(errors.NotFound):
        await pg_bus.dispatch(helpers.deactivate(missing), helpers.meta(principal="svc-b"))
    await pg_bus.dispatch(helpers.update(registered.aggregate_id), helpers.meta(principal="svc-a"))
    return {
        "key": key,
        "user_id": str(registered.aggregate_id),
        "first_command_id": str(first_meta.command_id),
        "missing": str(missing),
        "username": command.username,
    }


async def test_json_lines_newest_first_with_the_audit_fields(database_url, history):
    records = json_lines(await audit(database_url, "--json"))
    assert [(r["command_type"], r["outcome"], r["principal"]) for r in records] == [
        ("UpdateUserProfile", "succeeded", "svc-a"),
        ("DeactivateUser", "rejected", "svc-b"),
        ("RegisterUser", "replayed", "svc-a"),
        ("RegisterUser", "succeeded", "svc-a"),
    ]
    update, rejected, replayed, registered = records
    assert registered["idempotency_key"] == replayed["idempotency_key"] == history["key"]
    assert registered["command_id"] == history["first_command_id"]
    assert replayed["replay_of"] == history["first_command_id"]
    assert len(registered["event_ids"]) == 1
    assert replayed["event_ids"] == []
    assert registered["summary"] == {"email": registered["summary"]["email"], "username": history["username"]}
    assert (rejected["status_code"], rejected["aggregate_id"]) == ("NOT_FOUND", history["missing"])
    assert update["aggregate_id"] == history["user_id"]
    assert update["received_at"] >= rejected["received_at"] >= replayed["received_at"]
    assert helpers.PASSWORD not in json.dumps(records)


async def test_filters_combine(database_url, history):
    results = await asyncio.gather(
        audit(database_url, "--json", "--principal", "svc-b"),
        audit(database_url, "--json", "--idempotency-key", history["key"], "--outcome", "replayed"),
        audit(
            database_url,
            "--json",
            "--aggregate-id",
            history["user_id"],
            "--command-type",
            "UpdateUserProfile",
            "--since",
            "2000-01-01",
            "--until",
            "2999-01-01T00:00:00+00:00",
        ),
        audit(database_url, "--json", "--limit", "1"),
        audit(database_url, "--json", "--since", "2999-01-01T00:00Z"),
        # Values are bound parameters: this is a principal nobody has, not SQL.
        audit(database_url, "--json", "--principal", "x' OR '1'='1"),
    )
    by_principal, by_key, by_aggregate, newest, future, injected = (json_lines(r) for r in results)
    assert [r["outcome"] for r in by_principal] == ["rejected"]
    assert [(r["outcome"], r["replay_of"]) for r in by_key] == [("replayed", history["first_command_id"])]
    assert [r["command_type"] for r in by_aggregate] == ["UpdateUserProfile"]
    assert [r["command_type"] for r in newest] == ["UpdateUserProfile"]
    assert future == []
    assert injected == []


async def test_the_table_is_aligned_with_a_header(database_url, history):
    result = await audit(database_url, "--principal", "svc-a")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == [
        "RECEIVED_AT",
        "PRINCIPAL",
        "COMMAND",
        "OUTCOME",
        "STATUS",
        "AGGREGATE_ID",
        "IDEMPOTENCY_KEY",
        "EVENT_IDS",
        "DETAIL",
    ]
    assert len(lines) == 3
    column = header.index("PRINCIPAL")
    assert all(line[column:].startswith("svc-a") for line in lines)
    assert f"replay of {history['first_command_id']}" in lines[1]
    assert history["key"] in lines[1]
    assert lines[2].split()[3:5] == ["succeeded", "OK"]


async def test_bad_usage_and_an_unreachable_database(database_url):
    results = await asyncio.gather(
        audit(database_url, "--limit", "0"),
        audit(database_url, "--limit", "10001"),
        audit(database_url, "--since", "yesterday"),
        audit(database_url, "--outcome", "exploded"),
        audit(database_url, "--since", "2025-01-02", "--until", "2025-01-01"),
        audit("postgresql://postgres@127.0.0.1:1/postgres", "--json"),
    )
    *usage, unreachable = results
    assert [r.returncode for r in usage] == [2, 2, 2, 2, 2]
    assert "must be 1 to 10000" in usage[0].stderr
    assert "not an ISO-8601 time" in usage[2].stderr
    assert "--since must be earlier than --until" in usage[4].stderr
    assert unreachable.returncode == 1
    assert "audit query failed" in unreachable.stderr
    assert unreachable.stdout == ""
