"""`python -m perf read --workers 1,2` (`make bench-read`) runs end to end on a tiny load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis

from perf.cpu import tree_cpu_seconds
from perf.read import main

pytestmark = pytest.mark.integration


def test_cpu_of_a_process_tree_is_counted():
    before = tree_cpu_seconds(os.getpid())
    sum(i * i for i in range(300_000))
    assert tree_cpu_seconds(os.getpid()) > before


def test_the_benchmark_measures_one_and_two_workers_and_leaves_no_keys(
    database_url: str, redis_server_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REDIS_URL", redis_server_url)
    report_path = tmp_path / "read_rps.json"
    args = ["--workers", "1,2", "--users", "20", "--duration", "1", "--processes", "1", "--connections", "2"]
    args += ["--concurrency", "4"]
    assert main([*args, "--json", str(report_path)]) == 0

    report = json.loads(report_path.read_text())
    assert set(report["rps"]) == {"1", "2"}
    for workers in ("1", "2"):
        [run] = report["runs"][workers]
        assert run["workers_answering"] == int(workers), "every worker of the replica answers"
        assert run["errors"] == 0, run["error_codes"]
        assert run["calls"] > 0
        assert report["rps"][workers] > 0
    assert report["ratio_to_first"]["1"] == 1.0
    client = redis.Redis.from_url(redis_server_url)
    try:
        assert report["redis_key_prefix"].startswith("rps:")
        assert not list(client.scan_iter(match=f"{report['redis_key_prefix']}*", count=1000))
    finally:
        client.close()
