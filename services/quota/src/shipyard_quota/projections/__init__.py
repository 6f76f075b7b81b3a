"""Quota's read models."""

from shipyard_quota.projections.usage import UsageProjection

__all__ = ["UsageProjection"]
