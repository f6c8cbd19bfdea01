"""`python -m devstack up`: the stack in the foreground, restarts, crash loops, signals."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from devstack.processes import pid_alive, poll_until, process_tree, wait_gone
from devstack.servers import find_free_port
from shared_kernel.platform.healthcheck import check_serving
from tests.devstack_up import DevstackUp
from tests.integration.devstack.support import recorded_pids, standin_env

pytestmark = pytest.mark.integration


def _up(
    standin_path: Path, pid_dir: Path, data_dir: Path, *extra: str, env: dict[str, str] | None = None
) -> DevstackUp:
    """`python -m devstack up` with stand-ins for the services, on free ports."""
    full_env = {**os.environ, **standin_env(standin_path, pid_dir), **(env or {})}
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
    for pid in recorded_pids(pid_dir):
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
    assert wait_gone([*tree, *recorded_pids(pid_dir)], 5.0) == []


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
    assert wait_gone([*tree, *recorded_pids(pid_dir)], 5.0) == []
