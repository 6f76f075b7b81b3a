"""Deployment client keys: create, list, revoke, and the gateway's verify.

Transport-neutral like the identity handlers: each takes the caller's Principal (and,
where the scheduler must be asked, the caller's own bearer token, forwarded so that the
scheduler checks the person acting). Who may do what:

- create: members of the group that owns the deployment (the scheduler's answer), and
  admins; everyone else gets the scheduler's NOT_FOUND, so other groups' deployments are
  not revealed;
- list, revoke: members of the group recorded with the deployment's newest key, and
  admins; NOT_FOUND for everyone else, worded like "no such key";
- verify: the internal token (the gateway) or an admin.

Creating and revoking wait until the ``client_keys`` projection shows the change, so a
key works, and a revocation holds, the moment the command returns.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from shipyard_core import validation
from shipyard_core.aggregate import Repository, retry_on_conflict
from shipyard_core.auth import Principal
from shipyard_core.errors import NotFound, Unauthenticated, Unavailable
from shipyard_core.eventstore import EventStore, StoredEvent
from shipyard_keys.adapters import DeploymentDirectory, deployment_not_found
from shipyard_keys.app.usage import USAGE_TABLE, KeyUsage
from shipyard_keys.app.views import ClientKeyView, CreatedClientKey, VerifiedClientKey
from shipyard_keys.app.visibility import ReadYourWrites
from shipyard_keys.domain import (
    REGISTRY,
    ClientKeys,
    ClientKeyState,
    NewClientKey,
    no_key_message,
    tokens,
)
from shipyard_keys.projections import ClientKeysProjection, DeploymentOwnersProjection

UNKNOWN_CLIENT_KEY = "unknown client key"
"""What the gateway is told for a secret that is no client key at all."""

MALFORMED_CLIENT_KEY = (
    f"malformed client key: Shipyard client keys start with {tokens.CLIENT_KEY_PREFIX!r} "
    f"and are at most {tokens.MAX_TOKEN_LENGTH} characters long"
)
"""What the gateway is told for a "key" that cannot be one (checked before any lookup)."""

_CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)

_K = ClientKeysProjection.live_tables()
_O = DeploymentOwnersProjection.live_tables()

_KEYS_SQL = f"""
SELECT k.deployment, k.group_name, k.client, k.key_id, k.created_by, k.created_at,
       k.created_version, k.revoked_at, k.revoked_by, u.last_used_at
FROM {_K["client_keys"]} k
LEFT JOIN {USAGE_TABLE} u ON u.deployment = k.deployment AND u.key_id = k.key_id
WHERE k.deployment = $1 AND ($2::text IS NULL OR k.key_id = $2)
ORDER BY k.created_version
"""

# One indexed read: the key by the hash of its secret, with its deployment's owner now.
_VERIFY_SQL = f"""
SELECT k.key_hash, k.deployment, k.group_name, k.client, k.key_id, k.revoked_at,
       o.group_name AS owner, o.deleted
FROM {_K["client_keys"]} k
LEFT JOIN {_O["deployment_owners"]} o ON o.name = k.deployment
WHERE k.key_hash = $1
"""


def check_deployment(deployment: str) -> str:
    """A deployment name as the scheduler accepts it, or InvalidArgument on ``deployment``."""
    return validation.deployment_name("deployment", deployment)


def _utc(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _view(row: asyncpg.Record) -> ClientKeyView:
    return ClientKeyView(
        deployment=row["deployment"],
        group=row["group_name"],
        client=row["client"],
        key_id=row["key_id"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked=row["revoked_at"] is not None,
        revoked_at=row["revoked_at"],
        revoked_by=row["revoked_by"] or "",
    )


class ClientKeyQueries:
    """Reads of the ``client_keys`` projection: listing keys, and verifying one."""

    def __init__(
        self, pool: asyncpg.Pool, deployments: DeploymentDirectory, usage: KeyUsage
    ) -> None:
        self.pool = pool
        self.deployments = deployments
        self.usage = usage

    async def list_keys(
        self, caller: Principal, token: str, deployment: str, *, include_revoked: bool = False
    ) -> list[ClientKeyView]:
        """The keys of ``deployment``'s current owner group, oldest first (revoked ones
        only with ``include_revoked``), with when each was last used."""
        check_deployment(deployment)
        rows = await self.pool.fetch(_KEYS_SQL, deployment, None)
        owner = rows[-1]["group_name"] if rows else ""
        if not rows or not caller.can_see(owner):
            # Nothing the caller may see here. Whether that is "your deployment has no
            # keys yet" or "not your deployment" only the scheduler can say, with the
            # caller's own token: NotFound for other groups' deployments, as everywhere.
            group = await self.deployments.deployment_group(token, deployment)
            if not caller.can_see(group):
                raise deployment_not_found(deployment)
            # Keys left by an earlier owner of the name are not the caller's.
            return []
        return [
            _view(r)
            for r in rows
            if r["group_name"] == owner and (include_revoked or r["revoked_at"] is None)
        ]

    async def get_key(self, deployment: str, key_id: str) -> ClientKeyView | None:
        """One key (no permission check: for command handlers building answers)."""
        row = await self.pool.fetchrow(_KEYS_SQL, deployment, key_id)
        return _view(row) if row else None

    async def verify(
        self, caller: Principal, deployment: str, secret: str, client: str = ""
    ) -> VerifiedClientKey:
        """Whose key ``secret`` is, if it opens ``deployment`` (and belongs to ``client``
        when one is given, as HTTP Basic does). Internal only. Refusals are Unauthenticated
        with the precise reason, never naming another deployment."""
        caller.require_internal("verify client keys")
        check_deployment(deployment)
        if not secret:
            raise Unauthenticated("empty client key: pass the key to check")
        if not tokens.looks_like_client_key(secret):
            raise Unauthenticated(MALFORMED_CLIENT_KEY)
        try:
            row = await self.pool.fetchrow(_VERIFY_SQL, tokens.hash_token(secret))
        except _CONNECTION_ERRORS as exc:
            # The gateway must retry (or fail closed with 503), not read "bad key".
            raise Unavailable(
                "the client key store (PostgreSQL) cannot be reached; retry in a moment"
            ) from exc
        # The lookup found the row by hash already; compare_digest is the explicit,
        # constant-time statement that the stored hash is the one of this secret.
        if row is None or not tokens.hashes_match(row["key_hash"], secret):
            raise Unauthenticated(UNKNOWN_CLIENT_KEY)
        if row["deployment"] != deployment:
            # Never which deployment it does open: that name may be another group's.
            raise Unauthenticated(f"this client key is not a key of deployment {deployment!r}")
        key_id = row["key_id"]
        if row["revoked_at"] is not None:
            raise Unauthenticated(
                f"client key {key_id} (client {row['client']!r}) of deployment "
                f"{deployment!r} was revoked at {_utc(row['revoked_at'])}"
            )
        if row["deleted"]:
            raise Unauthenticated(
                f"deployment {deployment!r} was deleted; its client keys no longer work"
            )
        if row["owner"] is not None and row["owner"] != row["group_name"]:
            # The name was deleted and created again by another group: this key was
            # made for the earlier deployment and must not open the new owner's.
            raise Unauthenticated(
                f"client key {key_id} was made for an earlier deployment named "
                f"{deployment!r}, since deleted; create a new key"
            )
        if client and client != row["client"]:
            raise Unauthenticated(
                f"client name {client!r} does not match the key's client (with HTTP Basic "
                "the user name must be the client name the key was created for)"
            )
        await self.usage.touch(deployment, key_id)
        return VerifiedClientKey(client=row["client"], key_id=key_id)


class ClientKeyCommands:
    """CreateClientKey and RevokeClientKey: load, decide, save, wait until visible."""

    def __init__(
        self,
        store: EventStore,
        queries: ClientKeyQueries,
        deployments: DeploymentDirectory,
        visibility: ReadYourWrites,
    ) -> None:
        self.store = store
        self.queries = queries
        self.deployments = deployments
        self.visibility = visibility
        self._keys = Repository(store, ClientKeys, REGISTRY)

    async def create(
        self, caller: Principal, token: str, deployment: str, client: str
    ) -> CreatedClientKey:
        """Creates a key for ``client`` on ``deployment`` and returns its secret (this
        once). The key works when this returns."""
        check_deployment(deployment)
        validation.name("client", client)
        group = await self.deployments.deployment_group(token, deployment)
        # The scheduler applied its own rule with the caller's token already; checked
        # again here so that the rule holds whatever DeploymentDirectory answered.
        if not caller.can_see(group):
            raise deployment_not_found(deployment)

        async def attempt() -> tuple[list[StoredEvent], NewClientKey]:
            keys = await self._keys.load(deployment)
            new = keys.create(group=group, client=client, created_by=caller.user)
            return await self._keys.save(keys, actor=caller.user), new

        stored, new = await retry_on_conflict(attempt)
        # No must_hold: failing now would lose a secret that is shown only once.
        await self.visibility.settle(stored)
        view = ClientKeyView(
            deployment=deployment,
            group=group,
            client=client,
            key_id=new.key_id,
            created_by=caller.user,
            created_at=stored[-1].recorded_at,
        )
        return CreatedClientKey(key=view, secret=new.secret)

    async def revoke(self, caller: Principal, deployment: str, client: str) -> ClientKeyView:
        """Revokes ``client``'s active key on ``deployment``; repeating it is harmless.
        When this returns the key is refused here; the gateway may accept it for up to
        its cache time (a second)."""
        check_deployment(deployment)
        validation.name("client", client)

        async def attempt() -> tuple[list[StoredEvent], ClientKeys, ClientKeyState]:
            keys = await self._keys.load(deployment)
            if not keys.exists or not caller.can_see(keys.group):
                # Worded like "no such client": other groups' client names stay unknown.
                raise NotFound(no_key_message(deployment, client))
            state, changed = keys.revoke(client, revoked_by=caller.user)
            stored = await self._keys.save(keys, actor=caller.user) if changed else []
            return stored, keys, state

        stored, keys, state = await retry_on_conflict(attempt)
        await self.visibility.settle(
            stored,
            () if stored else (keys,),
            must_hold=f"the revocation of client key {state.key_id}",
        )
        view = await self.queries.get_key(deployment, state.key_id)
        if view is None:  # not reachable after a settled wait; answer from the aggregate
            view = ClientKeyView(
                deployment=deployment,
                group=state.group,
                client=state.client,
                key_id=state.key_id,
                created_by=state.created_by,
                revoked=True,
                revoked_by=state.revoked_by,
            )
        return view
