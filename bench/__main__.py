"""Runs benchmarks: ``python -m bench [eventstore ...]`` (all when none is named)."""

from __future__ import annotations

import argparse
import asyncio
import importlib

BENCHES = ["eventstore", "imagebuild", "deploy", "gateway", "asyncinference", "logging"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*BENCHES, []], default=[])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    opts = parser.parse_args()
    for name in opts.names or BENCHES:
        module = importlib.import_module(f"bench.{name}")
        asyncio.run(module.run(quick=opts.quick))


if __name__ == "__main__":
    main()
