"""Read models of the keys service."""

from shipyard_keys.projections.identity import SCHEMA, IdentityProjection

__all__ = ["SCHEMA", "IdentityProjection"]
