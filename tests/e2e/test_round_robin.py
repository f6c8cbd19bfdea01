"""Clients balance over replicas with gRPC's round_robin policy: over a static address list and over a
DNS name with one address per replica (the compose setup), skipping replicas that report NOT_SERVING
(client-side health checking) and those that die.

The replica that served a call is read from its `x-tessera-replica` response trailer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import socket
import struct
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest

from devstack.processes import Deadline
from devstack.servers import find_free_port
from devstack.supervisor import ServiceProcess, Stack
from read_service.workers import REPLICA_HEADER
from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera.users.v1 import user_query_service_pb2_grpc as qry_grpc
from tessera_client import TesseraClient

if TYPE_CHECKING:
    from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceAsyncStub

pytestmark = pytest.mark.e2e

QUERY_SERVICE = "tessera.users.v1.UserQueryService"


def service_config(*, health_check: bool = True, retry: bool = True) -> str:
    """The client service config the project recommends (docs/scaling.md), with parts switchable for controls."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check:
        # The client watches each replica's health and sends calls only to those SERVING.
        config["healthCheckConfig"] = {"serviceName": QUERY_SERVICE}
    if retry:
        # Queries change nothing, so a call that met a replica going away may safely try another one.
        config["methodConfig"] = [
            {
                "name": [{"service": QUERY_SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def balanced_channel(target: str, **config: bool) -> grpc.aio.Channel:
    """A channel over every address `target` resolves to, with connections of its own."""
    options = [("grpc.service_config", service_config(**config)), ("grpc.use_local_subchannel_pool", 1)]
    return grpc.aio.insecure_channel(target, options=options)


def query_stub(channel: grpc.aio.Channel) -> UserQueryServiceAsyncStub:
    """A UserQueryService stub typed for asyncio."""
    stub: UserQueryServiceAsyncStub = qry_grpc.UserQueryServiceStub(channel)
    return stub


def address_list(*addresses: str) -> str:
    """A static target naming several replicas: `ipv4:host:port,host:port`."""
    return "ipv4:" + ",".join(addresses)


async def served_by(stub: UserQueryServiceAsyncStub, user_id: str) -> str:
    """Which replica process answered a GetUser (its x-tessera-replica trailer)."""
    call = stub.GetUser(qry.GetUserRequest(user_id=user_id), timeout=10)
    reply = await call
    assert reply.user.user_id == user_id
    return str(dict(await call.trailing_metadata())[REPLICA_HEADER])


async def until_serving_from(stub: UserQueryServiceAsyncStub, user_id: str, count: int) -> None:
    """Call until `count` different replicas have answered (round_robin adds each once it is ready)."""
    deadline = Deadline(30)
    seen: set[str] = set()
    while len(seen) < count:
        seen.add(await served_by(stub, user_id))
        if deadline.expired():
            raise AssertionError(f"only {sorted(seen)} answered within 30s")
        await asyncio.sleep(0.02)


def alternates(answers: list[str]) -> bool:
    """Whether consecutive answers always came from different replicas."""
    return all(first != second for first, second in itertools.pairwise(answers))


def replica_header_of(process: ServiceProcess) -> str:
    """The header value a single-process replica sends: <replica id>/<its pid>."""
    return f"{socket.gethostname()}/{process.pid}"


@contextlib.contextmanager
def extra_replica(stack: Stack, name: str, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[ServiceProcess]:
    """One more read replica process beside the stack's (not waited for); terminated afterwards."""
    process = ServiceProcess.python_module(
        name,
        "read_service",
        env=stack.service_env(),
        grpc_port=port,
        host=host,
        log_path=stack.log_dir / f"{name}.log",
    ).start()
    try:
        yield process
    finally:
        process.terminate(grace=10)


@pytest.fixture(scope="module")
async def user_id(tessera: TesseraClient, replica_clients: list[TesseraClient]) -> str:
    """A registered user that every replica of the stack already shows (set up through the client
    library; the tests below use raw channels on purpose, to test the balancing config itself)."""
    unique = secrets.token_hex(4)
    registered = await tessera.users.register_user(
        cmd.RegisterUserRequest(
            email=f"rr.{unique}@example.com", username=f"rr_{unique}", password="round-robin-Pa55", full_name="R R"
        ),
        timeout=10,
    )
    for replica in replica_clients:
        reply = await replica.users.get_user(
            qry.GetUserRequest(
                user_id=registered.user_id, consistency_token=registered.consistency_token, max_wait_ms=10_000
            ),
            timeout=15,
        )
        assert not reply.stale
    return str(registered.user_id)


async def test_calls_alternate_over_a_static_list_of_replicas(stack: Stack, user_id: str) -> None:
    async with balanced_channel(address_list(*stack.read_addresses)) as channel:
        stub = query_stub(channel)
        await until_serving_from(stub, user_id, 2)
        answers = [await served_by(stub, user_id) for _ in range(20)]
    assert set(answers) == {replica_header_of(reader) for reader in stack.readers}
    assert alternates(answers), answers


async def test_a_not_serving_replica_gets_no_calls_until_it_serves(
    stack: Stack, user_id: str, e2e_database: str
) -> None:
    serving = stack.readers[0]
    # Holding the event log locked keeps a new replica's first catch-up, and so its health, back.
    blocker = await asyncpg.connect(e2e_database)
    transaction = blocker.transaction()
    await transaction.start()
    locked = True
    try:
        await blocker.execute("LOCK TABLE relay_state, outbox IN ACCESS EXCLUSIVE MODE")
        with extra_replica(stack, "read-catching-up") as catching_up:
            await _until_listening_not_serving(catching_up)
            target = address_list(serving.address, catching_up.address)

            async with balanced_channel(target, retry=False) as channel:
                stub = query_stub(channel)
                answers = [await served_by(stub, user_id) for _ in range(20)]
                assert set(answers) == {replica_header_of(serving)}

                # Control: without health checking, round_robin hands the catching-up replica its share.
                # (At least 20 calls; more while a subchannel is still connecting on a busy machine,
                # when round_robin sends everything to the one that is ready.)
                async with balanced_channel(target, health_check=False, retry=False) as blind:
                    blind_stub = query_stub(blind)
                    codes = [await _code_of(blind_stub, user_id) for _ in range(20)]
                    deadline, both = Deadline(15), {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
                    while not both <= set(codes) and not deadline.expired():
                        codes.append(await _code_of(blind_stub, user_id))
                assert grpc.StatusCode.UNAVAILABLE in codes
                assert grpc.StatusCode.OK in codes

                await transaction.rollback()
                locked = False
                # Once it is SERVING, the same channel spreads calls over both again.
                await until_serving_from(stub, user_id, 2)
                answers = [await served_by(stub, user_id) for _ in range(20)]
                assert set(answers) == {replica_header_of(serving), replica_header_of(catching_up)}
                assert alternates(answers), answers
    finally:
        if locked:
            await transaction.rollback()
        await blocker.close()


async def _until_listening_not_serving(process: ServiceProcess) -> None:
    from shared_kernel.platform.healthcheck import check_serving_async

    deadline = Deadline(30)
    while True:
        if not process.running:
            raise AssertionError(f"{process.name} exited: {process.log_tail()}")
        try:
            async with grpc.aio.insecure_channel(process.address) as channel:
                stub = query_stub(channel)
                await stub.GetUser(qry.GetUserRequest(user_id="00000000-0000-4000-8000-000000000000"), timeout=1)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "catching up" in (exc.details() or ""):
                assert not await check_serving_async(process.address)
                return
        if deadline.expired():
            raise AssertionError(f"{process.name} never listened while catching up: {process.log_tail()}")
        await asyncio.sleep(0.1)


async def _code_of(stub: UserQueryServiceAsyncStub, user_id: str) -> grpc.StatusCode:
    try:
        await stub.GetUser(qry.GetUserRequest(user_id=user_id), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_when_a_replica_dies_every_call_still_succeeds_on_the_other(stack: Stack, user_id: str) -> None:
    survivor = stack.readers[0]
    with extra_replica(stack, "read-doomed") as doomed:
        await doomed.wait_healthy_async(60)
        async with balanced_channel(address_list(survivor.address, doomed.address)) as channel:
            stub = query_stub(channel)
            await until_serving_from(stub, user_id, 2)
            doomed_header = replica_header_of(doomed)
            answers: list[str] = []
            killed = asyncio.Event()

            async def calls() -> None:
                # Back to back, so some call is in flight or about to start when the replica dies.
                while not killed.is_set() or len(answers) < 200:
                    answers.append(await served_by(stub, user_id))

            caller = asyncio.create_task(calls())
            while len(answers) < 50:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(doomed.kill)
            killed.set()
            await asyncio.wait_for(caller, 60)
    assert doomed_header in answers[:50]
    # Every call succeeded (a failure would have raised), and the dead replica got none at the end.
    assert set(answers[-50:]) == {replica_header_of(survivor)}


class FakeDns:
    """A tiny DNS server answering A queries for one name with several addresses, as compose's DNS does."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name
        self.addresses = addresses
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.queries: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-dns", daemon=True)

    def __enter__(self) -> FakeDns:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(self.reply(query), peer)

    def reply(self, query: bytes) -> bytes:
        """The response to one query: the addresses for an A query of our name, nothing otherwise."""
        query_id = struct.unpack("!H", query[:2])[0]
        labels, index = [], 12
        while query[index]:
            labels.append(query[index + 1 : index + 1 + query[index]].decode())
            index += query[index] + 1
        qtype = struct.unpack("!H", query[index + 1 : index + 3])[0]
        question = query[12 : index + 5]
        name = ".".join(labels)
        self.queries.append(name)
        answers = b""
        count = 0
        if qtype == 1 and name == self.name:
            for address in self.addresses:
                # A pointer to the question's name, type A, class IN, TTL 1 s, 4 bytes of address.
                answers += struct.pack("!HHHIH", 0xC00C, 1, 1, 1, 4) + socket.inet_aton(address)
                count += 1
        return struct.pack("!6H", query_id, 0x8180, 1, count, 0, 0) + question + answers


async def test_one_dns_name_resolving_to_every_replica_is_balanced_too(stack: Stack, user_id: str) -> None:
    # As in compose: one name, one address per replica, the same port on each.
    port = find_free_port("127.0.0.1")
    with (
        extra_replica(stack, "read-dns-1", host="127.0.0.1", port=port) as first,
        extra_replica(stack, "read-dns-2", host="127.0.0.2", port=port) as second,
        FakeDns("read.tessera.test", ["127.0.0.1", "127.0.0.2"]) as dns,
    ):
        await asyncio.gather(first.wait_healthy_async(60), second.wait_healthy_async(60))
        async with balanced_channel(f"dns://127.0.0.1:{dns.port}/read.tessera.test:{port}") as channel:
            stub = query_stub(channel)
            await until_serving_from(stub, user_id, 2)
            answers = [await served_by(stub, user_id) for _ in range(20)]
    assert "read.tessera.test" in dns.queries
    assert set(answers) == {replica_header_of(first), replica_header_of(second)}
    assert alternates(answers), answers
