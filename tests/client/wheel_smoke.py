"""Run by the wheel test with a fresh virtual environment's Python, outside the repository.

Registers a user through the installed client and reads it back consistently; fails if the
server's dependencies are importable (the wheel must not need them).
"""

import asyncio
import importlib.util
import sys
import uuid

from tessera_client import NotFound, TesseraClient


async def main(write: str, reads: list[str]) -> None:
    for server_only in ("asyncpg", "redis", "pydantic", "shared_kernel", "write_service"):
        assert importlib.util.find_spec(server_only) is None, f"{server_only} is installed beside the client"
    tag = uuid.uuid4().hex[:8]
    async with TesseraClient(write, reads, timeout=20.0) as tessera:
        user = await tessera.users.register_user(
            email=f"wheel{tag}@example.com", username=f"wheel{tag}", password="correct horse battery", full_name="W"
        )
        reply = await tessera.users.get_user(user_id=user.user_id)
        assert reply.user.username == f"wheel{tag}" and not reply.stale
        try:
            await tessera.users.get_user(user_id=str(uuid.uuid4()), consistent=False)
        except NotFound:
            pass
        else:
            raise AssertionError("expected NotFound")
    print("wheel smoke ok", user.user_id)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
