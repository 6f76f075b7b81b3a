"""Quota's gRPC servicer."""

from shipyard_quota.api.servicer import QuotaApi

__all__ = ["QuotaApi"]
