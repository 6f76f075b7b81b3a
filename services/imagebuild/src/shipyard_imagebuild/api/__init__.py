"""Imagebuild's gRPC servicer."""

from shipyard_imagebuild.api.servicer import ImageBuildApi

__all__ = ["ImageBuildApi"]
