"""gRPC servicers of the keys service."""

from shipyard_keys.api.identity import PUBLIC_METHODS, SERVICE_NAME, IdentityServicer

__all__ = ["PUBLIC_METHODS", "SERVICE_NAME", "IdentityServicer"]
