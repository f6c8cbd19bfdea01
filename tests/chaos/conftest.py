"""The chaos suite: faults injected into the real stack under load (docs/chaos.md).

Tests marked `chaos` run only when TESSERA_CHAOS=1 (what `make chaos` sets): they take
minutes, kill and pause processes and restart servers, so the default `make test` run
skips them. They never touch the machine's shared Postgres or Redis: every scenario
starts its own throwaway servers. Unmarked tests here (the TCP proxy's own) always run.

Each scenario records its figures in the session's `chaos_report`; at the end the suite
prints them as a table and writes them to results/chaos.json (CHAOS_RESULTS overrides the
path).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.report import ChaosReport, format_table

ENABLE_VARIABLE = "TESSERA_CHAOS"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_REPORT = ChaosReport()


def chaos_enabled() -> bool:
    """Whether this run includes the chaos scenarios."""
    return os.environ.get(ENABLE_VARIABLE, "").strip().lower() in ("1", "true", "yes")


if chaos_enabled():
    # The scenarios restart Postgres from this process while its gRPC clients are busy. As
    # root, Postgres is started under another uid, so subprocess must fork (not vfork), and
    # gRPC's fork handlers then crash the child now and then (SIGSEGV before exec: about one
    # start in three under load). Read when gRPC loads, so it is set before anything imports it.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def pytest_configure(config: pytest.Config) -> None:
    """Register the `chaos` marker (the project's --strict-markers refuses unknown ones)."""
    config.addinivalue_line("markers", "chaos: a fault-injection scenario; runs only with TESSERA_CHAOS=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every `chaos` test unless the run asked for them."""
    if chaos_enabled():
        return
    skip = pytest.mark.skip(reason=f"chaos scenario: run with `make chaos` (or {ENABLE_VARIABLE}=1)")
    for item in items:
        if item.get_closest_marker("chaos") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def chaos_report(pytestconfig: pytest.Config) -> Iterator[ChaosReport]:
    """Collects every scenario's figures; written to results/chaos.json when the session ends."""
    started = time.monotonic()
    terminal = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if terminal is not None and capture is not None:

        def echo(line: str) -> None:
            # Past output capture, straight to the terminal: the figures show as each scenario ends.
            with capture.global_and_fixture_disabled():
                terminal.ensure_newline()
                terminal.write_line(line)

        _REPORT.echo = echo
    yield _REPORT
    if not _REPORT.scenarios:
        return
    path = Path(os.environ.get("CHAOS_RESULTS", _REPO_ROOT / "results" / "chaos.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.system()},
        "duration_s": round(time.monotonic() - started, 1),
        "scenarios": _REPORT.as_dict(),
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    _REPORT.written_to = path


@pytest.fixture(scope="session")
def chaos_logs() -> Path:
    """Where the scenarios' service logs go: a new directory, kept after the run for diagnosis."""
    return Path(tempfile.mkdtemp(prefix="tessera-chaos-"))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the figures of every scenario that ran, as one table."""
    if not _REPORT.scenarios:
        return
    terminalreporter.section("chaos figures")
    for line in format_table(_REPORT):
        terminalreporter.write_line(line)
    if _REPORT.written_to is not None:
        terminalreporter.write_line(f"written to {_REPORT.written_to}")
