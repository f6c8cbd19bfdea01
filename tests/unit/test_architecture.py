"""Import rules between the top-level packages (docs/decisions/0001-layout.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("write_service", "read_service", "relay", "payment_provider")
KERNEL_HALVES = ("shared_kernel.contracts", "shared_kernel.platform")


def _imports(package: str) -> dict[str, set[str]]:
    """Every absolute module name imported anywhere under `package` (also inside functions), with
    the files that import it; `from a.b import c` counts as `a.b` and as `a.b.c`, since c may be a module."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, set[str]]:
    """The imports under `package` of a forbidden package or module (or of anything inside one)."""
    return {
        name: files
        for name, files in _imports(package).items()
        if any(name == f or name.startswith(f"{f}.") for f in forbidden)
    }


def test_contracts_import_no_platform_and_no_service() -> None:
    """A contract is stated without the machinery that runs it."""
    assert _offenders("shared_kernel/contracts", ("shared_kernel.platform", *SERVICES, "devstack")) == {}


def test_shared_kernel_imports_no_service() -> None:
    assert _offenders("shared_kernel", (*SERVICES, "devstack")) == {}


@pytest.mark.parametrize("service", SERVICES)
def test_services_do_not_import_each_other(service: str) -> None:
    others = tuple(s for s in (*SERVICES, "devstack") if s != service)
    assert _offenders(service, others) == {}


@pytest.mark.parametrize("service", SERVICES)
def test_services_stand_on_both_halves_of_the_kernel(service: str) -> None:
    """A service takes the shared kernel only through contracts and platform, and uses both."""
    kernel = {name for name in _imports(service) if name == "shared_kernel" or name.startswith("shared_kernel.")}

    def half_of(name: str) -> str | None:
        return next((h for h in KERNEL_HALVES if name == h or name.startswith(f"{h}.")), None)

    assert {name for name in kernel if half_of(name) is None} == set()
    assert {half_of(name) for name in kernel} == set(KERNEL_HALVES)


def test_the_client_imports_none_of_the_server() -> None:
    assert _offenders("client", ("shared_kernel", *SERVICES, "devstack")) == {}


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


def test_the_saga_orchestrator_keeps_only_its_own_state() -> None:
    """Its SQL touches saga rows, the step log and (read-only, for tracing) the outbox: orders,
    products and reservations change only through the domain and the unit of work."""
    import re

    source = (ROOT / "write_service" / "saga" / "orchestrator.py").read_text(encoding="utf-8")
    tables = set(re.findall(r"\b(?:FROM|UPDATE|INTO|JOIN)\s+([a-z_]+)", source))
    assert tables <= {"saga_executions", "saga_steps", "outbox"}, tables
    assert "write_service.domain.orders" in source
