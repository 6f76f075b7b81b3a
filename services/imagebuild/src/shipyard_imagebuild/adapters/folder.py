"""The model folder contract: what a folder must hold to become an image.

A model folder holds the model files, a serving script and, optionally, ``shipyard.yaml``:

- ``serve.py`` with ``load(model_dir) -> model`` and ``predict(model, payload) -> result``
  (optionally ``predict_batch``), or an OCI-style ``score.py`` with ``load_model()`` and
  ``predict(data, model)``. When both are present, ``serve.py`` is used.
- ``requirements.txt`` (read when present) and/or, in ``shipyard.yaml``:

  .. code-block:: yaml

      name: iris                    # image name suggestion
      python: "3.11"                # Python of the environment (default: the build host's)
      requirements: [scikit-learn>=1.5]
      requirements_file: deps.txt   # another requirements file in the folder
      workers: 2                    # worker processes per instance (default 1)
      example_input: [[5.1, 3.5, 1.4, 0.2]]   # predict() is called on it at build time
      readme: README.md             # default: README.md when present
      install_dependencies: true    # false: record, do not install (offline sites)

Everything wrong is reported as ``InvalidArgument`` naming the piece and the fix. This
module also computes the folder's deterministic **source digest** and makes (and safely
extracts) deterministic tar.gz archives of it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import yaml

# Moved to shipyard_core (the scheduler unpacks packs too); re-imported so that the old
# names keep working.
from shipyard_core.envpacks import extract_archive, format_size
from shipyard_core.errors import InvalidArgument

CONFIG_FILE = "shipyard.yaml"
# Written by the build into the packed model folder: the resolved configuration.
MANIFEST_FILE = "shipyard.json"
_KNOWN_KEYS = (
    "name",
    "python",
    "requirements",
    "requirements_file",
    "workers",
    "example_input",
    "readme",
    "install_dependencies",
)
_PYTHON = re.compile(r"^\d+\.\d+(\.\d+)?$")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Never part of a model: caches and version control.
_IGNORED_DIRS = frozenset({"__pycache__", ".git"})
_IGNORED_SUFFIXES = (".pyc",)
# Archive entries carry fixed metadata so the same folder always gives the same bytes.
_EPOCH = 0
_CHUNK = 1 << 20

Style = Literal["serve", "score"]


@dataclass(frozen=True)
class ModelFolder:
    """A checked model folder and its resolved configuration."""

    path: Path
    entrypoint: str
    """``serve.py`` or ``score.py``."""
    style: Style
    name: str | None
    """The ``name`` from shipyard.yaml, if any (the build request's name wins)."""
    python: str | None
    """The requested Python version (``"3.11"``), None for the build host's."""
    requirement_files: tuple[Path, ...]
    """Requirements files to install from (``requirements.txt``, ``requirements_file``)."""
    inline_requirements: tuple[str, ...]
    """The ``requirements`` list from shipyard.yaml."""
    requirements: tuple[str, ...]
    """Every requirement line from all sources, comments dropped, in install order."""
    workers: int
    has_example_input: bool
    example_input: Any
    readme: str | None
    install_dependencies: bool
    config: dict[str, Any] = field(default_factory=dict)
    """shipyard.yaml as read (empty when there is none)."""

    @property
    def script(self) -> str:
        """The serving script's file name (same as ``entrypoint``)."""
        return self.entrypoint

    def manifest(self, *, source_digest: str, python_version: str) -> dict[str, Any]:
        """The resolved manifest written as ``shipyard.json`` into the image's model folder."""
        manifest: dict[str, Any] = {
            "format": 1,
            "name": self.name,
            "entrypoint": self.entrypoint,
            "style": self.style,
            "python": python_version,
            "requirements": list(self.requirements),
            "install_dependencies": self.install_dependencies,
            "workers": self.workers,
            "readme": self.readme,
            "source_digest": source_digest,
        }
        # Present only when given, so the runtime knows whether to call predict().
        if self.has_example_input:
            manifest["example_input"] = self.example_input
        return manifest


def _is_ignored(name: str, *, is_dir: bool) -> bool:
    if is_dir:
        return name in _IGNORED_DIRS
    return name.endswith(_IGNORED_SUFFIXES)


def folder_files(folder: Path) -> list[tuple[str, Path, int]]:
    """The folder's files as ``(relative posix path, absolute path, mode)``, sorted by path.

    ``__pycache__``, ``.git`` and ``*.pyc`` are skipped. A symbolic link to a file counts
    as that file (its content is what the model uses); a link to a folder or a dangling
    link is refused, since following it could pull in anything. Modes are normalised to
    0o755 (any execute bit) or 0o644, so a umask does not change the digest.
    """
    entries: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for name in list(dirnames):
            if (base / name).is_symlink():
                rel = (base / name).relative_to(folder).as_posix()
                raise InvalidArgument(
                    "model folder",
                    f"{rel} is a symbolic link to a folder",
                    "copy the folder in instead of linking it",
                )
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d, is_dir=True))
        for name in filenames:
            if _is_ignored(name, is_dir=False):
                continue
            path = base / name
            rel = path.relative_to(folder).as_posix()
            try:
                st = path.stat()
            except FileNotFoundError:
                raise InvalidArgument(
                    "model folder", f"{rel} is a dangling symbolic link", "remove it"
                ) from None
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(
                    "model folder",
                    f"{rel} is not a regular file",
                    "keep only files and folders in the model folder",
                )
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            entries.append((rel, path, mode))
    entries.sort(key=lambda e: e[0])
    return entries


def source_digest(folder: Path) -> str:
    """The sha256 (hex) of the folder's content: sorted relative paths, normalised modes,
    sizes and bytes of every file (see :func:`folder_files`). Timestamps, owners and
    ignored files do not count, so a copy or a fresh checkout gives the same digest."""
    h = hashlib.sha256(b"shipyard-source-v1\0")
    for rel, path, mode in folder_files(folder):
        size = path.stat().st_size
        h.update(f"{rel}\0{mode:o}\0{size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def copy_folder(folder: Path, dest: Path) -> None:
    """Copies the folder's files (as :func:`folder_files` lists them) into ``dest``."""
    for rel, path, mode in folder_files(folder):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        os.chmod(target, mode)


def _fixed_info(name: str, *, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = _EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _HashingWriter(io.RawIOBase):
    """Passes bytes to a file while hashing them, so an archive is digested as it is written."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._out.write(view)
        self.sha256.update(view)
        self.size += view.nbytes
        return view.nbytes


def write_tar_gz(
    entries: Iterator[tuple[str, Path | None, bytes, int, str]],
    dest: Path,
    *,
    compresslevel: int = 6,
) -> tuple[str, int]:
    """Writes a deterministic tar.gz of ``entries`` to ``dest`` (via a temporary file);
    returns its sha256 (hex) and size.

    Each entry is ``(name, path, type, mode, linkname)`` with a tarfile type (REGTYPE with
    the file at ``path``, DIRTYPE, SYMTYPE with ``linkname``), in the order given (callers
    sort). mtime, owners and the gzip header are fixed, so equal inputs give equal bytes.
    """
    tmp = dest.with_name(dest.name + ".part")
    try:
        with tmp.open("wb") as raw:
            hashing = _HashingWriter(raw)
            # filename="" and mtime=0 keep the gzip header free of names and times.
            with (
                gzip.GzipFile(
                    filename="", mode="wb", fileobj=hashing, mtime=0, compresslevel=compresslevel
                ) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for name, path, kind, mode, linkname in entries:
                    if kind == tarfile.REGTYPE:
                        assert path is not None
                        with path.open("rb") as f:
                            size = os.fstat(f.fileno()).st_size
                            tar.addfile(_fixed_info(name, kind=kind, mode=mode, size=size), f)
                    else:
                        info = _fixed_info(name, kind=kind, mode=mode)
                        info.linkname = linkname
                        tar.addfile(info)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashing.sha256.hexdigest(), hashing.size


def make_source_archive(folder: Path, dest: Path) -> tuple[str, int]:
    """Packs the model folder's files into a deterministic tar.gz at ``dest`` (for upload);
    returns the archive's sha256 (hex) and size. Same folder content, same bytes."""
    entries = ((rel, path, tarfile.REGTYPE, mode, "") for rel, path, mode in folder_files(folder))
    return write_tar_gz(entries, dest)


def extract_tarball(archive: Path, dest: Path, *, max_bytes: int | None = None) -> None:
    """Extracts an uploaded model folder archive safely (see :func:`extract_archive`; no
    absolute symbolic links)."""
    extract_archive(archive, dest, max_bytes=max_bytes)


# The name the service uses for the source digest.
folder_digest = source_digest


def _read_requirement_lines(path: Path) -> list[str]:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        # An inline comment needs whitespace before '#' (URLs may hold '#egg=').
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            lines.append(line)
    if pending.strip():
        lines.append(pending.strip())
    return lines


def _raw_scalar(text: str, key: str) -> str | None:
    """The scalar of a top-level key exactly as written, e.g. ``3.10`` (which YAML would
    load as the float 3.1)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key and isinstance(v, yaml.ScalarNode):
            return str(v.value)
    return None


def _inside(folder: Path, rel: str) -> Path | None:
    """``folder/rel`` when ``rel`` is a relative path that stays inside ``folder``."""
    if not rel or rel.startswith("/") or "\\" in rel:
        return None
    candidate = (folder / rel).resolve()
    if not candidate.is_relative_to(folder.resolve()):
        return None
    return candidate


def _problem(problems: list[str], text: str, fix: str) -> None:
    problems.append(f"{text} ({fix})")


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def inspect_folder(path: Path) -> ModelFolder:
    """Checks a model folder against the contract and returns its resolved configuration.

    Raises ``InvalidArgument`` naming what is missing or wrong and the fix: field
    ``model folder`` for the folder itself (no serving script, a reserved or unreadable
    file), ``shipyard.yaml`` for the configuration (every problem of it in one message).
    """
    if not path.is_dir():
        raise InvalidArgument(
            "model folder", f"{path} is not a folder", "give the folder holding serve.py"
        )
    folder = path.resolve()

    style: Style
    if (folder / "serve.py").is_file():
        entrypoint, style = "serve.py", "serve"
    elif (folder / "score.py").is_file():
        entrypoint, style = "score.py", "score"
    else:
        raise InvalidArgument(
            "model folder",
            "neither serve.py nor score.py found",
            "add serve.py with load(model_dir) and predict(model, payload)",
        )
    if (folder / MANIFEST_FILE).exists():
        raise InvalidArgument(
            "model folder",
            f"{MANIFEST_FILE} is reserved (the build writes it)",
            "rename or remove it",
        )

    config: dict[str, Any] = {}
    config_path = folder / CONFIG_FILE
    if not config_path.is_file() and (folder / "shipyard.yml").is_file():
        raise InvalidArgument("model folder", "found shipyard.yml", f"rename it to {CONFIG_FILE}")
    text = ""
    if config_path.is_file():
        text = config_path.read_text(encoding="utf-8")
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            detail = str(exc).replace("\n", " ")
            raise InvalidArgument(
                CONFIG_FILE, f"is not valid YAML: {detail}", "fix the syntax"
            ) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InvalidArgument(
                CONFIG_FILE,
                f"must be a mapping of settings, got {type(loaded).__name__}",
                "write key: value lines such as 'workers: 2'",
            )
        config = loaded

    problems: list[str] = []
    unknown = sorted(str(k) for k in config if k not in _KNOWN_KEYS)
    if unknown:
        _problem(
            problems,
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}",
            f"the keys are {', '.join(_KNOWN_KEYS)}",
        )

    name: str | None = None
    if "name" in config:
        value = config["name"]
        if not isinstance(value, str) or not _NAME.match(value):
            _problem(
                problems,
                f"name must be 1-63 lowercase letters, digits and '-', got {_describe(value)}",
                "e.g. name: iris",
            )
        else:
            name = value

    python: str | None = None
    if "python" in config:
        value = config["python"]
        if isinstance(value, int | float) and not isinstance(value, bool):
            # YAML reads 3.10 as the float 3.1; the text as written is what was meant.
            value = _raw_scalar(text, "python") or str(value)
        if not isinstance(value, str) or not _PYTHON.match(value):
            _problem(
                problems,
                f'python must be a version like "3.11", got {_describe(value)}',
                'write python: "3.11"',
            )
        else:
            python = value

    inline: list[str] = []
    if "requirements" in config:
        value = config["requirements"]
        if not isinstance(value, list) or not all(
            isinstance(r, str) and r.strip() and "\n" not in r for r in value
        ):
            _problem(
                problems,
                f"requirements must be a list of requirement strings, got {_describe(value)}",
                'e.g. requirements: ["scikit-learn>=1.5", "joblib"]',
            )
        else:
            inline = [r.strip() for r in value]
            options = [r for r in inline if r.startswith("-")]
            if options:
                _problem(
                    problems,
                    f"requirements holds pip options {options}",
                    "put options such as --index-url in a requirements file",
                )

    requirement_files: list[Path] = []
    if (folder / "requirements.txt").is_file():
        requirement_files.append(folder / "requirements.txt")
    if "requirements_file" in config:
        value = config["requirements_file"]
        target = _inside(folder, value) if isinstance(value, str) else None
        if target is None:
            _problem(
                problems,
                f"requirements_file must be a file name inside the folder, got {_describe(value)}",
                "e.g. requirements_file: requirements-prod.txt",
            )
        elif not target.is_file():
            _problem(
                problems,
                f"requirements_file {value!r} does not exist",
                "add the file or fix the name",
            )
        elif target not in requirement_files:
            requirement_files.append(target)

    workers = 1
    if "workers" in config:
        value = config["workers"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _problem(
                problems,
                f"workers must be an integer >= 1, got {_describe(value)}",
                "e.g. workers: 2",
            )
        else:
            workers = value

    # null counts as no example, as the runtime reads it: predict() is not called then.
    example = config.get("example_input")
    has_example = example is not None
    if has_example:
        try:
            json.dumps(example, allow_nan=False)
        except (TypeError, ValueError):
            _problem(
                problems,
                f"example_input must be JSON (strings, numbers, booleans, null, lists, "
                f"mappings with string keys), got {_describe(example)}",
                "quote dates and other special values",
            )
        else:
            if _has_non_string_keys(example):
                _problem(
                    problems,
                    "example_input has a mapping with non-string keys",
                    "quote the keys",
                )

    readme: str | None = None
    if "readme" in config:
        value = config["readme"]
        target = _inside(folder, value) if isinstance(value, str) else None
        if target is None:
            _problem(
                problems,
                f"readme must name a file in the folder, got {_describe(value)}",
                "e.g. readme: README.md",
            )
        elif not target.is_file():
            _problem(problems, f"readme {value!r} does not exist", "add the file or fix the name")
        else:
            readme = target.relative_to(folder).as_posix()
    elif (folder / "README.md").is_file():
        readme = "README.md"

    install_dependencies = True
    if "install_dependencies" in config:
        value = config["install_dependencies"]
        if not isinstance(value, bool):
            _problem(
                problems,
                f"install_dependencies must be true or false, got {_describe(value)}",
                "write install_dependencies: false to skip installing the requirements",
            )
        else:
            install_dependencies = value

    if problems:
        raise InvalidArgument(CONFIG_FILE, "; ".join(problems))

    requirements: list[str] = []
    for req_file in requirement_files:
        try:
            requirements.extend(_read_requirement_lines(req_file))
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgument(
                "model folder",
                f"cannot read {req_file.relative_to(folder).as_posix()}: {exc}",
                "save it as UTF-8 text",
            ) from exc
    requirements.extend(inline)

    return ModelFolder(
        path=folder,
        entrypoint=entrypoint,
        style=style,
        name=name,
        python=python,
        requirement_files=tuple(requirement_files),
        inline_requirements=tuple(inline),
        requirements=tuple(requirements),
        workers=workers,
        has_example_input=has_example,
        example_input=example,
        readme=readme,
        install_dependencies=install_dependencies,
        config=config,
    )


def _has_non_string_keys(value: Any) -> bool:
    # json.dumps turns int keys into strings silently; the model would see other keys.
    if isinstance(value, dict):
        return any(not isinstance(k, str) or _has_non_string_keys(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_non_string_keys(v) for v in value)
    return False


__all__ = [
    "CONFIG_FILE",
    "MANIFEST_FILE",
    "ModelFolder",
    "copy_folder",
    "extract_archive",
    "extract_tarball",
    "folder_digest",
    "folder_files",
    "format_size",
    "inspect_folder",
    "make_source_archive",
    "source_digest",
    "write_tar_gz",
]
