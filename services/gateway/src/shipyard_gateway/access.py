"""Who may call a deployment: credentials from request headers, and the access check.

Public deployments need nothing. Private ones need a caller: today a user token
(``Authorization: Bearer <token>``) resolved by the identity service (cached, see
:func:`shipyard_core.auth.authenticator_from_settings`), whose user must see the
deployment's group (admins and members).

This module is the seam for deployment client keys: :func:`credentials_from_headers` is
where HTTP Basic ``client:token`` and ``X-API-Key`` will be read, and
:meth:`AccessControl.caller` where a client key will be verified against the deployment
(through the keys service) before falling back to user tokens. The handler and the
transports do not change when those arrive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shipyard_core.auth import Authenticator, Principal
from shipyard_core.errors import PermissionDenied, Unauthenticated
from shipyard_gateway.routing import Access, Route

__all__ = ["AccessControl", "Credentials", "credentials_from_headers"]


@dataclass(frozen=True)
class Credentials:
    """What a request presented to prove who it is."""

    scheme: str
    """How it came: ``bearer`` today (``basic`` and ``api-key`` with client keys)."""
    secret: str
    """The token itself. Never logged."""

    def __repr__(self) -> str:
        # A Credentials object may end up in a log line or a traceback; the secret must not.
        return f"Credentials(scheme={self.scheme!r}, secret=<redacted>)"


def credentials_from_headers(headers: Mapping[str, str]) -> Credentials | None:
    """The credentials in lower-cased request ``headers``; None when there are none.
    Raises Unauthenticated for an ``Authorization`` header it cannot read."""
    value = headers.get("authorization", "").strip()
    if not value:
        return None
    scheme, _, secret = value.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer":
        raise Unauthenticated(
            f"unsupported authorization scheme {scheme!r}: send `Authorization: Bearer <token>`"
        )
    if not secret:
        raise Unauthenticated("empty bearer token: send `Authorization: Bearer <token>`")
    return Credentials("bearer", secret)


class AccessControl:
    """Decides whether a request may call a route, and as whom."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def caller(
        self, route: Route, headers: Mapping[str, str], principal: Principal | None = None
    ) -> Principal | None:
        """The caller of a request to ``route`` (None: anonymous, allowed on public
        deployments). ``principal`` is a caller the transport authenticated already;
        otherwise credentials are read from the lower-cased ``headers``, and only for
        private deployments (a public one never costs a call to the identity service).

        Raises Unauthenticated (no or invalid credentials) or PermissionDenied (valid, but
        not for this deployment's group).
        """
        if route.access is Access.PUBLIC:
            return principal
        if principal is None:
            credentials = credentials_from_headers(headers)
            if credentials is None:
                raise Unauthenticated(
                    f"deployment {route.deployment!r} is private: send `Authorization: Bearer "
                    "<token>` with the token of a member of its group"
                )
            principal = await self.authenticator.authenticate(credentials.secret)
        if not principal.can_see(route.group):
            raise PermissionDenied(
                # Which group owns it is not the caller's business.
                f"user {principal.user!r} may not call deployment {route.deployment!r}: "
                "only members of its group may; ask its owners for access"
            )
        return principal
