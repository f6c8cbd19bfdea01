"""Build the tessera-client wheel: the client package plus the `tessera` messages and stubs made from protos/.

Generated code is never committed (docs/decisions/0002-generated-code.md), so the wheel is
built from a staging copy: client/ plus a fresh `tessera` package generated into it with
scripts/gen_protos.py. Run with the project's .venv (it has grpcio-tools and setuptools):

    .venv/bin/python client/build_wheel.py --out dist/
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CLIENT = Path(__file__).resolve().parent
ROOT = CLIENT.parent


def build(out: Path) -> Path:
    """Build the wheel into `out`; return its path."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tessera-client-") as staging_dir:
        staging = Path(staging_dir)
        shutil.copy2(CLIENT / "pyproject.toml", staging / "pyproject.toml")
        shutil.copy2(CLIENT / "README.md", staging / "README.md")
        skip = shutil.ignore_patterns("__pycache__")
        shutil.copytree(CLIENT / "tessera_client", staging / "tessera_client", ignore=skip)
        gen = [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(staging)]
        subprocess.run(gen, check=True)  # noqa: S603 - our own interpreter and script
        before = set(out.glob("tessera_client-*.whl"))
        subprocess.run(  # noqa: S603 - our own interpreter
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
            cwd=staging,
            check=True,
        )
        built = sorted(set(out.glob("tessera_client-*.whl")) - before) or sorted(out.glob("tessera_client-*.whl"))
        return built[-1]


def main() -> int:
    """Build and print the wheel's path."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="directory that receives the wheel")
    print(build(parser.parse_args().out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
