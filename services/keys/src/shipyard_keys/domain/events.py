"""The keys service's events: what happened to users, their tokens, groups, the bootstrap,
and deployments' client keys.

Payloads never hold a token or client key secret, only its SHA-256 (``token_hash``,
``key_hash``): events are kept
forever and published on JetStream, so anything in them is as good as public inside the
platform. Timestamps are the envelope's ``recorded_at``, not payload fields.
"""

from __future__ import annotations

from shipyard_core.aggregate import DomainEvent, EventRegistry


class UserCreated(DomainEvent):
    """A user came into being (stream ``user:<name>``)."""

    name: str
    admin: bool
    created_by: str


class TokenIssued(DomainEvent):
    """A user got an API token; only its hash is recorded."""

    user: str
    token_id: str
    token_hash: str
    description: str
    issued_by: str


class TokenRevoked(DomainEvent):
    """A token stopped working for good."""

    user: str
    token_id: str
    revoked_by: str


class GroupCreated(DomainEvent):
    """A group came into being (stream ``group:<name>``)."""

    name: str
    description: str
    created_by: str


class MemberAdded(DomainEvent):
    """A user joined a group (recorded on the group's stream)."""

    group: str
    user: str
    added_by: str


class MemberRemoved(DomainEvent):
    """A user left a group (recorded on the group's stream)."""

    group: str
    user: str
    removed_by: str


class AdminBootstrapped(DomainEvent):
    """The first admin was created by ``bootstrap-admin`` (singleton stream
    ``bootstrap:admin``, saved together with the user's ``UserCreated``)."""

    user: str


class ClientKeyCreated(DomainEvent):
    """A deployment got a client key (stream ``client_keys:<deployment>``); only the hash
    of its secret is recorded. ``group`` is the group that owned the deployment when the
    key was made (the scheduler's answer): it decides who may list and revoke the key, and
    the key stops working if the deployment name later belongs to another group."""

    deployment: str
    group: str
    client: str
    key_id: str
    key_hash: str
    created_by: str


class ClientKeyRevoked(DomainEvent):
    """A client key stopped working for good."""

    deployment: str
    client: str
    key_id: str
    revoked_by: str


REGISTRY = EventRegistry(
    UserCreated,
    TokenIssued,
    TokenRevoked,
    GroupCreated,
    MemberAdded,
    MemberRemoved,
    AdminBootstrapped,
    ClientKeyCreated,
    ClientKeyRevoked,
)
"""Every event class of the keys service, for decoding stored events."""
