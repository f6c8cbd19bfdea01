"""argon2id password hashing, run in worker threads so the event loop keeps serving."""

from __future__ import annotations

import asyncio

import argon2
from argon2.low_level import hash_secret_raw
from pydantic import SecretStr

from write_service.service_layer.ports import PasswordHasher


class Argon2PasswordHasher(PasswordHasher):
    """Hashes with argon2id; at most `max_concurrent` hashes run at once to bound memory."""

    def __init__(
        self,
        *,
        time_cost: int = 3,
        memory_cost_kib: int = 65536,
        parallelism: int = 4,
        max_concurrent: int = 4,
    ) -> None:
        # Defaults are argon2-cffi's, the RFC 9106 "low memory" profile.
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost_kib,
            parallelism=parallelism,
            type=argon2.Type.ID,
        )
        self._time_cost = time_cost
        self._memory_cost_kib = memory_cost_kib
        self._parallelism = parallelism
        # Each hash holds `memory_cost_kib` of RAM; the semaphore caps the total under load.
        self._slots = asyncio.Semaphore(max_concurrent)

    async def hash(self, password: SecretStr) -> str:
        """The PHC-encoded argon2id hash of `password`."""
        async with self._slots:
            return await asyncio.to_thread(self._hasher.hash, password.get_secret_value())

    async def derive(self, secret: SecretStr, salt: bytes) -> bytes:
        """Raw argon2id of `secret` with a given salt and the same cost as `hash`: deterministic, never fast."""
        async with self._slots:
            return await asyncio.to_thread(
                hash_secret_raw,
                secret.get_secret_value().encode(),
                salt,
                time_cost=self._time_cost,
                memory_cost=self._memory_cost_kib,
                parallelism=self._parallelism,
                hash_len=32,
                type=argon2.Type.ID,
            )
