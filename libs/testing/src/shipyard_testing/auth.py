"""A fixed token table standing in for the identity service in one service's own tests
(the end-to-end tests in tests/ run the real keys service)."""

from __future__ import annotations

from collections.abc import Mapping

from shipyard_core.auth import Principal
from shipyard_core.errors import Unauthenticated


class StaticAuthenticator:
    """Resolves tokens from a fixed table; any other token is refused as keys would."""

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        self.tokens = dict(tokens)

    async def authenticate(self, token: str) -> Principal:
        """The principal of ``token``, or Unauthenticated."""
        try:
            return self.tokens[token]
        except KeyError:
            raise Unauthenticated("unknown or revoked token") from None
