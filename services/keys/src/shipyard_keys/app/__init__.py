"""Identity command and query handlers: transport-neutral, given the caller's Principal."""

from shipyard_keys.app.commands import IdentityCommands
from shipyard_keys.app.queries import MALFORMED_TOKEN, UNKNOWN_TOKEN, IdentityQueries
from shipyard_keys.app.views import (
    BootstrapOutcome,
    CreatedUser,
    GroupView,
    IssuedToken,
    UserView,
)

__all__ = [
    "MALFORMED_TOKEN",
    "UNKNOWN_TOKEN",
    "BootstrapOutcome",
    "CreatedUser",
    "GroupView",
    "IdentityCommands",
    "IdentityQueries",
    "IssuedToken",
    "UserView",
]
