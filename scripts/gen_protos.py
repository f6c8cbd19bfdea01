"""Generate Python modules and typed stubs from protos/ into the `tessera` package.

Generated code is never committed (docs/decisions/0002-generated-code.md): every
install, test run, image build and stack start runs this script, so the code in use
always matches the protos in the tree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "tessera"


def main() -> int:
    """Regenerate the package; exit non-zero when protoc fails."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="directory that receives the package")
    args = parser.parse_args()

    from grpc_tools import protoc

    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    target = out / PACKAGE
    if target.exists():
        shutil.rmtree(target)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    argv = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    code = protoc.main(argv)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return int(code)
    for directory in [target, *(p for p in target.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    (target / "py.typed").touch()
    print(f"generated {len(protos)} proto files into {target.relative_to(out)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
