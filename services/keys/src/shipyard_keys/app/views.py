"""What the keys service's handlers return: plain, transport-neutral values."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class UserView:
    """A user as callers see it."""

    name: str
    admin: bool
    groups: tuple[str, ...] = ()
    created_at: datetime | None = None
    created_by: str = ""


@dataclass(frozen=True)
class GroupView:
    """A group as callers see it."""

    name: str
    description: str = ""
    members: tuple[str, ...] = ()
    created_at: datetime | None = None


@dataclass(frozen=True)
class IssuedToken:
    """A new API token. ``token`` is the secret, returned this once (kept out of repr so
    it cannot reach a log by accident)."""

    token_id: str
    token: str = field(repr=False)


@dataclass(frozen=True)
class CreatedUser:
    """A new user and their first API token."""

    user: UserView
    token: IssuedToken


@dataclass(frozen=True)
class BootstrapOutcome:
    """What ``bootstrap-admin`` did: created the admin (with a token), or found one."""

    created: bool
    user: str
    token: IssuedToken | None = None

    def to_json(self) -> dict[str, Any]:
        """The one JSON line ``bootstrap-admin`` prints."""
        if self.token is None:
            return {"created": self.created, "user": self.user}
        return {
            "user": self.user,
            "token": self.token.token,
            "token_id": self.token.token_id,
            "created": self.created,
        }


@dataclass(frozen=True)
class ClientKeyView:
    """A deployment's client key as callers see it (never its secret)."""

    deployment: str
    group: str
    client: str
    key_id: str
    created_by: str = ""
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked: bool = False
    revoked_at: datetime | None = None
    revoked_by: str = ""


@dataclass(frozen=True)
class CreatedClientKey:
    """A new client key. ``secret`` is returned this once (kept out of repr so it cannot
    reach a log by accident)."""

    key: ClientKeyView
    secret: str = field(repr=False)


@dataclass(frozen=True)
class VerifiedClientKey:
    """Whose a verified client key is: the client name (the model sees it in
    ``X-Forwarded-User``) and the key's public id."""

    client: str
    key_id: str
