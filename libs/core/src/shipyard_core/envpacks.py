"""Environment packs on the receiving side: safe archive extraction and unpacking.

An environment pack (built by the imagebuild service) is a deterministic tar.gz of a
relocatable venv holding ``shipyard-runtime``, the model's requirements and the model
folder under ``model/``. The build service makes them; the scheduler's ``local`` backend
(and anyone else who runs one) unpacks them with :func:`unpack`. Both live here, in the
shared library, so that no service imports another service's package.
"""

from __future__ import annotations

import configparser
import gzip
import posixpath
import tarfile
from pathlib import Path, PurePosixPath

from shipyard_core.errors import FailedPrecondition, InvalidArgument

ARCHIVE_FIX = "upload the folder with `shipyard image build`, which makes a valid archive"
"""The fix named by :func:`extract_archive`'s errors."""

__all__ = ["ARCHIVE_FIX", "extract_archive", "format_size", "unpack", "venv_python_version"]


def format_size(size: int) -> str:
    """``1.3 GiB``, ``512 MiB``, ``3 KiB``: one decimal, dropped when it is 0."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def extract_archive(
    archive: Path,
    dest: Path,
    *,
    allow_absolute_symlinks: bool = False,
    max_bytes: int | None = None,
) -> None:
    """Extracts a tar.gz into ``dest`` safely.

    Refused (``InvalidArgument``, nothing written outside ``dest``): absolute names,
    ``..``, links that point outside ``dest``, devices and fifos, and (with ``max_bytes``)
    archives that unpack to more than that. ``allow_absolute_symlinks`` admits symbolic
    links to absolute targets, which environment packs need (``bin/python`` points at the
    build host's base interpreter); names still cannot escape ``dest``.
    """
    dest.mkdir(parents=True, exist_ok=True)

    def check(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise InvalidArgument(
                "archive", f"{member.name!r} is a device, fifo or other special file", ARCHIVE_FIX
            )
        if member.issym() and allow_absolute_symlinks:
            # An env's bin/python links to the base interpreter, and bin/python3 to
            # bin/python: the data filter resolves that chain and finds it outside. Here,
            # relative targets are checked as written, absolute ones are allowed, and the
            # tar filter still refuses to write any name outside dest.
            if not member.linkname.startswith("/"):
                target = posixpath.normpath(
                    posixpath.join(posixpath.dirname(member.name), member.linkname)
                )
                if target == ".." or target.startswith("../"):
                    raise InvalidArgument(
                        "archive", f"link {member.name!r} points outside the folder", ARCHIVE_FIX
                    )
            return tarfile.tar_filter(member, path)
        return tarfile.data_filter(member, path)

    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = tar.getmembers()
            if max_bytes is not None:
                total = sum(m.size for m in members if m.isreg())
                if total > max_bytes:
                    raise FailedPrecondition(
                        f"the archive unpacks to {format_size(total)}, over the "
                        f"{format_size(max_bytes)} limit"
                    )
            for member in members:
                parts = PurePosixPath(member.name).parts
                if member.name.startswith("/") or ".." in parts:
                    raise InvalidArgument(
                        "archive", f"entry {member.name!r} leaves the target folder", ARCHIVE_FIX
                    )
            # Every member passes check(): tarfile's data/tar filters plus the rules above.
            tar.extractall(dest, members=members, filter=check)  # noqa: S202
    except tarfile.FilterError as exc:
        raise InvalidArgument("archive", f"unsafe entry: {exc}", ARCHIVE_FIX) from exc
    except (tarfile.ReadError, EOFError, gzip.BadGzipFile) as exc:
        raise InvalidArgument(
            "archive", f"{archive.name} is not a valid tar.gz: {exc}", ARCHIVE_FIX
        ) from exc


def venv_python_version(env_dir: Path) -> str:
    """The full Python version of the venv at ``env_dir`` (``3.11.7``), from its
    ``pyvenv.cfg`` (``""`` when it does not say)."""
    parser = configparser.ConfigParser()
    # pyvenv.cfg is key = value lines without a section.
    parser.read_string("[venv]\n" + (env_dir / "pyvenv.cfg").read_text())
    return parser.get("venv", "version_info", fallback="") or parser.get(
        "venv", "version", fallback=""
    )


def unpack(pack_path: Path, dest: Path) -> Path:
    """Unpacks an environment pack into ``dest`` and returns the environment's root
    (``dest`` itself): ``<dest>/bin/python -m shipyard_runtime serve --model-dir
    <dest>/model`` runs it.

    The pack refers to its base interpreter by absolute path (``pyvenv.cfg``'s ``home``);
    when that Python is not on this host, ``FailedPrecondition`` says which one is needed.
    """
    extract_archive(pack_path, dest, allow_absolute_symlinks=True)
    cfg = dest / "pyvenv.cfg"
    if not cfg.is_file():
        raise FailedPrecondition(f"{pack_path.name} is not an environment pack (no pyvenv.cfg)")
    home = ""
    for line in cfg.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            home = value.strip()
    if home and not (dest / "bin" / "python").resolve().exists():
        raise FailedPrecondition(
            f"the pack needs the Python in {home} (its version {venv_python_version(dest)}), "
            "which is not on this host; install it there, or build the image on a host with "
            "the same Python"
        )
    return dest
