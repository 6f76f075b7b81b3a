"""Logging: JSON lines on stderr for collectors, plain text for people.

Every record carries the service name and, inside a traced unit of work, the OpenTelemetry
``trace_id``/``span_id``, so a log line leads to its trace and back. Fields passed with
``extra={...}`` become top-level JSON keys::

    log.info("deployment scaled", extra={"deployment": "iris-prod", "replicas": 3})
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from shipyard_core.settings import CommonSettings
from shipyard_core.telemetry import current_trace_ids

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RESERVED = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName", "service"}
)

# Libraries that are chatty at INFO and say nothing an operator needs.
_QUIET = {"asyncio": logging.WARNING, "grpc._cython.cygrpc": logging.WARNING}


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
    }


def _utc_iso(created: float) -> str:
    return (
        datetime.fromtimestamp(created, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO-8601), level, logger, message, service,
    trace_id/span_id when a span is current, the ``extra`` fields, and ``exception`` (the
    formatted traceback) when there is one."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """Renders ``record`` as one line of JSON."""
        entry: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
        }
        ids = current_trace_ids()
        if ids is not None:
            entry["trace_id"], entry["span_id"] = ids
        for key, value in _extra_fields(record).items():
            # `extra` may not shadow the fixed fields a collector indexes on.
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd `extra` value (a Path, a UUID) must not lose the log line.
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2025-01-01T12:00:00.000Z INFO quota.app message key=value [trace=…]``, for a
    terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """Renders ``record`` as a human-readable line (plus traceback lines)."""
        parts = [
            _utc_iso(record.created),
            f"{record.levelname:<7}",
            record.name,
            record.getMessage(),
        ]
        parts.extend(f"{k}={v}" for k, v in _extra_fields(record).items())
        ids = current_trace_ids()
        if ids is not None:
            parts.append(f"[trace={ids[0]}]")
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


class _ShipyardHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so reconfiguring replaces it."""


def configure_logging(settings: CommonSettings, stream: TextIO | None = None) -> None:
    """Sends every log record (root logger) to ``stream`` (default stderr) as JSON lines,
    or as plain text when ``settings.log_json`` is false, at ``settings.log_level``.

    Calling it again replaces the handler it installed before; handlers installed by
    others (pytest's capture, for instance) are left alone.
    """
    handler = _ShipyardHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(
        JsonFormatter(settings.service_name) if settings.log_json else TextFormatter()
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ShipyardHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    if settings.log_level != "DEBUG":
        # At DEBUG whoever reads wants everything, the chatty libraries included.
        for name, level in _QUIET.items():
            logging.getLogger(name).setLevel(level)
    # Warnings (deprecations in dependencies) go through logging instead of raw stderr.
    logging.captureWarnings(True)
