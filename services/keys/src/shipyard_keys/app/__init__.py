"""Command and query handlers of the keys service (identity and client keys):
transport-neutral, given the caller's Principal."""

from shipyard_keys.app.client_keys import (
    MALFORMED_CLIENT_KEY,
    UNKNOWN_CLIENT_KEY,
    ClientKeyCommands,
    ClientKeyQueries,
    check_deployment,
)
from shipyard_keys.app.commands import IdentityCommands
from shipyard_keys.app.queries import MALFORMED_TOKEN, UNKNOWN_TOKEN, IdentityQueries
from shipyard_keys.app.usage import USAGE_INTERVAL_SECONDS, KeyUsage, ensure_usage_table
from shipyard_keys.app.views import (
    BootstrapOutcome,
    ClientKeyView,
    CreatedClientKey,
    CreatedUser,
    GroupView,
    IssuedToken,
    UserView,
    VerifiedClientKey,
)
from shipyard_keys.app.visibility import ReadYourWrites

__all__ = [
    "MALFORMED_CLIENT_KEY",
    "MALFORMED_TOKEN",
    "UNKNOWN_CLIENT_KEY",
    "UNKNOWN_TOKEN",
    "USAGE_INTERVAL_SECONDS",
    "BootstrapOutcome",
    "ClientKeyCommands",
    "ClientKeyQueries",
    "ClientKeyView",
    "CreatedClientKey",
    "CreatedUser",
    "GroupView",
    "IdentityCommands",
    "IdentityQueries",
    "IssuedToken",
    "KeyUsage",
    "ReadYourWrites",
    "UserView",
    "VerifiedClientKey",
    "check_deployment",
    "ensure_usage_table",
]
