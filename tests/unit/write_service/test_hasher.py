"""argon2id hashing: the encoding, the parameters, and that it runs off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import argon2
from pydantic import SecretStr

from write_service.adapters.password_hasher import Argon2PasswordHasher


class Stub:
    """Stands in for argon2's PasswordHasher, whose attributes cannot be patched."""

    def __init__(self, hash_function: Callable[[str], str]) -> None:
        self.hash = hash_function


async def test_hashes_with_argon2id_and_the_given_parameters():
    hasher = Argon2PasswordHasher(time_cost=2, memory_cost_kib=16, parallelism=1)
    encoded = await hasher.hash(SecretStr("correct horse"))
    assert encoded.startswith("$argon2id$v=19$m=16,t=2,p=1$")
    assert argon2.PasswordHasher().verify(encoded, "correct horse")
    assert "correct horse" not in encoded


async def test_salts_differ_per_hash():
    hasher = Argon2PasswordHasher(time_cost=1, memory_cost_kib=8, parallelism=1)
    first, second = await asyncio.gather(hasher.hash(SecretStr("pw12345678")), hasher.hash(SecretStr("pw12345678")))
    assert first != second


async def test_hashing_runs_in_a_worker_thread(monkeypatch):
    hasher = Argon2PasswordHasher(time_cost=1, memory_cost_kib=8, parallelism=1)
    threads: list[int] = []
    inner = hasher._hasher.hash

    def spy(password: str) -> str:
        threads.append(threading.get_ident())
        return inner(password)

    monkeypatch.setattr(hasher, "_hasher", Stub(spy))
    await hasher.hash(SecretStr("pw12345678"))
    assert threads
    assert threads[0] != threading.get_ident()


async def test_concurrency_is_bounded(monkeypatch):
    hasher = Argon2PasswordHasher(time_cost=1, memory_cost_kib=8, parallelism=1, max_concurrent=2)
    running = 0
    peak = 0
    lock = threading.Lock()
    release = threading.Event()

    def slow(password: str) -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(5)
        with lock:
            running -= 1
        return "$argon2id$fake"

    monkeypatch.setattr(hasher, "_hasher", Stub(slow))
    tasks = [asyncio.create_task(hasher.hash(SecretStr("pw12345678"))) for _ in range(5)]
    await asyncio.sleep(0.1)
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 2
