"""Service processes and the stack: health, pause, kill, restart, every role, migrations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.processes import poll_until, wait_gone
from devstack.servers import EmbeddedPostgres, EmbeddedRedis, find_free_port
from devstack.supervisor import (
    REPO_ROOT,
    ProcessExited,
    ServiceError,
    ServiceProcess,
    Stack,
    StackConfig,
)
from shared_kernel.platform.healthcheck import check_serving, check_serving_async
from shared_kernel.platform.healthcheck import main as healthcheck_main
from tests.integration.devstack.support import recorded_pids, standin_env

pytestmark = pytest.mark.integration


def _standin(standin_path: Path, pid_dir: Path, name: str = "standin_grpc", **extra: str) -> ServiceProcess:
    return ServiceProcess.python_module(
        "svc", name, env=standin_env(standin_path, pid_dir, **extra), grpc_port=0, log_path=pid_dir.parent / "svc.log"
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
    assert wait_gone(recorded_pids(pid_dir), 5.0) == []


def test_service_process_kill_and_restart_on_the_same_port(standin_path: Path, pid_dir: Path):
    with _standin(standin_path, pid_dir) as service:
        address = service.address
        assert service.kill() == -signal.SIGKILL
        assert not check_serving(address, timeout=0.3)
        service.start()
        service.wait_healthy(10.0)
        assert service.address == address
    assert len(recorded_pids(pid_dir)) == 2
    assert wait_gone(recorded_pids(pid_dir), 5.0) == []


def test_terminate_escalates_to_sigkill(standin_path: Path, pid_dir: Path):
    service = _standin(standin_path, pid_dir, STANDIN_IGNORE_SIGTERM="1").start()
    service.wait_healthy(10.0)
    assert service.terminate(grace=0.5) == -signal.SIGKILL
    assert wait_gone(recorded_pids(pid_dir), 5.0) == []


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
        env=standin_env(standin_path, pid_dir),
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
        assert len(recorded_pids(pid_dir)) == 7

        stack.relays[0].kill()  # a chaos test does this on purpose: not a failure
        stack.check()
        os.kill(stack.readers[0].pid or 0, signal.SIGKILL)  # this one nobody asked for
        assert poll_until(lambda: not stack.readers[0].running, 5.0)
        with pytest.raises(ProcessExited, match="read-1"):
            stack.check()
    assert config.log_dir is not None
    assert "migrated" in (config.log_dir / "migrate.log").read_text()
    assert "worker stopped" in (config.log_dir / "relay-2.log").read_text()  # SIGTERM, not SIGKILL
    assert wait_gone(recorded_pids(pid_dir), 5.0) == []


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
    assert wait_gone(recorded_pids(pid_dir), 5.0) == []


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
    env = {**os.environ, **standin_env(standin_path, pid_dir), "DATABASE_URL": embedded_pg.url}
    argv = [sys.executable, "-m", "devstack", "migrate", "--migrate-module", "standin_migrate"]
    argv += ["--data-dir", str(pid_dir.parent / "stack")]
    done = subprocess.run(argv, check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "migrate  | migrated" in done.stdout
    assert not (pid_dir.parent / "stack" / "postgres").exists()  # DATABASE_URL was used, nothing embedded
