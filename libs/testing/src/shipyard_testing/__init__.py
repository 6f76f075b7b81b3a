"""Test support for Shipyard: fixtures for real NATS, PostgreSQL and S3 (moto's server),
waiting helpers, a fake Kubernetes API (``fake_kube``).

The fixtures come from the pytest plugin ``shipyard_testing.plugin`` (registered through
the ``pytest11`` entry point, so installing this package is enough).
"""

from shipyard_testing.auth import StaticAuthenticator
from shipyard_testing.folders import folder_tar
from shipyard_testing.plugin import wait_for, wait_for_sync

__all__ = ["StaticAuthenticator", "folder_tar", "wait_for", "wait_for_sync"]
