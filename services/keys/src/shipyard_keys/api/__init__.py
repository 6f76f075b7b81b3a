"""gRPC servicers of the keys service."""

from shipyard_keys.api.client_keys import (
    CLIENT_KEY_SERVICE_NAME,
    ClientKeyServicer,
    client_key_message,
)
from shipyard_keys.api.identity import PUBLIC_METHODS, SERVICE_NAME, IdentityServicer

__all__ = [
    "CLIENT_KEY_SERVICE_NAME",
    "PUBLIC_METHODS",
    "SERVICE_NAME",
    "ClientKeyServicer",
    "IdentityServicer",
    "client_key_message",
]
