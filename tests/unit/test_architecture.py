"""Import rules between the top-level packages (docs/decisions/0001-layout.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("write_service", "read_service", "relay", "payment_provider")


def _imported_roots(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_shared_kernel_imports_no_service() -> None:
    imported = _imported_roots("shared_kernel")
    offenders = {name: files for name, files in imported.items() if name in (*SERVICES, "devstack")}
    assert offenders == {}


@pytest.mark.parametrize("service", SERVICES)
def test_services_do_not_import_each_other(service: str) -> None:
    imported = _imported_roots(service)
    others = [s for s in (*SERVICES, "devstack") if s != service]
    offenders = {name: files for name, files in imported.items() if name in others}
    assert offenders == {}
