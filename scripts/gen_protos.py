"""Compile protos/ into the checked-in package libs/proto/src (make gen).

With --check, compile into a temporary directory and fail if anything differs from
what is checked in: the generated code must never drift from the protos.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "libs" / "proto" / "src"
GENERATED_ROOTS = ("shipyard",)


def compile_into(out: Path) -> None:
    """Run protoc (grpcio-tools) with the mypy-protobuf plugins into ``out``."""
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # Generated packages are implicit namespace packages for `shipyard` (shared with the
    # client), and regular packages below it, so that mypy and importers agree.
    for directory in out.rglob("*"):
        if (
            directory.is_dir()
            and directory != out / "shipyard"
            and "__pycache__" not in directory.parts
        ):
            (directory / "__init__.py").touch()
    (out / "shipyard" / "py.typed").touch()


def tree(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for name in GENERATED_ROOTS
        for p in (root / name).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not _is_foreign(p.relative_to(root))
    }


def _is_foreign(rel: Path) -> bool:
    # shipyard/client and shipyard/cli live in libs/client, not here.
    return len(rel.parts) > 1 and rel.parts[1] in {"client", "cli"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if checked-in code drifts")
    opts = parser.parse_args()
    if not opts.check:
        for name in GENERATED_ROOTS:
            shutil.rmtree(OUT / name, ignore_errors=True)
        OUT.mkdir(parents=True, exist_ok=True)
        compile_into(OUT)
        print(f"generated {len(tree(OUT))} files into {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        compile_into(fresh)
        want, have = tree(fresh), tree(OUT)
        drift = sorted(set(want) ^ set(have))
        drift += sorted(
            k for k in set(want) & set(have) if not filecmp.cmp(want[k], have[k], False)
        )
        if drift:
            print("generated code drifts from protos/ (run `make gen`):", *drift, sep="\n  ")
            return 1
    print("generated code matches protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
