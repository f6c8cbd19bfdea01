"""The client when the stack fails under it: a killed write service, a lagging read side, a killed replica.

Real processes throughout (tests/e2e/conftest.py): the write service is killed with SIGKILL
in the middle of a stream of commands and started again; the relays are frozen so the
replicas fall behind; each replica in turn is killed under an open watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from devstack.supervisor import ServiceProcess, Stack
from tessera.common.v1.money_pb2 import Money
from tessera.users.v1.user_query_service_pb2 import WatchUserResponse
from tessera_client import StaleRead, TesseraClient

pytestmark = pytest.mark.e2e


async def restart(process: ServiceProcess) -> None:
    await asyncio.to_thread(process.start)
    await process.wait_healthy_async(60.0)


async def test_every_command_has_exactly_one_effect_across_a_killed_write_service(
    client: TesseraClient, stack: Stack, unique: str
) -> None:
    """Restocks of one unit each: any lost or doubled command would show in the stock and the version."""
    product = await client.catalog.add_product(
        sku=f"KILL-{unique}".upper(), name="Killed", price=Money(currency_code="EUR", amount_minor=100), initial_stock=0
    )
    workers, per_worker = 4, 12
    done = 0
    versions: list[int] = []

    async def worker() -> None:
        nonlocal done
        for _ in range(per_worker):
            reply = await client.catalog.restock_product(product_id=product.product_id, quantity=1, timeout=60.0)
            versions.append(reply.version)
            done += 1

    async def killer() -> None:
        deadline = time.monotonic() + 60
        while done < workers * per_worker // 3:
            assert time.monotonic() < deadline, "the commands did not get going"
            await asyncio.sleep(0.01)
        assert stack.write is not None
        await asyncio.to_thread(stack.write.kill)
        await restart(stack.write)

    await asyncio.wait_for(asyncio.gather(killer(), *(worker() for _ in range(workers))), 120)

    total = workers * per_worker
    assert sorted(versions) == list(range(2, total + 2)), "each command made exactly one new version"
    final = await client.catalog.get_product(product_id=product.product_id)
    assert final.product.stock_available == total
    assert final.product.version == total + 1
    assert client.command_retries > 0, "the kill should have made the client retry"


async def test_a_stale_answer_is_raised_and_the_opt_out_reads_what_is_there(
    client: TesseraClient, stack: Stack, unique: str
) -> None:
    reply = await client.users.register_user(
        email=f"st{unique}@example.com", username=f"st{unique}", password="correct horse battery", full_name="Before"
    )
    await client.users.get_user(user_id=reply.user_id)  # visible everywhere now
    for relay in stack.relays:
        relay.pause()
    try:
        await client.users.update_user_profile(user_id=reply.user_id, full_name="After", bio="", avatar_url="")
        with pytest.raises(StaleRead) as stale:
            await client.users.get_user(user_id=reply.user_id, max_wait_ms=300)
        assert stale.value.response.user.full_name == "Before"
        # An explicit opt-out sends no token and answers at once with the view as it is.
        fresh_enough = await client.users.get_user(user_id=reply.user_id, consistent=False)
        assert not fresh_enough.stale and fresh_enough.user.full_name == "Before"
        # A session that accepts stale answers gets the flag instead of the exception.
        lenient = client.new_session(on_stale="return")
        lenient.session.remember("user", reply.user_id, 2, client.session.token_for("user", reply.user_id))  # type: ignore[union-attr]
        flagged = await lenient.users.get_user(user_id=reply.user_id, max_wait_ms=300)
        assert flagged.stale
    finally:
        for relay in stack.relays:
            relay.resume()
    caught_up = await client.users.get_user(user_id=reply.user_id)
    assert caught_up.user.full_name == "After" and not caught_up.stale


async def test_a_watch_resumes_on_another_replica_without_gap_or_duplicate(
    client: TesseraClient, stack: Stack, unique: str
) -> None:
    """Each replica is killed in turn under the watch, so the one serving it certainly dies."""
    reply = await client.users.register_user(
        email=f"w{unique}@example.com", username=f"w{unique}", password="correct horse battery", full_name="V1"
    )
    delivered: list[WatchUserResponse] = []
    arrived = asyncio.Condition()

    async def follow() -> None:
        async for message in client.users.watch_user(user_id=reply.user_id):
            async with arrived:
                delivered.append(message)
                arrived.notify_all()

    async def until_version(version: int) -> None:
        async with arrived:
            await asyncio.wait_for(arrived.wait_for(lambda: bool(delivered) and delivered[-1].version >= version), 60)

    async def update(n: int) -> None:
        await client.users.update_user_profile(user_id=reply.user_id, full_name=f"V{n}", bio="", avatar_url="")

    watcher = asyncio.create_task(follow())
    try:
        await until_version(1)
        version = 1
        for replica in list(stack.readers):
            version += 1
            await update(version)
            await until_version(version)
            await asyncio.to_thread(replica.kill)
            version += 1
            await update(version)  # while the stream is being re-opened elsewhere
            await until_version(version)
            await restart(replica)
        versions = [m.version for m in delivered if m.exists]  # a first "not yet" is allowed
        assert versions == list(range(1, version + 1)), versions
        assert delivered[-1].user.full_name == f"V{version}"
        assert client.watch_resumes >= 1
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
