"""Stand-ins for the real services, written into a temporary directory by the fixtures.

The devstack tests run these small modules in place of the services, so they check the
supervisor, not the services.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from devstack.supervisor import (
    REPO_ROOT,
)

_RECORD_PID = """
import os
from pathlib import Path
if os.environ.get("STANDIN_PID_DIR"):
    Path(os.environ["STANDIN_PID_DIR"], str(os.getpid())).touch()
"""

# A gRPC server with health that stops gracefully on SIGTERM, like the real services.
_GRPC_SERVER = (
    _RECORD_PID
    + """
import asyncio, signal, sys
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

if os.environ.get("STANDIN_CRASH_FILE") and Path(os.environ["STANDIN_CRASH_FILE"]).exists():
    print("standin refusing to start", flush=True)
    sys.exit(3)

async def main() -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"{os.environ['GRPC_HOST']}:{os.environ['GRPC_PORT']}")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print("serving on", os.environ["GRPC_PORT"], "pid", os.getpid(), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if os.environ.get("STANDIN_IGNORE_SIGTERM"):
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    await stop.wait()
    await servicer.enter_graceful_shutdown()
    await server.stop(1)
    print("stopped gracefully", flush=True)

asyncio.run(main())
"""
)

# A worker without a port (the relay's shape): runs until SIGTERM.
_WORKER = (
    "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
    + _RECORD_PID
    + """
print("worker up, DATABASE_URL and REDIS_URL set:", bool(os.environ["DATABASE_URL"] and os.environ["REDIS_URL"]))
signal.sigwait({signal.SIGTERM})
print("worker stopped", flush=True)
"""
)

# A migrate command that proves the URL it gets reaches a real Postgres.
_MIGRATE = """
import asyncio, os
import asyncpg

async def main() -> None:
    connection = await asyncpg.connect(os.environ["DATABASE_URL"], timeout=10)
    await connection.execute("CREATE TABLE IF NOT EXISTS standin_migrated (id int)")
    await connection.close()
    print("migrated", flush=True)

asyncio.run(main())
"""

STANDINS = {
    "standin_grpc": _GRPC_SERVER,
    "standin_worker": _WORKER,
    "standin_migrate": _MIGRATE,
    "standin_crash": "import sys\nprint('standin crashing', flush=True)\nsys.exit(3)\n",
    "standin_failing_migrate": "import sys\nprint('migration 0001 failed', flush=True)\nsys.exit(2)\n",
}


def shared_tmpdir() -> Path:
    """A temporary directory other users can pass through (embedded Postgres may run as `postgres`)."""
    path = Path(tempfile.mkdtemp(prefix="tessera-test-"))
    path.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return path


def standin_env(standin_path: Path, pid_dir: Path, **extra: str) -> dict[str, str]:
    python_path = os.pathsep.join([str(standin_path), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": python_path, "STANDIN_PID_DIR": str(pid_dir), **extra}


def recorded_pids(pid_dir: Path) -> list[int]:
    return [int(path.name) for path in pid_dir.iterdir()]
