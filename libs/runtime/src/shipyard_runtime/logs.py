"""Log lines for a collector: one record per line, every line tagged with the process."""

from __future__ import annotations

import logging
import sys


class _LineFormatter(logging.Formatter):
    """Prefixes *every* line (tracebacks too) with level and pid: the workers share
    stderr, and a collector reading line by line must still know whose line it is."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"{record.levelname} shipyard-runtime[{record.process}]: "
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def configure(level: int = logging.INFO) -> None:
    """Sends the runtime's logs to stderr, one line per line of text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter("%(message)s"))
    logger = logging.getLogger("shipyard_runtime")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    # The model's own logging configuration is its business: don't double-print ours.
    logger.propagate = False
