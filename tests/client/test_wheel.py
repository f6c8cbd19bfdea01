"""The client's wheel installs into a fresh virtual environment (with only its own dependencies,
from the package registry) and calls the running stack from there. `make client-check` runs this."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.supervisor import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_installs_and_calls_the_stack(stack: Stack, tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, str(ROOT / "client" / "build_wheel.py"), "--out", str(tmp_path / "dist")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    wheel = Path(built.stdout.strip().splitlines()[-1])
    assert wheel.name.startswith("tessera_client-") and wheel.suffix == ".whl"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=600,
    )
    # Outside the repository, so nothing of the project but the wheel can be imported.
    smoke = tmp_path / "smoke.py"
    shutil.copy2(ROOT / "tests" / "client" / "wheel_smoke.py", smoke)
    result = subprocess.run(
        [str(python), "-I", str(smoke), stack.write_address, *stack.read_addresses],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "wheel smoke ok" in result.stdout
