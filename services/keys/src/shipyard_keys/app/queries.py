"""Reads of the ``identity`` projection: lists, WhoAmI, and the token check itself."""

from __future__ import annotations

import asyncpg

from shipyard_core.auth import Principal
from shipyard_core.errors import Unauthenticated, Unavailable
from shipyard_keys.app.views import GroupView, UserView
from shipyard_keys.domain import tokens
from shipyard_keys.projections import IdentityProjection

UNKNOWN_TOKEN = "unknown or revoked token"  # noqa: S105 - a message
"""What a caller with a bad token is told: nothing about which of the two it is."""

MALFORMED_TOKEN = (
    f"malformed token: Shipyard API tokens start with {tokens.TOKEN_PREFIX!r} "
    f"and are at most {tokens.MAX_TOKEN_LENGTH} characters long"
)
"""What a caller is told whose "token" cannot be one (a common copy-paste mistake)."""

_CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)

_T = IdentityProjection.live_tables()

_PRINCIPAL_SQL = f"""
SELECT t.token_hash, t.token_id, t.revoked_at IS NOT NULL AS revoked, u.name, u.admin,
       ARRAY(SELECT m.group_name FROM {_T["memberships"]} m
             WHERE m.user_name = u.name ORDER BY m.group_name) AS groups
FROM {_T["tokens"]} t JOIN {_T["users"]} u ON u.name = t.user_name
WHERE t.token_hash = $1
"""

_USERS_SQL = f"""
SELECT u.name, u.admin, u.created_at, u.created_by,
       ARRAY(SELECT m.group_name FROM {_T["memberships"]} m
             WHERE m.user_name = u.name ORDER BY m.group_name) AS groups
FROM {_T["users"]} u
WHERE $1::text IS NULL OR u.name = $1
ORDER BY u.name
"""

_GROUPS_SQL = f"""
SELECT g.name, g.description, g.created_at,
       ARRAY(SELECT m.user_name FROM {_T["memberships"]} m
             WHERE m.group_name = g.name ORDER BY m.user_name) AS members
FROM {_T["groups"]} g
WHERE ($1::text IS NULL OR g.name = $1)
  AND ($2::text IS NULL OR EXISTS (
        SELECT 1 FROM {_T["memberships"]} m WHERE m.group_name = g.name AND m.user_name = $2))
ORDER BY g.name
"""


class IdentityQueries:
    """Queries on the ``identity`` projection. Callers' permissions are checked here, so
    the transport only passes the Principal along.

    It is also the keys service's own :class:`~shipyard_core.auth.Authenticator`: the
    service checks its callers' tokens against its projection directly rather than
    calling itself over gRPC, and without a cache, so a revocation holds at once here."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def authenticate(self, token: str) -> Principal:
        """The principal whose token this is. Raises Unauthenticated for an unknown,
        revoked or malformed token."""
        if not token:
            raise Unauthenticated("empty token: pass the API token to check")
        if not tokens.looks_like_token(token):
            raise Unauthenticated(MALFORMED_TOKEN)
        try:
            row = await self.pool.fetchrow(_PRINCIPAL_SQL, tokens.hash_token(token))
        except _CONNECTION_ERRORS as exc:
            # Every service's interceptor asks this; UNAVAILABLE tells them to retry,
            # where INTERNAL would read as "this token is broken".
            raise Unavailable(
                "the identity store (PostgreSQL) cannot be reached; retry in a moment"
            ) from exc
        # The lookup found the row by hash already; compare_digest is the explicit,
        # constant-time statement that the stored hash is the one of this token.
        if row is None or row["revoked"] or not tokens.hashes_match(row["token_hash"], token):
            raise Unauthenticated(UNKNOWN_TOKEN)
        return Principal(
            user=row["name"],
            admin=row["admin"],
            groups=frozenset(row["groups"]),
            token_id=row["token_id"],
        )

    async def list_users(self, caller: Principal) -> list[UserView]:
        """Every user, by name. Admin only."""
        caller.require_admin("list users")
        return [_user(r) for r in await self.pool.fetch(_USERS_SQL, None)]

    async def list_groups(self, caller: Principal) -> list[GroupView]:
        """Groups by name: all of them for admins, the caller's own for everyone else."""
        member = None if caller.admin else caller.user
        return [_group(r) for r in await self.pool.fetch(_GROUPS_SQL, None, member)]

    async def whoami(self, caller: Principal) -> Principal:
        """The caller, as their token resolved (user, admin, groups, token id)."""
        return caller

    async def get_user(self, name: str) -> UserView | None:
        """One user (no permission check: for command handlers building answers)."""
        row = await self.pool.fetchrow(_USERS_SQL, name)
        return _user(row) if row else None

    async def get_group(self, name: str) -> GroupView | None:
        """One group (no permission check: for command handlers building answers)."""
        row = await self.pool.fetchrow(_GROUPS_SQL, name, None)
        return _group(row) if row else None


def _user(row: asyncpg.Record) -> UserView:
    return UserView(
        name=row["name"],
        admin=row["admin"],
        groups=tuple(row["groups"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
    )


def _group(row: asyncpg.Record) -> GroupView:
    return GroupView(
        name=row["name"],
        description=row["description"],
        members=tuple(row["members"]),
        created_at=row["created_at"],
    )
