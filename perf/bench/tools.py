"""Running the project's other measuring tools as subprocesses and reading the JSON they write."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devstack.supervisor import REPO_ROOT

# Subcommands of `python -m perf`, as the benches run them (and name them in the rows).
LOADTEST = "perf loadtest"
LAG = "perf lag"


class ToolError(RuntimeError):
    """A tool is missing, failed, or wrote no usable JSON."""


def module_available(module: str) -> bool:
    """Whether `module` can be imported."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def run_tool(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run a benchmark tool, its output in a temporary file; return its exit status and output.

    Past `timeout_s` (or on Ctrl-C) it gets SIGINT, so it stops the stack it started, then
    SIGKILL 30 s later; the exception is re-raised.
    """
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except BaseException:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise
        log.seek(0)
        return returncode, log.read()


def run_json_tool(module: str, args: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """`python -m module *args --json FILE`; the JSON object it wrote, or ToolError saying why not.

    `module` may name a subcommand after the module: "perf loadtest" runs `python -m perf loadtest`.
    """
    if not module_available(module.split(maxsplit=1)[0]):
        raise ToolError(f"{module} is not available")
    with tempfile.TemporaryDirectory(prefix="tessera-bench-") as folder:
        out = Path(folder) / "report.json"
        argv = [sys.executable, "-m", *module.split(), *args, "--json", str(out)]
        try:
            returncode, output = run_tool(argv, timeout_s)
        except subprocess.TimeoutExpired:
            raise ToolError(f"{module} did not finish within {timeout_s:g} s") from None
        if returncode != 0 or not out.exists():
            tail = output.strip().splitlines()[-3:]
            raise ToolError(f"{module} {args[0] if args else ''} exited with {returncode}: {' / '.join(tail)}"[:400])
        try:
            report = json.loads(out.read_text())
        except ValueError as exc:
            raise ToolError(f"{module} wrote no valid JSON: {exc}") from None
    if not isinstance(report, dict):
        raise ToolError(f"{module} wrote JSON that is not an object")
    return report


def number(report: dict[str, Any], name: str) -> float:
    """report[name] as a float; ToolError when it is missing or not a number."""
    value = report.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolError(f"the report has no number {name!r} (got {value!r})")
    return float(value)
