"""The dev stack's own machinery: embedded servers, service processes, the stack and its CLI.

The real services are replaced by small stand-ins written into a temporary directory, so these
tests check the supervisor, not the services.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from devstack.processes import pid_alive, poll_until, process_tree, wait_gone
from devstack.servers import EmbeddedPostgres, EmbeddedRedis, ServerError, find_free_port
from devstack.supervisor import (
    REPO_ROOT,
    ProcessExited,
    ServiceError,
    ServiceProcess,
    Stack,
    StackConfig,
)
from shared_kernel.healthcheck import check_serving, check_serving_async
from shared_kernel.healthcheck import main as healthcheck_main
from tests.devstack_up import DevstackUp

pytestmark = pytest.mark.integration

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

_STANDINS = {
    "standin_grpc": _GRPC_SERVER,
    "standin_worker": _WORKER,
    "standin_migrate": _MIGRATE,
    "standin_crash": "import sys\nprint('standin crashing', flush=True)\nsys.exit(3)\n",
    "standin_failing_migrate": "import sys\nprint('migration 0001 failed', flush=True)\nsys.exit(2)\n",
}


def _shared_tmpdir() -> Path:
    """A temporary directory other users can pass through (embedded Postgres may run as `postgres`)."""
    path = Path(tempfile.mkdtemp(prefix="tessera-test-"))
    path.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return path


@pytest.fixture(scope="module")
def standin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of stand-in modules, each runnable with `python -m NAME`."""
    root = tmp_path_factory.mktemp("standins")
    for name, source in _STANDINS.items():
        package = root / name
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "__main__.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def pid_dir(tmp_path: Path) -> Path:
    """Where stand-ins record their pids."""
    path = tmp_path / "pids"
    path.mkdir()
    return path


def _standin_env(standin_path: Path, pid_dir: Path, **extra: str) -> dict[str, str]:
    python_path = os.pathsep.join([str(standin_path), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": python_path, "STANDIN_PID_DIR": str(pid_dir), **extra}


def _recorded_pids(pid_dir: Path) -> list[int]:
    return [int(path.name) for path in pid_dir.iterdir()]


@pytest.fixture(scope="module")
def embedded_pg() -> Iterator[EmbeddedPostgres]:
    """One throwaway Postgres for the tests that only need a URL."""
    with EmbeddedPostgres() as server:
        yield server


@pytest.fixture(scope="module")
def embedded_redis() -> Iterator[EmbeddedRedis]:
    """One throwaway Redis for the tests that only need a URL."""
    with EmbeddedRedis() as server:
        yield server


# --- embedded servers -------------------------------------------------------------------


def test_find_free_port_is_bindable():
    port = find_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def _fetch_rows(url: str) -> list[int]:
    connection = await asyncpg.connect(url, timeout=5)
    try:
        return [row["n"] for row in await connection.fetch("SELECT n FROM survivors ORDER BY n")]
    finally:
        await connection.close()


async def test_postgres_survives_kill_and_restart_then_cleans_up():
    postgres = EmbeddedPostgres()
    with postgres:
        connection = await asyncpg.connect(postgres.url, timeout=5)
        await connection.execute("CREATE TABLE survivors (n int); INSERT INTO survivors VALUES (1), (2)")
        await connection.close()
        pids = process_tree(postgres.pid or 0)
        assert len(pids) > 1  # the postmaster and its helper processes

        postgres.kill()
        assert not postgres.running
        assert wait_gone(pids, 5.0) == []
        with pytest.raises(OSError):
            await asyncpg.connect(postgres.url, timeout=2)

        port = postgres.port
        postgres.restart()
        assert postgres.port == port
        assert await _fetch_rows(postgres.url) == [1, 2]  # committed rows outlive a crash
        data_dir = postgres.data_dir
        pids = process_tree(postgres.pid or 0)
    assert not data_dir.exists()
    assert wait_gone(pids, 5.0) == []


async def test_postgres_pause_makes_connections_hang_until_resume(embedded_pg: EmbeddedPostgres):
    embedded_pg.pause()
    try:
        with pytest.raises(TimeoutError):
            await asyncpg.connect(embedded_pg.url, timeout=0.5)
    finally:
        embedded_pg.resume()
    connection = await asyncpg.connect(embedded_pg.url, timeout=5)
    assert await connection.fetchval("SELECT 1") == 1
    await connection.close()


async def test_postgres_persistent_dir_is_kept_and_reused():
    base = _shared_tmpdir()
    try:
        with EmbeddedPostgres(data_dir=base / "pg") as postgres:
            connection = await asyncpg.connect(postgres.url, timeout=5)
            await connection.execute("CREATE TABLE survivors (n int); INSERT INTO survivors VALUES (7)")
            await connection.close()
        assert (base / "pg" / "pgdata" / "PG_VERSION").exists()
        orphan = EmbeddedPostgres(data_dir=base / "pg").start()  # as if its supervisor were SIGKILLed
        orphan_pids = process_tree(orphan.pid or 0)
        with EmbeddedPostgres(data_dir=base / "pg") as again:  # takes the directory back
            assert wait_gone(orphan_pids, 1.0) == []
            assert await _fetch_rows(again.url) == [7]
        orphan.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_redis_with_appendonly_keeps_data_across_kill():
    with EmbeddedRedis(appendonly=True) as server:
        client = server.client()
        client.set("k", "v")
        server.kill()
        assert not server.running
        server.restart()
        client = server.client()
        assert client.get("k") == b"v"
        client.close()
        data_dir = server.data_dir
    assert not data_dir.exists()


def test_redis_without_persistence_forgets_on_restart_and_pauses():
    with EmbeddedRedis() as server:
        client = server.client(timeout=0.5)
        client.set("k", "v")
        server.restart()
        client = server.client(timeout=0.5)
        assert client.get("k") is None

        server.pause()
        try:
            with pytest.raises(Exception, match=r"[Tt]imeout"):
                client.ping()
        finally:
            server.resume()
        client = server.client()
        assert client.ping()
        client.close()
        pid = server.pid
    assert pid is not None and not pid_alive(pid)


def test_start_failure_reports_the_log_and_cleans_up():
    server = EmbeddedRedis(extra_args=["--no-such-directive", "x"])
    with pytest.raises(ServerError, match=r"(?s)exited with code.*no-such-directive") as info:
        server.start()
    assert "redis" in str(info.value)
    assert not server.running
    assert server._data_dir is None  # the temporary directory is gone


# --- service processes ------------------------------------------------------------------


def _standin(standin_path: Path, pid_dir: Path, name: str = "standin_grpc", **extra: str) -> ServiceProcess:
    return ServiceProcess.python_module(
        "svc", name, env=_standin_env(standin_path, pid_dir, **extra), grpc_port=0, log_path=pid_dir.parent / "svc.log"
    )


async def test_service_process_health_pause_resume_and_graceful_stop(standin_path: Path, pid_dir: Path):
    with _standin(standin_path, pid_dir) as service:
        assert service.address.startswith("127.0.0.1:")
        assert await check_serving_async(service.address)
        service.pause()
        assert not check_serving(service.address, timeout=0.3)
        service.resume()
        assert poll_until(lambda: check_serving(service.address, timeout=0.5), 5.0)
        assert healthcheck_main([service.address]) == 0
    assert service.returncode == 0
    assert not service.failed
    assert "stopped gracefully" in service.log_path.read_text()
    assert wait_gone(_recorded_pids(pid_dir), 5.0) == []


def test_service_process_kill_and_restart_on_the_same_port(standin_path: Path, pid_dir: Path):
    with _standin(standin_path, pid_dir) as service:
        address = service.address
        assert service.kill() == -signal.SIGKILL
        assert not check_serving(address, timeout=0.3)
        service.start()
        service.wait_healthy(10.0)
        assert service.address == address
    assert len(_recorded_pids(pid_dir)) == 2
    assert wait_gone(_recorded_pids(pid_dir), 5.0) == []


def test_terminate_escalates_to_sigkill(standin_path: Path, pid_dir: Path):
    service = _standin(standin_path, pid_dir, STANDIN_IGNORE_SIGTERM="1").start()
    service.wait_healthy(10.0)
    assert service.terminate(grace=0.5) == -signal.SIGKILL
    assert wait_gone(_recorded_pids(pid_dir), 5.0) == []


def test_early_exit_is_reported_with_the_log(standin_path: Path, pid_dir: Path):
    service = _standin(standin_path, pid_dir, name="standin_crash")
    service.start()
    with pytest.raises(ProcessExited, match=r"(?s)code 3.*standin crashing"):
        service.wait_healthy(10.0)
    assert service.failed


def test_healthcheck_fails_without_a_server():
    assert healthcheck_main([f"127.0.0.1:{find_free_port()}", "--timeout", "0.3"]) == 1
    assert healthcheck_main(["--reach-env", "DEVSTACK_TEST_UNSET_URL"]) == 1


# --- the stack --------------------------------------------------------------------------


def _stack_config(standin_path: Path, pid_dir: Path, **overrides: object) -> StackConfig:
    config = StackConfig(
        env=_standin_env(standin_path, pid_dir),
        log_dir=pid_dir.parent / "logs",
        migrate_module="standin_migrate",
        write_module="standin_grpc",
        relay_module="standin_worker",
        read_module="standin_grpc",
        startup_timeout=20.0,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_stack_starts_every_role_and_stops_without_leftovers(
    standin_path: Path, pid_dir: Path, embedded_pg: EmbeddedPostgres, embedded_redis: EmbeddedRedis
):
    config = _stack_config(
        standin_path, pid_dir, database_url=embedded_pg.url, redis_url=embedded_redis.url, read_ports=(0, 0, 0)
    )
    with Stack(config) as stack:
        assert check_serving(stack.write_address)
        assert len(stack.read_addresses) == 3
        assert all(check_serving(address) for address in stack.read_addresses)
        assert [relay.name for relay in stack.relays] == ["relay-1", "relay-2"]
        assert stack.service_env()["DATABASE_URL"] == embedded_pg.url
        assert stack.postgres is None and stack.redis is None  # URLs were given
        stack.check()
        extra = stack.add_reader()
        assert check_serving(extra.address)
        assert len(_recorded_pids(pid_dir)) == 7

        stack.relays[0].kill()  # a chaos test does this on purpose: not a failure
        stack.check()
        os.kill(stack.readers[0].pid or 0, signal.SIGKILL)  # this one nobody asked for
        assert poll_until(lambda: not stack.readers[0].running, 5.0)
        with pytest.raises(ProcessExited, match="read-1"):
            stack.check()
    assert config.log_dir is not None
    assert "migrated" in (config.log_dir / "migrate.log").read_text()
    assert "worker stopped" in (config.log_dir / "relay-2.log").read_text()  # SIGTERM, not SIGKILL
    assert wait_gone(_recorded_pids(pid_dir), 5.0) == []


async def test_stack_starts_from_async_code_without_migrating(
    standin_path: Path, pid_dir: Path, embedded_pg: EmbeddedPostgres, embedded_redis: EmbeddedRedis
):
    config = _stack_config(
        standin_path,
        pid_dir,
        database_url=embedded_pg.url,
        redis_url=embedded_redis.url,
        relays=0,
        read_ports=(0,),
        migrate=False,
    )
    stack = await Stack(config).start_async()
    try:
        assert await check_serving_async(stack.read_addresses[0])
    finally:
        await stack.stop_async()
    assert config.log_dir is not None
    assert not (config.log_dir / "migrate.log").exists()
    assert wait_gone(_recorded_pids(pid_dir), 5.0) == []


def test_stack_reports_failed_migrations(standin_path: Path, pid_dir: Path, embedded_redis: EmbeddedRedis):
    config = _stack_config(
        standin_path, pid_dir, redis_url=embedded_redis.url, migrate_module="standin_failing_migrate"
    )
    stack = Stack(config)
    with pytest.raises(ServiceError, match=r"(?s)migrations failed with code 2.*0001 failed"):
        stack.start()
    assert stack.postgres is not None and not stack.postgres.running  # the embedded one was stopped
    assert stack.processes == []


def test_migrate_command_runs_against_database_url(standin_path: Path, pid_dir: Path, embedded_pg: EmbeddedPostgres):
    env = {**os.environ, **_standin_env(standin_path, pid_dir), "DATABASE_URL": embedded_pg.url}
    argv = [sys.executable, "-m", "devstack", "migrate", "--migrate-module", "standin_migrate"]
    argv += ["--data-dir", str(pid_dir.parent / "stack")]
    done = subprocess.run(argv, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "migrate  | migrated" in done.stdout
    assert not (pid_dir.parent / "stack" / "postgres").exists()  # DATABASE_URL was used, nothing embedded


# --- python -m devstack up --------------------------------------------------------------


def _up(
    standin_path: Path, pid_dir: Path, data_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> DevstackUp:
    """`python -m devstack up` with stand-ins for the services, on free ports."""
    full_env = {**os.environ, **_standin_env(standin_path, pid_dir), **(env or {})}
    for name in ("DATABASE_URL", "REDIS_URL"):
        full_env.pop(name, None)
    args = [
        "--data-dir",
        str(data_dir),
        "--write-port",
        str(find_free_port()),
        "--read-ports",
        f"{find_free_port()},{find_free_port()}",
        "--provider-port",
        str(find_free_port()),
        "--saga-ports",
        str(find_free_port()),
        "--migrate-module",
        "standin_migrate",
        "--write-module",
        "standin_grpc",
        "--relay-module",
        "standin_worker",
        "--read-module",
        "standin_grpc",
        "--startup-timeout",
        "20",
        *extra,
    ]
    return DevstackUp(args, full_env)


_SERVING = re.compile(r"^(\S+) +\| serving on (\d+) pid (\d+)$", re.MULTILINE)


@pytest.fixture
def cli_data_dir() -> Iterator[Path]:
    """A data directory for `up` that the Postgres account can reach."""
    path = _shared_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_up_runs_the_stack_and_stops_everything_on_sigterm(standin_path: Path, pid_dir: Path, cli_data_dir: Path):
    cli = _up(standin_path, pid_dir, cli_data_dir)
    try:
        output = cli.read_until("stack is up", 30.0)
        assert "UserCommandService/RegisterUser" in output
        assert "UserQueryService/GetUser" in output
        assert "migrate  | migrated" in output  # child output is echoed with a prefix
        tree = process_tree(cli.process.pid)
        assert len(tree) >= 1 + 2 + 5  # the supervisor, Postgres and Redis, five services
        cli.process.send_signal(signal.SIGTERM)
        rest = cli.wait(30)
    finally:
        cli.kill()
    assert cli.process.returncode == 0, rest
    assert "SIGTERM received, stopping" in rest
    assert wait_gone(tree, 5.0) == []
    assert (cli_data_dir / "postgres" / "pgdata" / "PG_VERSION").exists()  # .stack data is kept
    assert (cli_data_dir / "logs" / "read-2.log").exists()


def _living_standins(pid_dir: Path, module: str) -> list[int]:
    """Pids of the living stand-ins running `python -m module`."""
    found = []
    for pid in _recorded_pids(pid_dir):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if module.encode() in command and pid_alive(pid):
            found.append(pid)
    return found


def test_up_restarts_a_killed_service_and_keeps_the_rest_running(standin_path: Path, pid_dir: Path, cli_data_dir: Path):
    cli = _up(standin_path, pid_dir, cli_data_dir, "--relays", "1", "--restart-backoff", "0.2")
    try:
        output = cli.read_until("stack is up", 30.0)
        serving = {name: f"127.0.0.1:{port}" for name, port, _ in _SERVING.findall(output)}
        [victim] = _living_standins(pid_dir, "standin_worker")
        os.kill(victim, signal.SIGKILL)
        restarted = cli.read_until("relay-1 restarted", 15.0)
        assert f"relay-1 (pid {victim}) exited with signal SIGKILL" in restarted
        assert "restarting in 0.20s (crash 1 in a row" in restarted
        status = cli.read_until("status:", 5.0).splitlines()[-1]
        assert "relay-1 up (1 restart)" in status and "write up" in status
        assert poll_until(lambda: len(_living_standins(pid_dir, "standin_worker")) == 1, 10.0)
        [replacement] = _living_standins(pid_dir, "standin_worker")
        assert replacement != victim
        assert all(check_serving(address) for address in serving.values())  # nothing else was stopped

        # The embedded servers the stack started come back too, on the same port and data.
        for server, pid_file in (("redis", "redis/redis.pid"), ("postgres", "postgres/pgdata/postmaster.pid")):
            pid = int((cli_data_dir / pid_file).read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            cli.read_until(f"embedded {server} exited with signal SIGKILL", 10.0)
            cli.read_until(f"{server} restarted (pid", 60.0)
        status = cli.read_until("status:", 5.0).splitlines()[-1]
        assert "postgres up (1 restart)" in status and "redis up (1 restart)" in status
        assert cli.process.poll() is None
        tree = process_tree(cli.process.pid)
        cli.process.send_signal(signal.SIGTERM)
        rest = cli.wait(30)
    finally:
        cli.kill()
    assert cli.process.returncode == 0, rest
    assert "worker stopped" in (cli_data_dir / "logs" / "relay-1.log").read_text()  # the new one, by SIGTERM
    assert wait_gone([*tree, *_recorded_pids(pid_dir)], 5.0) == []


def test_up_reports_a_crash_looping_service_failed_and_stops_everything_on_ctrl_c(
    standin_path: Path, pid_dir: Path, cli_data_dir: Path
):
    crash_file = pid_dir.parent / "crash-on-start"
    extra = ("--max-crashes", "3", "--restart-backoff", "0.05", "--restart-backoff-max", "0.1")
    cli = _up(standin_path, pid_dir, cli_data_dir, *extra, env={"STANDIN_CRASH_FILE": str(crash_file)})
    try:
        output = cli.read_until("stack is up", 30.0)
        serving = {name: (f"127.0.0.1:{port}", int(pid)) for name, port, pid in _SERVING.findall(output)}
        assert set(serving) == {"write", "read-1", "read-2"}
        crash_file.touch()  # from now on a stand-in that starts exits at once with code 3
        os.kill(serving["read-1"][1], signal.SIGKILL)
        failed = cli.read_until("FAILED, 3 crashes in a row", 30.0)
        assert failed.count("read-1 restarted") == 2
        assert "exited with code 3" in failed and "standin refusing to start" in failed  # the log's end
        status = cli.read_until("status:", 5.0).splitlines()[-1]
        assert "read-1 FAILED (2 restarts)" in status
        assert "read-2 up" in status and "write up" in status and "relay-1 up" in status
        # The rest stays up, and nothing restarts read-1 any more.
        assert check_serving(serving["write"][0]) and check_serving(serving["read-2"][0])
        assert not check_serving(serving["read-1"][0], timeout=0.5)
        assert len(_living_standins(pid_dir, "standin_worker")) == 2
        assert cli.process.poll() is None
        tree = process_tree(cli.process.pid)
        cli.process.send_signal(signal.SIGINT)
        rest = cli.wait(30)
    finally:
        cli.kill()
    assert cli.process.returncode == 0, rest
    assert "Ctrl-C received, stopping" in rest
    assert "read-1 FAILED" in rest  # the last status line
    assert wait_gone([*tree, *_recorded_pids(pid_dir)], 5.0) == []
