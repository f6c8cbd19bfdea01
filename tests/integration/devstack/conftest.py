"""Fixtures of the devstack tests: stand-in modules, pid records, throwaway servers."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.servers import EmbeddedPostgres, EmbeddedRedis
from tests.integration.devstack.support import STANDINS, shared_tmpdir


@pytest.fixture(scope="module")
def standin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of stand-in modules, each runnable with `python -m NAME`."""
    root = tmp_path_factory.mktemp("standins")
    for name, source in STANDINS.items():
        package = root / name
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "__main__.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def pid_dir(tmp_path: Path) -> Path:
    """Where stand-ins record their pids."""
    path = tmp_path / "pids"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def embedded_pg() -> Iterator[EmbeddedPostgres]:
    """One throwaway Postgres for the tests that only need a URL."""
    with EmbeddedPostgres() as server:
        yield server


@pytest.fixture(scope="module")
def embedded_redis() -> Iterator[EmbeddedRedis]:
    """One throwaway Redis for the tests that only need a URL."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def cli_data_dir() -> Iterator[Path]:
    """A data directory for `up` that the Postgres account can reach."""
    path = shared_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)
