"""Shipyard's Python client: typed, synchronous calls to the services (usable from a notebook).

>>> from shipyard.client import Client
>>> client = Client()                      # token and addresses from ~/.shipyard/config.json
>>> client.quota.set_group_quota("team-a", cpu=4, memory_gib=8, gpu=0, instances=4)
>>> client.quota.usage("team-a").free
>>> client.identity.create_user("ana", groups=["team-a"]).token
>>> client.events("quota").lag()
>>> build = client.images.build("./examples/iris", name="iris")
>>> client.images.wait(build.build_id, on_log=print).image
>>> d = client.deployments.create("iris-prod", "iris:1", instance_type="cpu.small", replicas=2)
>>> client.deployments.wait("iris-prod", after=d, on_change=print).status
>>> client.deployments.predict("iris-prod", {"instances": [[5.1, 3.5, 1.4, 0.2]]})
>>> client.client_keys.create("iris-prod", "shop").secret   # shown once

Namespaces: ``client.quota`` (instance types, group quotas, usage), ``client.identity``
(users, groups, tokens), ``client.images`` (builds and the image catalog),
``client.deployments`` (deployments, their history and instances, their logs, predictions
through the gateway), ``client.logs`` (instance logs: tail, follow, download),
``client.metrics`` (request metrics: QPS, success rate, latency percentiles),
``client.async_requests`` (async predictions: submit, status, result, list, cancel, wait),
``client.batch`` (batch jobs over an object store prefix),
``client.client_keys`` (deployments' client keys: create, list,
revoke), ``client.events(service)`` (event history, consumer lag, replay).

Every failure is a :class:`ShipyardClientError` subclass that mirrors the gRPC status
code (:class:`NotFound`, :class:`QuotaExceeded`, :class:`Unavailable`, ...); results are
plain dataclasses with ``to_dict()``.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from shipyard.client._channel import DEFAULT_TIMEOUT, Transport
from shipyard.client.async_requests import ASYNC_STATUSES, AsyncRequestsClient, AsyncRequestView
from shipyard.client.batch import BATCH_STATUSES, BatchClient, BatchFailure, BatchJobView
from shipyard.client.client_keys import ClientKeysClient, ClientKeyView, CreatedClientKey
from shipyard.client.config import ClientConfig, load_config
from shipyard.client.deployments import (
    DEPLOYMENT_STATUSES,
    DeploymentFailed,
    DeploymentReadme,
    DeploymentsClient,
    DeploymentView,
    HistoryEntryView,
    InstanceView,
    predict,
)
from shipyard.client.errors import (
    AlreadyExists,
    ConfigError,
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    ServerError,
    ShipyardClientError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from shipyard.client.events import (
    EVENT_SOURCED_SERVICES,
    ConsumerLag,
    Event,
    EventPage,
    EventsClient,
    LiveEvent,
    ReplayResult,
    tail_events,
)
from shipyard.client.identity import (
    CreatedUser,
    Group,
    IdentityClient,
    IssuedToken,
    Principal,
    User,
)
from shipyard.client.images import (
    Build,
    BuildFailed,
    Image,
    ImagesClient,
    ImageUsage,
    LogLine,
    ModelFolderError,
    Package,
    Readme,
)
from shipyard.client.logs import LogLine as InstanceLogLine
from shipyard.client.logs import LogsClient, LogSource, parse_duration
from shipyard.client.metrics import DeploymentMetrics, MetricsClient, MetricsSummary
from shipyard.client.quota import GroupUsage, InstanceType, QuotaClient, Reservation, Resources

__all__ = [
    "ASYNC_STATUSES",
    "BATCH_STATUSES",
    "DEFAULT_TIMEOUT",
    "DEPLOYMENT_STATUSES",
    "EVENT_SOURCED_SERVICES",
    "AlreadyExists",
    "AsyncRequestView",
    "AsyncRequestsClient",
    "BatchClient",
    "BatchFailure",
    "BatchJobView",
    "Build",
    "BuildFailed",
    "Client",
    "ClientKeyView",
    "ClientKeysClient",
    "ConfigError",
    "Conflict",
    "ConsumerLag",
    "CreatedClientKey",
    "CreatedUser",
    "DeadlineExceeded",
    "DeploymentFailed",
    "DeploymentMetrics",
    "DeploymentReadme",
    "DeploymentView",
    "DeploymentsClient",
    "Event",
    "EventPage",
    "EventsClient",
    "FailedPrecondition",
    "Group",
    "GroupUsage",
    "HistoryEntryView",
    "IdentityClient",
    "Image",
    "ImageUsage",
    "ImagesClient",
    "InstanceLogLine",
    "InstanceType",
    "InstanceView",
    "InvalidArgument",
    "IssuedToken",
    "LiveEvent",
    "LogLine",
    "LogSource",
    "LogsClient",
    "MetricsClient",
    "MetricsSummary",
    "ModelFolderError",
    "NotFound",
    "Package",
    "PermissionDenied",
    "Principal",
    "QuotaClient",
    "QuotaExceeded",
    "Readme",
    "ReplayResult",
    "Reservation",
    "Resources",
    "ServerError",
    "ShipyardClientError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "User",
    "parse_duration",
    "predict",
    "tail_events",
]


class Client:
    """Entry point to Shipyard's APIs.

    ``token`` and ``home`` default to what ``load_config()`` finds (``SHIPYARD_TOKEN``,
    ``SHIPYARD_HOME``, ``~/.shipyard/config.json``); ``timeout`` is the deadline of each
    call in seconds. Channels open on first use; ``close()`` (or ``with Client() as c``)
    closes them.
    """

    quota: QuotaClient
    identity: IdentityClient
    images: ImagesClient
    deployments: DeploymentsClient
    client_keys: ClientKeysClient
    logs: LogsClient
    metrics: MetricsClient
    async_requests: AsyncRequestsClient
    batch: BatchClient

    def __init__(
        self,
        token: str | None = None,
        home: str | Path | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        config: ClientConfig | None = None,
    ) -> None:
        if config is None:
            config = _load(Path(home).expanduser() if home is not None else None)
        self.config = config
        self._transport = Transport(config, token=token or config.token, timeout=timeout)
        self.quota = QuotaClient(self._transport)
        self.identity = IdentityClient(self._transport)
        self.images = ImagesClient(self._transport)
        self.deployments = DeploymentsClient(self._transport, config)
        self.client_keys = ClientKeysClient(self._transport)
        self.logs = LogsClient(self._transport)
        self.metrics = MetricsClient(self._transport)
        self.async_requests = AsyncRequestsClient(self._transport, config)
        self.batch = BatchClient(self._transport, config)

    def events(self, service: str) -> EventsClient:
        """Event administration (list, lag, replay) of one event-sourced service."""
        self._transport.address(service)  # fail now, not at the first call, on a typo
        return EventsClient(self._transport, service)

    def address(self, service: str) -> str:
        """``host:port`` the client uses for a service."""
        return self._transport.address(service)

    @property
    def has_token(self) -> bool:
        """Whether calls carry a token."""
        return self._transport.has_token

    def close(self) -> None:
        """Closes the open channels (the client reopens them if used again)."""
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        # Never show the token: reprs end up in notebooks and logs.
        token = "set" if self.has_token else "none"
        return f"Client(token={token}, endpoints={self.config.endpoints!r})"


def _load(home: Path | None) -> ClientConfig:
    try:
        return load_config(home)
    except (OSError, ValueError, TypeError) as exc:
        where = home if home is not None else "the Shipyard home"
        raise ConfigError(f"cannot read the client config in {where}: {exc}") from None
