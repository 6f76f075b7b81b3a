"""Quota's command and query handlers (transport-neutral)."""

from shipyard_quota.app.service import GroupUsageView, QuotaApp

__all__ = ["GroupUsageView", "QuotaApp"]
