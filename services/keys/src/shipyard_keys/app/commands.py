"""Identity command handlers: load, decide, save atomically, wait until visible, answer.

Transport-neutral: each takes the caller's Principal (the gRPC servicer passes
``current_principal()``), checks permissions first, validates, then lets the aggregates
decide. Every load-decide-save runs under ``retry_on_conflict``, so a concurrent writer
makes the handler decide again on fresh state rather than fail.
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from shipyard_core import validation
from shipyard_core.aggregate import Repository, retry_on_conflict
from shipyard_core.auth import Principal
from shipyard_core.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from shipyard_core.eventstore import EventStore, StoredEvent
from shipyard_core.projections.consistency import projection_has_leader
from shipyard_keys.app.queries import IdentityQueries
from shipyard_keys.app.views import (
    BootstrapOutcome,
    CreatedUser,
    GroupView,
    IssuedToken,
    UserView,
)
from shipyard_keys.app.visibility import ReadYourWrites
from shipyard_keys.domain import (
    BOOTSTRAP_ID,
    REGISTRY,
    AdminBootstrap,
    Group,
    NewToken,
    User,
    tokens,
)
from shipyard_keys.projections import IdentityProjection

MAX_DESCRIPTION = 500
"""Longest description accepted for a token or a group (characters)."""

BOOTSTRAP_ACTOR = "bootstrap-admin"
"""Who created the first admin, as ``created_by`` and event metadata record it."""

FIRST_TOKEN_DESCRIPTION = "first token, issued with the user"  # noqa: S105 - a label
BOOTSTRAP_TOKEN_DESCRIPTION = "bootstrap admin token"  # noqa: S105 - a label


class IdentityCommands:
    """The identity service's commands (CreateUser, IssueToken, ... and bootstrap)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        store: EventStore,
        queries: IdentityQueries,
        *,
        projection_wait_seconds: float = 5.0,
    ) -> None:
        self.pool = pool
        self.store = store
        self.queries = queries
        self.visibility = ReadYourWrites(pool, store, projection_wait_seconds)
        self._users = Repository(store, User, REGISTRY)
        self._groups = Repository(store, Group, REGISTRY)
        self._bootstraps = Repository(store, AdminBootstrap, REGISTRY)

    # -- users and tokens --------------------------------------------------------------

    async def create_user(
        self, caller: Principal, name: str, *, admin: bool = False, groups: Iterable[str] = ()
    ) -> CreatedUser:
        """Creates a user with a first token and makes them a member of ``groups`` (each
        must exist), all in one atomic save. Admin only. The token works when this
        returns."""
        caller.require_admin("create users")
        validation.name("name", name)
        wanted = _names("groups", groups)

        async def attempt() -> tuple[list[StoredEvent], NewToken]:
            user = await self._users.load(name)
            user.create(admin=admin, created_by=caller.user)
            new = user.issue_token(description=FIRST_TOKEN_DESCRIPTION, issued_by=caller.user)
            joined = []
            for group_name in wanted:
                group = await self._groups.load(group_name)
                group.add_member(name, added_by=caller.user)
                joined.append(group)
            return await self._users.save(user, *joined, actor=caller.user), new

        stored, new = await retry_on_conflict(attempt)
        await self.visibility.settle(stored)
        view = UserView(
            name=name,
            admin=admin,
            groups=tuple(sorted(wanted)),
            created_at=stored[0].recorded_at,
            created_by=caller.user,
        )
        return CreatedUser(user=view, token=IssuedToken(token_id=new.token_id, token=new.token))

    async def issue_token(
        self, caller: Principal, user: str, *, description: str = ""
    ) -> IssuedToken:
        """Issues another token for ``user``. Admins, or users for themselves. The token
        works when this returns."""
        _require_self_or_admin(caller, user, "issue tokens")
        validation.name("user", user)
        description = _description(description)

        async def attempt() -> tuple[list[StoredEvent], NewToken]:
            account = await self._users.load(user)
            new = account.issue_token(description=description, issued_by=caller.user)
            return await self._users.save(account, actor=caller.user), new

        stored, new = await retry_on_conflict(attempt)
        await self.visibility.settle(stored)
        return IssuedToken(token_id=new.token_id, token=new.token)

    async def revoke_token(self, caller: Principal, user: str, token_id: str) -> None:
        """Revokes one of ``user``'s tokens. Admins, or users for their own tokens.
        Repeating it is harmless. When this returns, the token is refused here; other
        services may accept it for up to their ``auth_cache_seconds``."""
        _require_self_or_admin(caller, user, "revoke tokens")
        validation.name("user", user)
        if not token_id:
            raise InvalidArgument("token_id", "is required", "give an id like 'tok_1a2b3c4d'")
        if not tokens.is_token_id(token_id):
            raise InvalidArgument(
                "token_id",
                f"{token_id!r} is not a token id",
                "use the id shown when the token was issued, like 'tok_1a2b3c4d', "
                "not the token itself",
            )

        async def attempt() -> tuple[list[StoredEvent], User]:
            account = await self._users.load(user)
            changed = account.revoke_token(token_id, revoked_by=caller.user)
            stored = await self._users.save(account, actor=caller.user) if changed else []
            return stored, account

        stored, account = await retry_on_conflict(attempt)
        await self.visibility.settle(
            stored, () if stored else (account,), must_hold=f"the revocation of {token_id}"
        )

    # -- groups ------------------------------------------------------------------------

    async def create_group(
        self, caller: Principal, name: str, *, description: str = ""
    ) -> GroupView:
        """Creates a group. Admin only."""
        caller.require_admin("create groups")
        validation.name("name", name)
        description = _description(description)

        async def attempt() -> list[StoredEvent]:
            group = await self._groups.load(name)
            group.create(description=description, created_by=caller.user)
            return await self._groups.save(group, actor=caller.user)

        stored = await retry_on_conflict(attempt)
        await self.visibility.settle(stored)
        return GroupView(name=name, description=description, created_at=stored[0].recorded_at)

    async def add_member(self, caller: Principal, group: str, user: str) -> GroupView:
        """Adds an existing user to an existing group (nothing changes if they are in it
        already). Admin only. The new membership is in the user's principal when this
        returns."""
        caller.require_admin("add group members")
        validation.name("group", group)
        validation.name("user", user)
        return await self._change_membership(caller, group, user, add=True)

    async def remove_member(self, caller: Principal, group: str, user: str) -> GroupView:
        """Removes a user from a group (nothing changes if they are not in it). Admin
        only. When this returns the user's principal no longer has the group here."""
        caller.require_admin("remove group members")
        validation.name("group", group)
        validation.name("user", user)
        return await self._change_membership(caller, group, user, add=False)

    async def _change_membership(
        self, caller: Principal, group: str, user: str, *, add: bool
    ) -> GroupView:
        async def attempt() -> tuple[list[StoredEvent], Group]:
            team = await self._groups.load(group)
            team.require_exists()
            # Users are never deleted, so existing now means existing at commit: the user
            # stream need not take part in the save.
            (await self._users.load(user)).require_exists()
            if add:
                changed = team.add_member(user, added_by=caller.user)
            else:
                changed = team.remove_member(user, removed_by=caller.user)
            stored = await self._groups.save(team, actor=caller.user) if changed else []
            return stored, team

        stored, team = await retry_on_conflict(attempt)
        await self.visibility.settle(
            stored,
            () if stored else (team,),
            # Losing a group must hold when the answer says so (it may lose access);
            # gaining one may show up a moment late without harm.
            must_hold="" if add else f"the removal of {user!r} from {group!r}",
        )
        view = await self.queries.get_group(group)
        if view is None:  # the projection lags (logged by settle); answer from the aggregate
            view = GroupView(
                name=group, description=team.description, members=tuple(sorted(team.members))
            )
        return view

    # -- bootstrap ---------------------------------------------------------------------

    async def bootstrap_admin(self, name: str) -> BootstrapOutcome:
        """Creates the first admin and their token, once ever; later (or racing) calls
        report the admin that exists. Needs no caller and no running server: it writes the
        event store directly. When a server is projecting, it waits until the token
        works; otherwise the token works as soon as a server has caught up."""
        validation.name("name", name)

        async def attempt() -> tuple[BootstrapOutcome, list[StoredEvent]]:
            marker = await self._bootstraps.load(BOOTSTRAP_ID)
            if marker.exists:
                return BootstrapOutcome(created=False, user=marker.user or ""), []
            admin = await self._users.load(name)
            if admin.exists:
                raise FailedPrecondition(
                    f"user {name!r} exists already but was not bootstrapped as an admin; "
                    "bootstrap with another --name"
                )
            admin.create(admin=True, created_by=BOOTSTRAP_ACTOR)
            new = admin.issue_token(
                description=BOOTSTRAP_TOKEN_DESCRIPTION, issued_by=BOOTSTRAP_ACTOR
            )
            marker.record(name)
            # One atomic append, the marker at expected version 0: of racing bootstraps
            # exactly one commits, the others retry and find the marker.
            stored = await self._users.save(marker, admin, actor=BOOTSTRAP_ACTOR)
            token = IssuedToken(token_id=new.token_id, token=new.token)
            return BootstrapOutcome(created=True, user=name, token=token), stored

        outcome, stored = await retry_on_conflict(attempt)
        if stored:
            async with self.pool.acquire() as conn:
                running = await projection_has_leader(conn, IdentityProjection)
            if running:
                await self.visibility.settle(stored)
        return outcome


def _require_self_or_admin(caller: Principal, user: str, action: str) -> None:
    if caller.admin or caller.user == user:
        return
    raise PermissionDenied(
        f"user {caller.user!r} may {action} only for themselves, not for {user!r}; ask an admin"
    )


def _names(field: str, values: Iterable[str]) -> list[str]:
    """Validated names, duplicates dropped, order kept."""
    seen: dict[str, None] = {}
    for value in values:
        seen[validation.name(field, value)] = None
    return list(seen)


def _description(value: str) -> str:
    if len(value) > MAX_DESCRIPTION:
        raise InvalidArgument(
            "description",
            f"is {len(value)} characters long",
            f"keep it to {MAX_DESCRIPTION} characters",
        )
    return value
