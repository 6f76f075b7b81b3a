"""The User aggregate: a caller of Shipyard and their API tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from shipyard_core.aggregate import Aggregate, DomainEvent
from shipyard_core.errors import AlreadyExists, NotFound
from shipyard_keys.domain import tokens
from shipyard_keys.domain.events import TokenIssued, TokenRevoked, UserCreated


@dataclass(frozen=True)
class NewToken:
    """A token just issued. ``token`` is the secret, handed to the caller once and never
    stored; it is kept out of ``repr`` so that it cannot reach a log by accident."""

    token_id: str
    token: str = field(repr=False)


@dataclass
class TokenState:
    """What the aggregate remembers of one of its tokens."""

    token_id: str
    revoked: bool = False


class User(Aggregate):
    """A user (id = name). Decides on creation, issuing and revoking tokens.

    Group membership lives on the Group aggregate: a membership change then touches one
    stream, and a user's groups are read from the ``identity`` projection."""

    aggregate_type = "user"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.admin = False
        self.created_by = ""
        self.tokens: dict[str, TokenState] = {}

    # -- decisions ---------------------------------------------------------------------

    def create(self, *, admin: bool, created_by: str) -> None:
        """Creates the user; refuses a name that is taken."""
        if self.exists:
            raise AlreadyExists(f"user {self.id!r} exists already; choose another name")
        self.emit(UserCreated(name=self.id, admin=admin, created_by=created_by))

    def issue_token(self, *, description: str, issued_by: str) -> NewToken:
        """Issues a new token and returns its secret (the event holds only its hash)."""
        self.require_exists()
        token_id = tokens.new_token_id()
        while token_id in self.tokens:  # 32-bit ids: a clash is rare but cheap to avoid
            token_id = tokens.new_token_id()
        secret = tokens.new_token()
        self.emit(
            TokenIssued(
                user=self.id,
                token_id=token_id,
                token_hash=tokens.hash_token(secret),
                description=description,
                issued_by=issued_by,
            )
        )
        return NewToken(token_id=token_id, token=secret)

    def revoke_token(self, token_id: str, *, revoked_by: str) -> bool:
        """Revokes a token; returns False (and emits nothing) when it was revoked already,
        so that repeating a revocation is safe."""
        self.require_exists()
        state = self.tokens.get(token_id)
        if state is None:
            raise NotFound(
                f"user {self.id!r} has no token {token_id!r}; "
                "use the token id shown when the token was issued"
            )
        if state.revoked:
            return False
        self.emit(TokenRevoked(user=self.id, token_id=token_id, revoked_by=revoked_by))
        return True

    def require_exists(self) -> None:
        """Raises NotFound unless the user exists."""
        if not self.exists:
            raise NotFound(f"user {self.id!r} does not exist; check the name")

    # -- state -------------------------------------------------------------------------

    def apply(self, event: DomainEvent) -> None:
        """Evolves state from one of the user's events."""
        if isinstance(event, UserCreated):
            self.admin = event.admin
            self.created_by = event.created_by
        elif isinstance(event, TokenIssued):
            self.tokens[event.token_id] = TokenState(event.token_id)
        elif isinstance(event, TokenRevoked):
            self.tokens[event.token_id].revoked = True
