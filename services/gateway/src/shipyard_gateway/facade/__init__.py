"""The control-plane REST facade: ``/api/v1/...`` JSON over the gRPC services (keys,
quota, imagebuild, scheduler) for the web console and curl users, with its OpenAPI
document at ``/api/v1/openapi.json``.

Mounting it on the gateway's HTTP app::

    from shipyard_gateway.facade import API_PREFIX, build_facade
    app.add_subapp(API_PREFIX, build_facade(settings))  # keys/quota/imagebuild/scheduler_addr

Modules: :mod:`.routes` (THE route table), :mod:`.openapi` (the compiled table and the
document), :mod:`.schema` (JSON ↔ protobuf and the schemas), :mod:`.errors` (THE gRPC
→ HTTP status table), :mod:`.app` (the aiohttp application).
"""

from shipyard_gateway.facade.app import (
    API_PREFIX,
    AddressesLike,
    FacadeAddresses,
    build_facade,
    mount_facade,
)
from shipyard_gateway.facade.errors import HTTP_STATUS_FOR_GRPC
from shipyard_gateway.facade.openapi import Api
from shipyard_gateway.facade.routes import ROUTES

__all__ = [
    "API_PREFIX",
    "HTTP_STATUS_FOR_GRPC",
    "ROUTES",
    "AddressesLike",
    "Api",
    "FacadeAddresses",
    "build_facade",
    "mount_facade",
]
