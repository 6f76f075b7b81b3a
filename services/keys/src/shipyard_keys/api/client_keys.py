"""The gRPC face of the client key handlers: protobuf in, app call, protobuf out.

Nothing is decided here. The kit's interceptor has authenticated the caller and maps
domain errors to status codes; the caller's own bearer token is passed on for the
scheduler lookup (the scheduler checks the person acting, not the keys service).
"""

from __future__ import annotations

from typing import Any

from shipyard.keys.v1 import client_keys_pb2 as pb
from shipyard.keys.v1 import client_keys_pb2_grpc as pb_grpc
from shipyard_core.auth import current_principal
from shipyard_core.grpckit import bearer_token
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_keys.app import ClientKeyCommands, ClientKeyQueries, ClientKeyView

CLIENT_KEY_SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ClientKeyService"].full_name
"""``shipyard.keys.v1.ClientKeyService``."""


def _token(context: Any) -> str:
    """The caller's own token, forwarded to the scheduler."""
    return bearer_token({k: v for k, v in context.invocation_metadata() or ()})


class ClientKeyServicer(pb_grpc.ClientKeyServiceServicer):
    """``shipyard.keys.v1.ClientKeyService`` over the client key commands and queries."""

    def __init__(self, commands: ClientKeyCommands, queries: ClientKeyQueries) -> None:
        self.commands = commands
        self.queries = queries

    async def CreateClientKey(
        self, request: pb.CreateClientKeyRequest, context: Any
    ) -> pb.CreatedClientKey:
        """Creates a client key (members of the deployment's group, admins); the secret is
        in this answer only."""
        created = await self.commands.create(
            current_principal(), _token(context), request.deployment, request.client
        )
        return pb.CreatedClientKey(key=client_key_message(created.key), secret=created.secret)

    async def ListClientKeys(
        self, request: pb.ListClientKeysRequest, context: Any
    ) -> pb.ListClientKeysResponse:
        """Lists a deployment's client keys (never their secrets)."""
        keys = await self.queries.list_keys(
            current_principal(),
            _token(context),
            request.deployment,
            include_revoked=request.include_revoked,
        )
        return pb.ListClientKeysResponse(keys=[client_key_message(k) for k in keys])

    async def RevokeClientKey(
        self, request: pb.RevokeClientKeyRequest, context: Any
    ) -> pb.ClientKey:
        """Revokes a client's active key; answers the revoked key."""
        key = await self.commands.revoke(current_principal(), request.deployment, request.client)
        return client_key_message(key)

    async def VerifyClientKey(
        self, request: pb.VerifyClientKeyRequest, context: Any
    ) -> pb.VerifiedClientKey:
        """Whose key a secret is (internal token or admin); UNAUTHENTICATED with the reason
        when it does not open the deployment."""
        verified = await self.queries.verify(
            current_principal(), request.deployment, request.secret, request.client
        )
        return pb.VerifiedClientKey(client=verified.client, key_id=verified.key_id)


def client_key_message(key: ClientKeyView) -> pb.ClientKey:
    """A ClientKeyView as protobuf."""
    return pb.ClientKey(
        deployment=key.deployment,
        group=key.group,
        client=key.client,
        key_id=key.key_id,
        created_by=key.created_by,
        created_at=to_timestamp(key.created_at),
        last_used_at=to_timestamp(key.last_used_at),
        revoked=key.revoked,
        revoked_at=to_timestamp(key.revoked_at),
        revoked_by=key.revoked_by,
    )
