"""The ``identity`` read model: users, tokens (by hash), groups and memberships.

Every query of the service reads it, including the token check itself, so it must be
current: commands that callers rely on at once wait for it (``wait_until_projected``).
The handler is pure (only the event; times are the envelope's ``recorded_at``), so a
replay rebuilds identical tables.
"""

from __future__ import annotations

from collections.abc import Iterable

from shipyard_core.eventstore import StoredEvent
from shipyard_core.projections import Projection, Statement
from shipyard_keys.domain.events import (
    REGISTRY,
    GroupCreated,
    MemberAdded,
    MemberRemoved,
    TokenIssued,
    TokenRevoked,
    UserCreated,
)

SCHEMA = "keys"
"""The service's schema: its event store and this projection's tables."""


class IdentityProjection(Projection):
    """Users, their tokens, groups and who is in which."""

    name = "identity"
    schema = SCHEMA
    sources = ((SCHEMA, "user"), (SCHEMA, "group"))
    tables = {
        "users": (
            "name text PRIMARY KEY, admin boolean NOT NULL, "
            "created_at timestamptz NOT NULL, created_by text NOT NULL"
        ),
        # Keyed by the SHA-256 of the secret: the token check is one index lookup.
        "tokens": (
            "token_hash text PRIMARY KEY, token_id text NOT NULL, user_name text NOT NULL, "
            "description text NOT NULL, issued_at timestamptz NOT NULL, "
            "issued_by text NOT NULL, revoked_at timestamptz, revoked_by text"
        ),
        "groups": (
            "name text PRIMARY KEY, description text NOT NULL, "
            "created_at timestamptz NOT NULL, created_by text NOT NULL"
        ),
        "memberships": (
            "group_name text NOT NULL, user_name text NOT NULL, "
            "added_at timestamptz NOT NULL, added_by text NOT NULL, "
            "PRIMARY KEY (group_name, user_name)"
        ),
    }
    indexes = (("tokens", "user_name, token_id"), ("memberships", "user_name"))

    def handle(self, event: StoredEvent) -> Iterable[Statement]:
        """The writes one identity event causes (plain INSERTs: the runner applies each
        event once, in stream order, so a conflict here would be a bug worth seeing)."""
        ev = REGISTRY.decode(event)
        at = event.recorded_at
        if isinstance(ev, UserCreated):
            yield Statement(
                "INSERT INTO {users} (name, admin, created_at, created_by) VALUES ($1, $2, $3, $4)",
                (ev.name, ev.admin, at, ev.created_by),
            )
        elif isinstance(ev, TokenIssued):
            yield Statement(
                "INSERT INTO {tokens} (token_hash, token_id, user_name, description, "
                "issued_at, issued_by) VALUES ($1, $2, $3, $4, $5, $6)",
                (ev.token_hash, ev.token_id, ev.user, ev.description, at, ev.issued_by),
            )
        elif isinstance(ev, TokenRevoked):
            yield Statement(
                "UPDATE {tokens} SET revoked_at = $3, revoked_by = $4 "
                "WHERE user_name = $1 AND token_id = $2",
                (ev.user, ev.token_id, at, ev.revoked_by),
            )
        elif isinstance(ev, GroupCreated):
            yield Statement(
                "INSERT INTO {groups} (name, description, created_at, created_by) "
                "VALUES ($1, $2, $3, $4)",
                (ev.name, ev.description, at, ev.created_by),
            )
        elif isinstance(ev, MemberAdded):
            yield Statement(
                "INSERT INTO {memberships} (group_name, user_name, added_at, added_by) "
                "VALUES ($1, $2, $3, $4)",
                (ev.group, ev.user, at, ev.added_by),
            )
        elif isinstance(ev, MemberRemoved):
            yield Statement(
                "DELETE FROM {memberships} WHERE group_name = $1 AND user_name = $2",
                (ev.group, ev.user),
            )
