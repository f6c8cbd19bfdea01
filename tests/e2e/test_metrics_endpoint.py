"""Every service process serves Prometheus metrics when METRICS_PORT is set, with the families it owns.

The stack runs with METRICS_PORT=0, so each process picks a free port and logs its URL
("metrics endpoint listening", JSON logs); the test reads the URLs from the logs, makes a
few calls (one of them an error, one an idempotent replay) and scrapes every endpoint.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from devstack.supervisor import ServiceProcess, Stack
from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera_client import InvalidArgument, TesseraClient
from tests.e2e.conftest import FAST_HASHING, e2e_config, running_stack

pytestmark = pytest.mark.e2e

METRICS_ENV = {
    **FAST_HASHING,
    "METRICS_PORT": "0",
    "LOG_FORMAT": "json",
    "METRICS_SAMPLE_INTERVAL_S": "0.2",
    "NEAR_CACHE_SIZE": "100",
}
USERS = 3


@pytest.fixture(scope="module")
async def metrics_stack(
    e2e_database: str, redis_server_url: str, e2e_prefix: str, e2e_logs: Path
) -> AsyncIterator[Stack]:
    """The e2e stack with a metrics endpoint in every service process."""
    config = e2e_config(e2e_database, redis_server_url, e2e_prefix, e2e_logs, auth=False, env=METRICS_ENV)
    async with running_stack(config, redis_server_url) as running:
        yield running


def metrics_url(process: ServiceProcess) -> str:
    """The endpoint URL the process logged at start-up."""
    for line in process.log_path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("message") == "metrics endpoint listening":
            url: str = record["metrics_url"]
            return url
    raise AssertionError(f"{process.name} logged no metrics endpoint; see {process.log_path}")


async def scrape(process: ServiceProcess) -> list[Sample]:
    """Every sample the process's endpoint serves now."""
    url = metrics_url(process)
    assert url.startswith("http://127.0.0.1:")

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
            return body.decode()

    text = await asyncio.to_thread(fetch)
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def values(samples: list[Sample], name: str, **labels: str) -> list[float]:
    """Values of the samples called `name` whose labels include `labels`."""
    return [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]


async def test_each_process_serves_its_metric_families(metrics_stack: Stack) -> None:
    stack = metrics_stack
    token = secrets.token_hex(4)
    # One client per replica, whose queries go to that replica alone (no consistency session).
    clients = [TesseraClient(stack.write_address, [address], session=False) for address in stack.read_addresses]
    try:
        commands = clients[0].users
        replies = []
        for n in range(USERS):
            request = cmd.RegisterUserRequest(
                email=f"m{n}.{token}@example.com",
                username=f"m{n}_{token}",
                password="metrics-Pa55word-e2e",
                full_name="Grace Hopper",
            )
            # The first one twice with the same key: the second call is an idempotent replay.
            repeats = 2 if n == 0 else 1
            for _ in range(repeats):
                reply = await commands.register_user(request, idempotency_key=f"k{n}-{token}", timeout=10)
            replies.append(reply)

        for client in clients:
            for reply in replies:
                query = qry.GetUserRequest(
                    user_id=reply.user_id, consistency_token=reply.consistency_token, max_wait_ms=10_000
                )
                await client.users.get_user(query, timeout=15)
        with pytest.raises(InvalidArgument):
            await clients[0].users.get_user(qry.GetUserRequest(user_id="not-a-uuid"), timeout=10)
    finally:
        for client in clients:
            await client.close()

    # Write service: calls by method and status, idempotent replays.
    assert stack.write is not None
    write = await scrape(stack.write)
    register_ok = values(
        write, "rpc_server_duration_seconds_count", rpc_method="RegisterUser", rpc_grpc_status_code="OK"
    )
    assert register_ok == [USERS + 1]
    assert values(write, "tessera_write_idempotency_hits_total", command_type="RegisterUser") == [1]

    # Read replicas: GetUser by status, projection progress and lag, near cache.
    for index, reader in enumerate(stack.readers):
        read = await scrape(reader)
        get_ok = values(read, "rpc_server_duration_seconds_count", rpc_method="GetUser", rpc_grpc_status_code="OK")
        assert get_ok and get_ok[0] >= USERS
        invalid = values(
            read, "rpc_server_duration_seconds_count", rpc_method="GetUser", rpc_grpc_status_code="INVALID_ARGUMENT"
        )
        assert invalid == ([1] if index == 0 else [])
        assert values(read, "tessera_read_projection_checkpoint", projection="users")[0] >= USERS
        behind = values(read, "tessera_read_projection_behind", projection="users")
        assert behind and behind[0] >= 0
        lag = values(read, "tessera_read_projection_lag_seconds", projection="users")
        assert lag and lag[0] >= 0
        assert values(read, "tessera_read_projection_parked_position", projection="users") == [0]
        # The near cache's instruments, made before the provider existed, report through it too.
        assert values(read, "tessera_read_near_cache_hit_ratio", view="users")

    # Relays: the active one published every event (a standby publishes none); both sample the backlog.
    published = 0.0
    for relay in stack.relays:
        samples = await scrape(relay)
        published += sum(values(samples, "tessera_relay_published_total"))
        assert len(values(samples, "tessera_relay_backlog", stage="unpositioned")) == 1
        assert len(values(samples, "tessera_relay_backlog", stage="positioned")) == 1
    assert published >= USERS

    # Saga worker: executions by status, every status reported.
    saga = await scrape(stack.saga_workers[0])
    for status in ("running", "compensating", "completed", "failed"):
        assert values(saga, "tessera_saga_executions", status=status) == [0]
