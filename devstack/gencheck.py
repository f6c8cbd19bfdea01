"""Check the generated `tessera` package: never committed, identical to a fresh run of the codegen, importable.

Run as `python -m devstack.gencheck` from the repository root (after `make gen`).
"""

from __future__ import annotations

import filecmp
import importlib
import pkgutil
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from devstack.supervisor import REPO_ROOT

PACKAGE = "tessera"


def committed_files(root: Path = REPO_ROOT) -> list[str]:
    """Generated files that git tracks (there should be none)."""
    if not (root / ".git").exists() or shutil.which("git") is None:
        return []
    listed = subprocess.run(
        ["git", "ls-files", "--", PACKAGE], cwd=root, capture_output=True, text=True, check=True, timeout=60
    )
    return listed.stdout.split()


def _files(root: Path) -> set[str]:
    """Relative paths of the files below `root`, bytecode caches left out."""
    return {
        str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() and "__pycache__" not in path.parts
    }


def stale_files(root: Path = REPO_ROOT) -> list[str]:
    """Differences between the package in the tree and a fresh generation from protos/."""
    current = root / PACKAGE
    if not current.is_dir():
        return [f"{PACKAGE}/ is missing: run `make gen`"]
    with tempfile.TemporaryDirectory(prefix="tessera-gencheck-") as scratch:
        generated = subprocess.run(
            [sys.executable, str(root / "scripts" / "gen_protos.py"), "--out", scratch],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if generated.returncode != 0:
            return [f"codegen failed:\n{generated.stdout}{generated.stderr}"]
        fresh = Path(scratch) / PACKAGE
        old, new = _files(current), _files(fresh)
        problems = [f"{PACKAGE}/{name} is not generated from protos/ any more" for name in sorted(old - new)]
        problems += [f"{PACKAGE}/{name} is missing" for name in sorted(new - old)]
        problems += [
            f"{PACKAGE}/{name} differs from a fresh generation"
            for name in sorted(old & new)
            if not filecmp.cmp(current / name, fresh / name, shallow=False)
        ]
    return problems


def import_errors() -> list[str]:
    """Generated modules that fail to import (for example a protobuf runtime older than the gencode)."""
    errors: list[str] = []
    package = importlib.import_module(PACKAGE)
    for module in pkgutil.walk_packages(package.__path__, f"{PACKAGE}."):
        try:
            importlib.import_module(module.name)
        except Exception as exc:  # every failure is reported, none stops the check
            errors.append(f"{module.name}: {type(exc).__name__}: {exc}")
    return errors


def main() -> int:
    """Print every problem found; exit 1 if there is any."""
    problems = [f"{name} is committed; generated code stays out of git" for name in committed_files()]
    problems += stale_files()
    if not problems:
        problems += import_errors()
    for problem in problems:
        print(f"gencheck: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"gencheck: {PACKAGE}/ is untracked, up to date and importable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
