"""``python -m shipyard_scheduler.fetchpack``: download an environment pack and unpack it.

The init container of every Kubernetes model pod runs it (see
``adapters/k8s_manifests.py``)::

    python -m shipyard_scheduler.fetchpack --key <pack key> --dest /env [--sha256 <hex>]

The store is ``--store`` or the ``SHIPYARD_OBJECT_STORE`` setting (``s3://`` endpoints and
credentials come from the environment, as for every Shipyard service). The pack is
downloaded to a temporary folder (``$TMPDIR``), checked against ``--sha256`` when given,
and unpacked into ``--dest``, which must be empty or hold an earlier run's unpack: an
init container runs again when its pod's sandbox is recreated, so a second run of the same
pack does nothing and a half-finished one is redone.

Failures print one line ``error: <reason>`` on stderr (which Kubernetes keeps as the
container's termination message) and exit 2 for bad input (arguments, setting, a
destination that is not ours) or 1 when fetching or unpacking fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from shipyard_core.envpacks import unpack
from shipyard_core.errors import InvalidArgument, ShipyardError
from shipyard_core.objectstore import open_store, sha256_file, validate_key

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
STORE_SETTING = "SHIPYARD_OBJECT_STORE"
# Written into --dest: the key once the unpack is complete; the marker with this suffix
# while it is in progress, so a rerun knows the folder is its own to clear.
MARKER = ".shipyard-pack"
_PARTIAL = ".partial"


class BadInput(Exception):
    """An argument or setting is wrong: exit 2."""


def build_parser() -> argparse.ArgumentParser:
    """The command line (argparse itself exits 2 on a malformed one)."""
    parser = argparse.ArgumentParser(
        prog="python -m shipyard_scheduler.fetchpack",
        description="Download an environment pack from the object store and unpack it.",
    )
    parser.add_argument("--key", required=True, help="object store key of the pack")
    parser.add_argument("--dest", required=True, type=Path, help="folder to unpack into")
    parser.add_argument(
        "--store",
        default=None,
        help=f"object store URL (default: ${STORE_SETTING}), file:///path or s3://bucket[/prefix]",
    )
    parser.add_argument(
        "--sha256", default=None, help="expected sha256 (hex) of the pack; refuse another"
    )
    return parser


def _prepare_dest(dest: Path, key: str) -> bool:
    """Makes ``dest`` ready for an unpack of ``key``; True when it holds that pack already.

    A folder with foreign files is refused rather than cleared: a wrong ``--dest`` must
    never delete someone's files.
    """
    if dest.exists() and not dest.is_dir():
        raise BadInput(f"--dest {dest} is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    marker = dest / MARKER
    if marker.is_file():
        done = marker.read_text(encoding="utf-8")
        if done == key:
            return True
        raise BadInput(f"--dest {dest} holds another pack ({done}); use an empty folder")
    partial = dest / (MARKER + _PARTIAL)
    if partial.is_file():
        # Our own interrupted run: clear its leftovers (dest itself may be a mount point).
        for child in dest.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    elif any(dest.iterdir()):
        raise BadInput(f"--dest {dest} is not empty")
    partial.write_text(key, encoding="utf-8")
    return False


async def fetch(store_url: str, key: str, dest: Path, sha256: str | None = None) -> bool:
    """Downloads pack ``key`` from the store at ``store_url`` and unpacks it into ``dest``;
    False when ``dest`` held that pack already (nothing done).

    Raises :class:`BadInput` for a wrong destination, and Shipyard errors (``NotFound``,
    ``InvalidArgument``, ``FailedPrecondition``...) from the store and the unpack.
    """
    validate_key(key)
    store = open_store(store_url)
    if await asyncio.to_thread(_prepare_dest, dest, key):
        return False
    with tempfile.TemporaryDirectory(prefix="shipyard-fetchpack-") as tmp:
        pack = Path(tmp) / "pack.tar.gz"
        await store.get_file(key, pack)
        if sha256 is not None:
            actual, _ = await asyncio.to_thread(sha256_file, pack)
            if actual != sha256:
                raise ShipyardError(f"{key} has sha256 {actual}, expected {sha256}")
        await asyncio.to_thread(unpack, pack, dest)
    # The rename is the commit: only now does a rerun skip the work.
    (dest / (MARKER + _PARTIAL)).replace(dest / MARKER)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    store_url = args.store or os.environ.get(STORE_SETTING, "")
    try:
        if not store_url:
            raise BadInput(f"no object store: pass --store or set {STORE_SETTING}")
        sha256 = args.sha256.removeprefix("sha256:").lower() if args.sha256 else None
        if sha256 is not None and (
            len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256)
        ):
            raise BadInput(f"--sha256 {args.sha256!r} is not a sha256 hex digest")
        fetched = asyncio.run(fetch(store_url, args.key, args.dest, sha256))
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except InvalidArgument as exc:
        # The key or the store URL (the archive is checked by unpack, after download).
        code = EXIT_FAILED if exc.field == "archive" else EXIT_BAD_INPUT
        print(f"error: {exc}", file=sys.stderr)
        return code
    except ShipyardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"error: {exc.strerror or exc} ({exc.filename or args.dest})", file=sys.stderr)
        return EXIT_FAILED
    what = "unpacked" if fetched else "already unpacked"
    print(f"{args.key} {what} into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
