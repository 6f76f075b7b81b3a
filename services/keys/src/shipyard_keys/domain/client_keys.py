"""The ClientKeys aggregate: the client keys of one deployment (PrimeHub's "clients").

A client key is a client name plus a secret. The secret is shown once, at creation; the
events hold only its SHA-256. One stream per deployment (``client_keys:<deployment>``),
so "one active key per client name" is decided on one stream under the optimistic
concurrency check, with no uniqueness table.

The keys service does not own deployments: the command handler asks the scheduler which
group owns the deployment and passes it in. A deployment name can be deleted and created
again by another group (decision 0017); the stream then outlives the first owner, so the
aggregate remembers the group of its newest key and the first key of a new owner revokes
the keys the previous owner left active.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shipyard_core.aggregate import Aggregate, DomainEvent
from shipyard_core.errors import AlreadyExists, NotFound
from shipyard_keys.domain import tokens
from shipyard_keys.domain.events import ClientKeyCreated, ClientKeyRevoked


@dataclass(frozen=True)
class NewClientKey:
    """A client key just created. ``secret`` is handed to the caller once and never
    stored; it is kept out of ``repr`` so that it cannot reach a log by accident."""

    key_id: str
    client: str
    group: str
    secret: str = field(repr=False)


@dataclass
class ClientKeyState:
    """What the aggregate remembers of one of its keys."""

    key_id: str
    client: str
    group: str
    created_by: str
    revoked: bool = False
    revoked_by: str = ""


def no_key_message(deployment: str, client: str) -> str:
    """The one answer for "no such key" and "not a key you may see": the two must read
    the same, or the answer tells other groups' client names apart."""
    return (
        f"deployment {deployment!r} has no client key for client {client!r}; "
        f"see `shipyard keys list {deployment}`"
    )


class ClientKeys(Aggregate):
    """The client keys of one deployment (id = the deployment's name)."""

    aggregate_type = "client_keys"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.group = ""
        """The group that owned the deployment when its newest key was made ("" before
        the first key): the group whose members may list and revoke its keys."""
        self.keys: dict[str, ClientKeyState] = {}
        """Every key by id, oldest first."""
        self.active: dict[str, str] = {}
        """Client name -> id of its active (not revoked) key."""

    # -- decisions ---------------------------------------------------------------------

    def create(self, *, group: str, client: str, created_by: str) -> NewClientKey:
        """Creates a key for ``client``; ``group`` owns the deployment now (the scheduler
        said so). Refuses a client name that has an active key: two secrets for one name
        would make "revoke the client" ambiguous, so the old one is revoked first."""
        if self.group and self.group != group:
            # The deployment was deleted and created again by another group: the keys the
            # previous owner left active belong to a deployment that no longer exists.
            for key_id in list(self.active.values()):
                self.emit(
                    ClientKeyRevoked(
                        deployment=self.id,
                        client=self.keys[key_id].client,
                        key_id=key_id,
                        revoked_by=created_by,
                    )
                )
        existing = self.active.get(client)
        if existing is not None:
            raise AlreadyExists(
                f"client {client!r} of deployment {self.id!r} has an active key "
                f"({existing}) already; revoke it first (`shipyard keys revoke {self.id} "
                f"{client}`) or choose another client name"
            )
        key_id = tokens.new_client_key_id()
        while key_id in self.keys:  # 32-bit ids: a clash is rare but cheap to avoid
            key_id = tokens.new_client_key_id()
        secret = tokens.new_client_key()
        self.emit(
            ClientKeyCreated(
                deployment=self.id,
                group=group,
                client=client,
                key_id=key_id,
                key_hash=tokens.hash_token(secret),
                created_by=created_by,
            )
        )
        return NewClientKey(key_id=key_id, client=client, group=group, secret=secret)

    def revoke(self, client: str, *, revoked_by: str) -> tuple[ClientKeyState, bool]:
        """Revokes ``client``'s active key. Returns the key and whether anything changed:
        revoking a client whose key is revoked already changes nothing and succeeds (a
        retried command after a lost answer must not fail). A client that never had a
        key of the current owner is NotFound."""
        key_id = self.active.get(client)
        if key_id is None:
            latest = self.latest(client)
            if latest is None:
                raise NotFound(no_key_message(self.id, client))
            return latest, False
        self.emit(
            ClientKeyRevoked(
                deployment=self.id, client=client, key_id=key_id, revoked_by=revoked_by
            )
        )
        return self.keys[key_id], True

    def latest(self, client: str) -> ClientKeyState | None:
        """The newest key of ``client`` made under the current owner, if any."""
        found = None
        for state in self.keys.values():
            if state.client == client and state.group == self.group:
                found = state
        return found

    # -- state -------------------------------------------------------------------------

    def apply(self, event: DomainEvent) -> None:
        """Evolves state from one of the deployment's client key events."""
        if isinstance(event, ClientKeyCreated):
            self.group = event.group
            self.keys[event.key_id] = ClientKeyState(
                key_id=event.key_id,
                client=event.client,
                group=event.group,
                created_by=event.created_by,
            )
            self.active[event.client] = event.key_id
        elif isinstance(event, ClientKeyRevoked):
            state = self.keys[event.key_id]
            state.revoked = True
            state.revoked_by = event.revoked_by
            if self.active.get(event.client) == event.key_id:
                del self.active[event.client]
