"""Imagebuild's read models."""

from shipyard_imagebuild.projections.catalog import SCHEMA, CatalogProjection

__all__ = ["SCHEMA", "CatalogProjection"]
