"""Deployment client keys (part of the keys service): the credentials client systems send
to a private deployment's prediction endpoint.

>>> created = client.client_keys.create("iris-prod", "shop")
>>> created.secret                       # shown this once: store it now
>>> client.client_keys.list("iris-prod")
>>> client.client_keys.revoke("iris-prod", "shop")

A key is a client name plus a secret (``sk_...``). The gateway accepts it as
``Authorization: Bearer <secret>``, HTTP Basic ``<client>:<secret>`` (``curl -u``) or
``X-API-Key: <secret>``, and passes the client name to the model as ``X-Forwarded-User``.
Members of the deployment's group (and admins) manage its keys; each client name has at
most one active key per deployment.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from datetime import datetime

from shipyard.client._channel import Transport
from shipyard.client._convert import PlainData, to_datetime
from shipyard.keys.v1 import client_keys_pb2 as pb
from shipyard.keys.v1 import client_keys_pb2_grpc as pb_grpc

SERVICE = "keys"


@dataclass(frozen=True)
class ClientKeyView(PlainData):
    """One client key of a deployment (never its secret). ``last_used_at`` is ``None``
    for a key never used, and is at most a minute stale."""

    deployment: str
    client: str
    key_id: str
    group: str = ""
    created_by: str = ""
    created_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked: bool = False
    revoked_at: datetime | None = None
    revoked_by: str = ""

    @classmethod
    def from_proto(cls, msg: pb.ClientKey) -> ClientKeyView:
        """Builds it from the protobuf message."""
        return cls(
            deployment=msg.deployment,
            client=msg.client,
            key_id=msg.key_id,
            group=msg.group,
            created_by=msg.created_by,
            created_at=to_datetime(msg.created_at),
            last_used_at=to_datetime(msg.last_used_at),
            revoked=msg.revoked,
            revoked_at=to_datetime(msg.revoked_at),
            revoked_by=msg.revoked_by,
        )


@dataclass(frozen=True)
class CreatedClientKey(PlainData):
    """A new client key and its secret. The secret is returned this once (the server
    keeps only its hash); it is left out of ``repr`` so that it does not end up in a
    notebook's output or a log by accident, but ``to_dict()`` has it."""

    key: ClientKeyView
    secret: str = field(repr=False)


class ClientKeysClient:
    """Typed calls to the keys service's ClientKeyService. Obtain it as
    ``Client().client_keys``."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def _stub(self) -> pb_grpc.ClientKeyServiceStub:
        return self._transport.stub(SERVICE, pb_grpc.ClientKeyServiceStub)

    def create(self, deployment: str, client: str) -> CreatedClientKey:
        """Creates a key for the client name ``client`` on ``deployment`` (members of the
        deployment's group, admins) and returns it with its secret, shown this once. The
        key works as soon as this returns. A client name with an active key is refused
        (:class:`~shipyard.client.errors.AlreadyExists`): revoke it first."""
        reply: pb.CreatedClientKey = self._transport.call(
            SERVICE,
            "CreateClientKey",
            self._stub().CreateClientKey,
            pb.CreateClientKeyRequest(deployment=deployment, client=client),
        )
        return CreatedClientKey(key=ClientKeyView.from_proto(reply.key), secret=reply.secret)

    def list(self, deployment: str, include_revoked: bool = False) -> builtins.list[ClientKeyView]:
        """The deployment's keys, oldest first; revoked ones only with ``include_revoked``."""
        reply: pb.ListClientKeysResponse = self._transport.call(
            SERVICE,
            "ListClientKeys",
            self._stub().ListClientKeys,
            pb.ListClientKeysRequest(deployment=deployment, include_revoked=include_revoked),
        )
        return [ClientKeyView.from_proto(k) for k in reply.keys]

    def revoke(self, deployment: str, client: str) -> ClientKeyView:
        """Revokes the active key of ``client`` on ``deployment`` and returns it; revoking
        a revoked one again is harmless. The keys service refuses it at once, the gateway
        within a second."""
        reply: pb.ClientKey = self._transport.call(
            SERVICE,
            "RevokeClientKey",
            self._stub().RevokeClientKey,
            pb.RevokeClientKeyRequest(deployment=deployment, client=client),
        )
        return ClientKeyView.from_proto(reply)
