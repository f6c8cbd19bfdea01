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


WRITE_CONTEXTS = ("users", "catalog", "orders")
WRITE_LAYERS = ("domain", "commands", "service_layer", "adapters", "entrypoints")


@pytest.mark.parametrize("layer", WRITE_LAYERS)
def test_write_contexts_are_peers_in_every_layer(layer: str) -> None:
    """Each bounded context has its module in each layer of the write side, under the same name."""
    missing = [ctx for ctx in WRITE_CONTEXTS if not (ROOT / "write_service" / layer / f"{ctx}.py").is_file()]
    assert missing == []


def test_no_command_defaults_to_a_context() -> None:
    """Every command names its aggregate type itself; the base class names none."""
    from write_service.commands.base import ChangeCommand, Command
    from write_service.service_layer.handler_table import HANDLERS

    assert "aggregate_type" not in vars(Command) or not isinstance(vars(Command)["aggregate_type"], str)
    assert not isinstance(vars(ChangeCommand).get("aggregate_type"), str)
    assert {command.aggregate_type for command in HANDLERS} == {"user", "product", "order"}
