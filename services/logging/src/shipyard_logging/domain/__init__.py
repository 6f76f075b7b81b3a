"""What a log query may ask, checked once, with messages that name the field and the fix."""

from shipyard_logging.domain.query import (
    DEFAULT_TAIL,
    MAX_TAIL,
    LogQuery,
    RevisionRange,
    check_limit,
    log_query,
    visible_ranges,
)

__all__ = [
    "DEFAULT_TAIL",
    "MAX_TAIL",
    "LogQuery",
    "RevisionRange",
    "check_limit",
    "log_query",
    "visible_ranges",
]
