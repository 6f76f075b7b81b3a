"""Imagebuild's domain: builds and the image catalog."""

from shipyard_imagebuild.domain.aggregates import Build, BuildState, ImageRepo, ImageVersion
from shipyard_imagebuild.domain.events import IMAGEBUILD_EVENTS, IMAGEBUILD_UPCASTERS

__all__ = [
    "IMAGEBUILD_EVENTS",
    "IMAGEBUILD_UPCASTERS",
    "Build",
    "BuildState",
    "ImageRepo",
    "ImageVersion",
]
