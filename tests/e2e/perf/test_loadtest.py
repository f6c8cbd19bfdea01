"""The load tester against the real stack: seed through the API, then read, write and lag runs as a user runs them."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest

from devstack.supervisor import Stack

pytestmark = pytest.mark.e2e

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_TIMEOUT_S = 90.0


async def loadtest(*args: str) -> tuple[int, str, str]:
    """Run `python -m perf loadtest ARGS`; (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "perf",
        "loadtest",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def assert_clean_run(report: dict[str, object]) -> None:
    assert isinstance(report["requests"], int)
    assert report["requests"] > 0
    assert report["ok"] == report["requests"]
    assert report["errors"] == {}
    latency = report["latency_ms"]
    assert isinstance(latency, dict)
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p999"] <= latency["max"]
    assert report["timeline"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_seed_then_read_write_and_lag_runs(stack: Stack, tmp_path: Path) -> None:
    seed_file = tmp_path / "seed.json"
    code, out, err = await loadtest(
        "seed", "--write", stack.write_address, "--users", "12", "--products", "4", "--orders", "8",
        "--out", str(seed_file),
    )  # fmt: skip
    assert code == 0, err
    assert "seeded 12 users, 4 products, 8 orders" in out
    seeded = json.loads(seed_file.read_text())
    assert seeded["counts"] == {"users": 12, "products": 4, "orders": 8}
    assert len({user["user_id"] for user in seeded["users"]}) == 12

    read_json, read_png = tmp_path / "read.json", tmp_path / "read.png"
    code, out, err = await loadtest(
        "read", "--target", ",".join(stack.read_addresses), "--seed", str(seed_file), "--duration", "2",
        "--processes", "2", "--concurrency", "8", "--json", str(read_json), "--plot", str(read_png),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(read_json.read_text())
    assert_clean_run(report)
    assert report["mode"] == "read"
    assert report["engine"] == "python"
    assert report["processes"] == 2
    assert report["model"] == "closed"
    assert report["targets"] == stack.read_addresses
    assert "calls/s" in err  # the live progress line
    assert read_png.read_bytes().startswith(PNG_SIGNATURE)

    if shutil.which("h2load") or Path("/usr/bin/h2load").exists():
        h2_json = tmp_path / "h2load.json"
        code, _out, err = await loadtest(
            "read", "--engine", "h2load", "--target", stack.read_addresses[0], "--seed", str(seed_file),
            "--mix", "get_user=1", "--duration", "1", "--processes", "1", "--concurrency", "4",
            "--json", str(h2_json),
        )  # fmt: skip
        assert code == 0, err
        report = json.loads(h2_json.read_text())
        assert_clean_run(report)
        assert report["engine"] == "h2load"
        assert "DATA" in report["verified_by"]

    write_json = tmp_path / "write.json"
    code, _out, err = await loadtest(
        "write", "--write", stack.write_address, "--command", "add_product", "--rate", "20", "--duration", "1",
        "--processes", "1", "--json", str(write_json),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(write_json.read_text())
    assert_clean_run(report)
    assert report["model"] == "open"
    assert report["requests"] == 20

    lag_json, lag_png = tmp_path / "lag.json", tmp_path / "lag.png"
    code, _out, err = await loadtest(
        "lag", "--write", stack.write_address, "--read", ",".join(stack.read_addresses), "--rate", "10",
        "--duration", "1", "--json", str(lag_json), "--plot", str(lag_png),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(lag_json.read_text())
    assert_clean_run(report)
    per_replica = report["per_replica"]
    assert set(per_replica) == set(stack.read_addresses)
    for figures in per_replica.values():
        assert figures["visible"] == 10
        assert figures["latency_ms"]["p50"] <= figures["latency_ms"]["max"]
    assert lag_png.read_bytes().startswith(PNG_SIGNATURE)


async def test_a_target_that_does_not_answer_is_counted_as_unavailable(stack: Stack, tmp_path: Path) -> None:
    seed_file = tmp_path / "seed.json"
    code, _out, err = await loadtest(
        "seed", "--write", stack.write_address, "--users", "2", "--products", "0", "--orders", "0",
        "--out", str(seed_file),
    )  # fmt: skip
    assert code == 0, err
    report_file = tmp_path / "down.json"
    code, out, err = await loadtest(
        "read", "--target", f"127.0.0.1:{free_port()}", "--seed", str(seed_file), "--mix", "get_user=1",
        "--no-wait", "--duration", "1", "--processes", "1", "--concurrency", "2", "--timeout", "2",
        "--json", str(report_file),
    )  # fmt: skip
    assert code == 1
    assert "no call succeeded" in err
    report = json.loads(report_file.read_text())
    assert report["ok"] == 0
    assert report["requests"] > 0
    assert set(report["errors"]) == {"UNAVAILABLE"}
    assert report["errors"]["UNAVAILABLE"] == report["requests"]
    assert "UNAVAILABLE" in out
