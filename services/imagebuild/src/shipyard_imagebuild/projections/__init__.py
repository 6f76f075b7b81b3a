"""Imagebuild's read models."""

from shipyard_imagebuild.projections.catalog import SCHEMA, CatalogProjection
from shipyard_imagebuild.projections.usage import UsageProjection

__all__ = ["SCHEMA", "CatalogProjection", "UsageProjection"]
