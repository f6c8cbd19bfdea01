"""perf/ measures the product and uses the harness; nothing else depends on it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
NOT_PERF = ("devstack", "shared_kernel", "write_service", "read_service", "relay", "payment_provider")


def _imports_perf(package: str) -> list[str]:
    found = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            found += [str(path.relative_to(ROOT)) for name in names if name.split(".")[0] == "perf"]
    return found


@pytest.mark.parametrize("package", NOT_PERF)
def test_package_imports_nothing_from_perf(package: str) -> None:
    assert _imports_perf(package) == []


def test_every_subcommand_names_an_importable_module_with_a_main() -> None:
    import importlib

    from perf.__main__ import SUBCOMMANDS

    for name, sub in SUBCOMMANDS.items():
        assert callable(importlib.import_module(sub.module).main), name


def test_the_cli_lists_its_subcommands_and_refuses_unknown_ones(capsys: pytest.CaptureFixture[str]) -> None:
    from perf.__main__ import main

    assert main([]) == 2
    listed = capsys.readouterr().out
    assert "bench-smoke" in listed and "lag" in listed and "read" in listed
    assert main(["no-such-tool"]) == 2
    assert "unknown subcommand" in capsys.readouterr().err
