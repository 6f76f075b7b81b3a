"""Who may call a deployment: credentials from request headers, and the access check.

Public deployments need nothing. Private ones accept, in any of three places:

- ``Authorization: Bearer <secret>``;
- ``Authorization: Basic base64(client:secret)`` (``curl -u client:secret``);
- ``X-API-Key: <secret>`` (used when there is no ``Authorization`` header).

The secret is either a deployment **client key** (``sk_...``), verified for this
deployment by the keys service (:class:`~shipyard_gateway.keys.ClientKeyVerifier`, with a
cache of at most a second so revocation takes effect within one), or a member's **user
token** (``sy_...``), resolved by the identity service
(:func:`shipyard_core.auth.authenticator_from_settings`, cached) and accepted when its
user may see the deployment's group (members and admins). The caller's name travels to the
model in ``X-Forwarded-User``: the client's name for a key, the user's for a token. With
Basic, the user name must be the key's client name (the keys service checks it); it is
ignored for user tokens.

The same code serves REST headers and gRPC metadata (``authorization``, ``x-api-key``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass

from shipyard_core.auth import Authenticator, Principal
from shipyard_core.errors import PermissionDenied, Unauthenticated
from shipyard_gateway.keys import CLIENT_KEY_PREFIX, KeyVerifier
from shipyard_gateway.routing import Access, Route

__all__ = ["WWW_AUTHENTICATE", "AccessControl", "Credentials", "credentials_from_headers"]

WWW_AUTHENTICATE = 'Bearer realm="shipyard", Basic realm="shipyard"'
"""The challenge sent with every 401: both header schemes work."""

_HOW = (
    "send a client key (`Authorization: Bearer sk_...`, `curl -u CLIENT:sk_...` or "
    "`X-API-Key: sk_...`) or the token of a member of its group (`Authorization: Bearer "
    "<token>`)"
)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presented to prove who it is."""

    scheme: str
    """How it came: ``bearer``, ``basic`` or ``api-key``."""
    secret: str
    """The client key or user token itself. Never logged."""
    client: str = ""
    """The user name of HTTP Basic (the client's name), else empty."""

    def __repr__(self) -> str:
        # A Credentials object may end up in a log line or a traceback; the secret must not.
        return f"Credentials(scheme={self.scheme!r}, client={self.client!r}, secret=<redacted>)"

    @property
    def is_client_key(self) -> bool:
        """Whether the secret is a deployment client key (else a user token)."""
        return self.secret.startswith(CLIENT_KEY_PREFIX)


def _basic(encoded: str) -> Credentials:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Unauthenticated(
            "malformed Basic credentials: send base64 of `client:secret` "
            "(curl -u client:secret does it)"
        ) from None
    client, colon, secret = decoded.partition(":")
    if not colon or not secret:
        raise Unauthenticated(
            "Basic credentials without a secret: send `client:secret` (curl -u client:secret)"
        )
    return Credentials("basic", secret, client)


def credentials_from_headers(headers: Mapping[str, str]) -> Credentials | None:
    """The credentials in request ``headers`` (case-insensitive, or lower-cased names);
    None when there are none. Raises Unauthenticated for a header it cannot read."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        kind = scheme.lower()
        if kind == "bearer":
            if not value:
                raise Unauthenticated("empty bearer token: send `Authorization: Bearer <secret>`")
            return Credentials("bearer", value)
        if kind == "basic":
            return _basic(value)
        raise Unauthenticated(
            f"unsupported authorization scheme {scheme[:20]!r}: send `Authorization: Bearer "
            "<secret>`, HTTP Basic `client:secret`, or `X-API-Key: <secret>`"
        )
    api_key = headers.get("x-api-key")
    if api_key is not None:
        api_key = api_key.strip()
        if not api_key:
            raise Unauthenticated("empty X-API-Key: send `X-API-Key: <secret>`")
        return Credentials("api-key", api_key)
    return None


class AccessControl:
    """Decides whether a request may call a route, and as whom."""

    def __init__(self, authenticator: Authenticator, keys: KeyVerifier | None = None) -> None:
        self.authenticator = authenticator
        self.keys = keys

    async def caller(
        self, route: Route, headers: Mapping[str, str], principal: Principal | None = None
    ) -> Principal | None:
        """The caller of a request to ``route`` (None: anonymous, allowed on public
        deployments). ``principal`` is a caller the transport authenticated already;
        otherwise credentials are read from ``headers`` (case-insensitive or lower-cased),
        and only for private deployments (a public one never costs a lookup).

        Raises Unauthenticated (no or invalid credentials), PermissionDenied (a valid user
        token, but not for this deployment's group) or Unavailable (the keys service
        cannot answer).
        """
        if route.access is Access.PUBLIC:
            return principal
        if principal is None:
            credentials = credentials_from_headers(headers)
            if credentials is None:
                raise Unauthenticated(f"deployment {route.deployment!r} is private: {_HOW}")
            if credentials.is_client_key:
                if self.keys is None:
                    raise Unauthenticated(
                        "this gateway does not accept client keys: send the token of a member "
                        "of the deployment's group"
                    )
                # A key opens exactly one deployment: the keys service checks which.
                return await self.keys.verify(
                    route.deployment, credentials.secret, credentials.client, group=route.group
                )
            principal = await self.authenticator.authenticate(credentials.secret)
        if not principal.can_see(route.group):
            raise PermissionDenied(
                # Which group owns it is not the caller's business.
                f"user {principal.user!r} may not call deployment {route.deployment!r}: "
                "only members of its group may, or holders of one of its client keys; ask "
                "its owners for access"
            )
        return principal
