"""``python -m shipyard_runtime serve|check``: the runtime's command line."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from shipyard_runtime import __version__, logs

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``33554432``, ``32MiB``, ``32M``, ``512k``... → bytes (binary units)."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 33554432 or 32MiB)")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value} (0 picks a free one)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``serve`` / ``check`` command line."""
    parser = argparse.ArgumentParser(
        prog="python -m shipyard_runtime",
        description="Shipyard's model server: serve a model folder, or check it.",
    )
    parser.add_argument("--version", action="version", version=f"shipyard-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model over HTTP with N workers")
    serve.add_argument("--model-dir", required=True, type=Path, help="the model folder")
    serve.add_argument("--port", required=True, type=_port, help="TCP port (0: a free one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="worker processes (default: shipyard.json workers, else 1)",
    )
    serve.add_argument(
        "--name",
        default=None,
        help="model name in URLs (default: shipyard.json name, else the folder name)",
    )
    serve.add_argument(
        "--max-body",
        type=parse_size,
        default=32 << 20,
        help="largest request body, e.g. 32MiB (default); bigger gets 413",
    )
    serve.add_argument(
        "--keepalive-timeout",
        type=_seconds,
        default=75.0,
        help="close connections idle this long (seconds, default 75)",
    )
    serve.add_argument(
        "--graceful-timeout",
        type=_seconds,
        default=30.0,
        help="on SIGTERM, wait this long for requests in progress (seconds, default 30)",
    )
    serve.add_argument(
        "--backlog", type=_positive_int, default=2048, help="listen backlog (default 2048)"
    )
    serve.add_argument(
        "--access-log", action="store_true", help="log one line per request (off: speed)"
    )
    serve.add_argument(
        "--max-batch",
        type=_positive_int,
        default=32,
        help="when the script has predict_batch: most requests per call (default 32; "
        "1: no batching)",
    )

    check = commands.add_parser(
        "check", help="import the script, load the model, predict on the example; print JSON"
    )
    check.add_argument("--model-dir", required=True, type=Path, help="the model folder")
    check.add_argument(
        "--example-json",
        type=Path,
        default=None,
        help="file holding the example payload as JSON ('-': stdin); "
        "default: example_input from shipyard.json",
    )
    return parser


def _serve(args: argparse.Namespace) -> int:
    from shipyard_runtime.model import ModelFolderError, find_script, read_manifest
    from shipyard_runtime.server import ServeConfig, serve

    # stdout is usually a pipe to a log collector: the model's print() lines should reach
    # it as they happen, not when a block buffer fills.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)

    model_dir: Path = args.model_dir.resolve()
    try:
        manifest = read_manifest(model_dir)
        # Fail here, in one line, rather than in every worker.
        find_script(model_dir)
    except ModelFolderError as exc:
        print(f"error: {exc.error}" + (f" ({exc.fix})" if exc.fix else ""), file=sys.stderr)
        return 1
    config = ServeConfig(
        model_dir=model_dir,
        name=args.name or manifest.name or model_dir.name,
        manifest=manifest,
        host=args.host,
        port=args.port,
        workers=args.workers or manifest.workers or 1,
        max_body=args.max_body,
        keepalive_timeout=args.keepalive_timeout,
        graceful_timeout=args.graceful_timeout,
        backlog=args.backlog,
        access_log=args.access_log,
        max_batch=args.max_batch,
    )
    return serve(config)


def _check(args: argparse.Namespace) -> int:
    from shipyard_runtime.check import check

    # The verdict must be the only line on stdout, whatever the model prints (Python or C
    # code alike): point fd 1 at stderr while the model's code runs.
    sys.stdout.flush()
    verdict_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        verdict = check(args.model_dir, args.example_json)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    line = json.dumps(verdict, separators=(",", ":"), allow_nan=False) + "\n"
    os.write(verdict_fd, line.encode())
    # Threads the model may have started (thread pools, telemetry) must not keep the
    # check from exiting: the build service waits for this process.
    os._exit(0 if verdict["ok"] else 1)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m shipyard_runtime`` and the ``shipyard-runtime`` script."""
    args = build_parser().parse_args(argv)
    logs.configure()
    if args.command == "serve":
        return _serve(args)
    return _check(args)


if __name__ == "__main__":
    sys.exit(main())
