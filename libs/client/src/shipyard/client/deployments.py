"""The scheduler service: deployments (create, update, stop, start, scale, delete, list,
show, history, instances, readme), waiting for a rollout, and predictions through the
gateway.

>>> d = client.deployments.create("iris-prod", "iris:1", instance_type="cpu.small", replicas=2)
>>> client.deployments.wait("iris-prod", after=d, on_change=print)  # raises DeploymentFailed
>>> client.deployments.predict("iris-prod", {"instances": [[5.1, 3.5, 1.4, 0.2]]})
>>> client.deployments.update("iris-prod", image="iris:2", message="retrained")

Statuses are lowercase strings: ``deploying``, ``deployed``, ``failed``, ``stopped``,
``deleted`` (:data:`DEPLOYMENT_STATUSES`). ``replicas=N`` asks for a fixed count
(min = max = N); ``min_replicas`` and ``max_replicas`` together ask for an autoscaled
range (min 0: scale to zero when idle).
"""

from __future__ import annotations

import builtins
import ipaddress
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shipyard.client._channel import Transport
from shipyard.client._convert import PlainData, enum_name, to_datetime
from shipyard.client.config import ClientConfig, load_config
from shipyard.client.errors import (
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
from shipyard.client.images import split_image
from shipyard.client.logs import DEFAULT_TAIL, LogLine, LogsClient, When
from shipyard.client.metrics import DeploymentMetrics, MetricsClient
from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard.scheduler.v1 import scheduler_pb2_grpc as pb_grpc

SERVICE = "scheduler"
GATEWAY = "gateway"

DEPLOYMENT_STATUSES = ("deploying", "deployed", "failed", "stopped", "deleted")
INSTANCE_STATUSES = ("pending", "starting", "ready", "failed", "terminated")
ACCESS_LEVELS = ("private", "public")

# The most instances ListInstances returns (and its default).
MAX_INSTANCES = 200

# wait(): how long by default, and how often it looks (starting fast, backing off).
DEFAULT_WAIT_TIMEOUT = 600.0
_FIRST_POLL = 0.1
_MAX_POLL = 2.0
# Right after a command the read model may lag behind it for a moment: a deployment just
# created may not be found yet, or still show the state before the command. For this
# long, wait() treats such answers as not-yet-current and looks again.
_CATCH_UP_SECONDS = 5.0

# predict(): the deadline of one prediction request (models can be slow).
DEFAULT_PREDICT_TIMEOUT = 60.0
# How much of a non-JSON error body becomes the error message.
_ERROR_BODY_CHARS = 300


def _status(value: int) -> str:
    return enum_name(pb.DeploymentStatus.Name, value, "DEPLOYMENT_STATUS_")


def _instance_status(value: int) -> str:
    return enum_name(pb.InstanceStatus.Name, value, "INSTANCE_STATUS_")


def _access(value: int) -> str:
    """``public`` or ``private`` (unspecified means private: the default on create)."""
    return "public" if value == pb.ACCESS_PUBLIC else "private"


def status_value(status: str) -> pb.DeploymentStatus.ValueType:
    """``"deployed"`` → ``DEPLOYMENT_STATUS_DEPLOYED``; ``""`` → unspecified. Raises
    :class:`InvalidArgument` naming the known statuses for anything else."""
    if not status:
        return pb.DEPLOYMENT_STATUS_UNSPECIFIED
    if status.lower() not in DEPLOYMENT_STATUSES:
        raise _unknown_status(status)
    return pb.DeploymentStatus.Value(f"DEPLOYMENT_STATUS_{status.upper()}")


def _unknown_status(status: str) -> InvalidArgument:
    return InvalidArgument(
        f"status {status!r}: expected one of {', '.join(DEPLOYMENT_STATUSES)}", service=SERVICE
    )


def _image_ref(msg: pb.ImageRef) -> str:
    """``name:version`` (just ``name`` when the version is unknown)."""
    if not msg.name:
        return ""
    return f"{msg.name}:{msg.version}" if msg.version else msg.name


def replica_range(
    replicas: int | None, min_replicas: int | None, max_replicas: int | None
) -> tuple[int, int] | None:
    """``(min, max)`` from the two ways of asking: ``replicas=N`` (min = max = N) or
    ``min_replicas`` and ``max_replicas`` together; ``None`` when none is given. Raises
    :class:`InvalidArgument` when both ways are mixed or only one bound is given (the
    server checks the values themselves)."""
    if replicas is not None:
        if min_replicas is not None or max_replicas is not None:
            raise InvalidArgument(
                "replicas and min_replicas/max_replicas exclude each other: give replicas=N "
                "for a fixed count, or min_replicas and max_replicas for a range",
                service=SERVICE,
            )
        return replicas, replicas
    if min_replicas is None and max_replicas is None:
        return None
    if min_replicas is None or max_replicas is None:
        raise InvalidArgument(
            "min_replicas and max_replicas go together: give both "
            "(or replicas=N for a fixed count)",
            service=SERVICE,
        )
    return min_replicas, max_replicas


def _metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): str(v) for k, v in (metadata or {}).items()}


@dataclass(frozen=True)
class DeploymentView(PlainData):
    """One deployment as it stands: what its owner asked for and what the scheduler
    concluded. ``status`` is one of :data:`DEPLOYMENT_STATUSES`; ``message`` says why it
    failed or what it waits for. ``replicas`` is the current target (the autoscaler moves
    it between ``min_replicas`` and ``max_replicas``), ``ready_replicas`` how many serve.
    ``endpoint`` is the raw JSON prediction path on the gateway."""

    name: str
    group: str
    status: str
    message: str = ""
    image: str = ""
    image_digest: str = ""
    image_kind: str = "pack"
    """``pack`` (an environment pack) or ``oci`` (a container image built on a cluster)."""
    image_reference: str = ""
    """The container image, pinned by digest, of an ``oci`` image."""
    instance_type: str = ""
    replicas: int = 0
    ready_replicas: int = 0
    min_replicas: int = 0
    max_replicas: int = 0
    target_inflight: int = 0
    access: str = "private"
    description: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    revision: int = 0
    active_revision: int = 0
    endpoint: str = ""
    created_by: str = ""
    created_at: datetime | None = None
    updated_by: str = ""
    updated_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: pb.Deployment) -> DeploymentView:
        """Builds it from the protobuf message."""
        return cls(
            name=msg.name,
            group=msg.group,
            status=_status(msg.status),
            message=msg.message,
            image=_image_ref(msg.image),
            image_digest=msg.image.digest,
            image_kind=msg.image.kind or "pack",
            image_reference=msg.image.reference,
            instance_type=msg.instance_type,
            replicas=msg.replicas,
            ready_replicas=msg.ready_replicas,
            min_replicas=msg.scaling.min_replicas,
            max_replicas=msg.scaling.max_replicas,
            target_inflight=msg.scaling.target_inflight,
            access=_access(msg.access),
            description=msg.description,
            metadata=dict(msg.metadata),
            revision=msg.revision,
            active_revision=msg.active_revision,
            endpoint=msg.endpoint or f"/deployments/{urllib.parse.quote(msg.name)}/predict",
            created_by=msg.created_by,
            created_at=to_datetime(msg.created_at),
            updated_by=msg.updated_by,
            updated_at=to_datetime(msg.updated_at),
        )

    @property
    def public(self) -> bool:
        """Whether predictions need no key."""
        return self.access == "public"

    @property
    def fixed(self) -> bool:
        """Whether it runs a fixed number of replicas (min = max)."""
        return self.min_replicas == self.max_replicas


@dataclass(frozen=True)
class HistoryEntryView(PlainData):
    """One row of a deployment's history: a revision or an action (``create``,
    ``update``, ``stop``, ``start``, ``scale``, ``delete``, ``readme``), who did it, when,
    and the definition after it."""

    revision: int
    action: str
    actor: str = ""
    at: datetime | None = None
    stopped: bool = False
    image: str = ""
    image_digest: str = ""
    min_replicas: int = 0
    max_replicas: int = 0
    target_inflight: int = 0
    group: str = ""
    instance_type: str = ""
    access: str = "private"
    description: str = ""
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, msg: pb.HistoryEntry) -> HistoryEntryView:
        """Builds it from the protobuf message."""
        return cls(
            revision=msg.revision,
            action=msg.action,
            actor=msg.actor,
            at=to_datetime(msg.at),
            stopped=msg.stopped,
            image=_image_ref(msg.image),
            image_digest=msg.image.digest,
            min_replicas=msg.scaling.min_replicas,
            max_replicas=msg.scaling.max_replicas,
            target_inflight=msg.scaling.target_inflight,
            group=msg.group,
            instance_type=msg.instance_type,
            access=_access(msg.access),
            description=msg.description,
            message=msg.message,
            metadata=dict(msg.metadata),
        )


@dataclass(frozen=True)
class InstanceView(PlainData):
    """One instance (replica) of a deployment. ``status`` is one of
    :data:`INSTANCE_STATUSES`; a failed one's ``message`` holds the reason and the last
    log lines; ``backend`` is ``local`` or ``kubernetes``."""

    instance_id: str
    deployment: str
    revision: int
    status: str
    address: str = ""
    restarts: int = 0
    message: str = ""
    created_at: datetime | None = None
    ready_at: datetime | None = None
    ended_at: datetime | None = None
    backend: str = ""

    @classmethod
    def from_proto(cls, msg: pb.Instance) -> InstanceView:
        """Builds it from the protobuf message."""
        return cls(
            instance_id=msg.instance_id,
            deployment=msg.deployment,
            revision=msg.revision,
            status=_instance_status(msg.status),
            address=msg.address,
            restarts=msg.restarts,
            message=msg.message,
            created_at=to_datetime(msg.created_at),
            ready_at=to_datetime(msg.ready_at),
            ended_at=to_datetime(msg.ended_at),
            backend=msg.backend,
        )


@dataclass(frozen=True)
class DeploymentReadme(PlainData):
    """A deployment's readme (GitHub-flavoured Markdown)."""

    name: str
    markdown: str = ""
    updated_at: datetime | None = None
    updated_by: str = ""

    @classmethod
    def from_proto(cls, msg: pb.Readme) -> DeploymentReadme:
        """Builds it from the protobuf message."""
        return cls(
            name=msg.name,
            markdown=msg.markdown,
            updated_at=to_datetime(msg.updated_at),
            updated_by=msg.updated_by,
        )


class DeploymentFailed(ShipyardClientError):
    """A deployment turned ``failed`` while :meth:`DeploymentsClient.wait` watched it.
    ``deployment`` is what the scheduler said; the message carries its reason."""

    default_code = "DEPLOYMENT_FAILED"

    def __init__(self, deployment: DeploymentView) -> None:
        self.deployment = deployment
        self.reason = deployment.message or "no reason recorded"
        super().__init__(
            f"deployment {deployment.name} failed: {self.reason}",
            service=SERVICE,
            method="GetDeployment",
            hint=f"`shipyard deploy instances {deployment.name}` shows each instance's error",
        )


# Predictions (the gateway's REST data plane).

_HTTP_ERRORS: dict[int, type[ShipyardClientError]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: InvalidArgument,
    415: InvalidArgument,
    422: InvalidArgument,
    429: QuotaExceeded,
    501: Unimplemented,
    502: Unavailable,
    503: Unavailable,
    504: DeadlineExceeded,
}


def predict_url(deployment: str, gateway_url: str) -> str:
    """``<gateway>/deployments/<deployment>/predict`` (the raw JSON route)."""
    if not deployment:
        raise InvalidArgument("deployment: give the deployment's name", service=GATEWAY)
    name = urllib.parse.quote(deployment, safe="")
    return f"{gateway_url.rstrip('/')}/deployments/{name}/predict"


def predict(
    deployment: str,
    payload: Any,
    *,
    token: str | None = None,
    gateway_url: str | None = None,
    timeout: float = DEFAULT_PREDICT_TIMEOUT,
    config: ClientConfig | None = None,
) -> Any:
    """POSTs ``payload`` as JSON to the deployment's raw route on the gateway
    (``/deployments/<deployment>/predict``, handed to the model's ``predict()`` as is)
    and returns the decoded JSON answer (the text when the answer is not JSON).

    ``payload`` is anything :func:`json.dumps` takes, or ``bytes`` already holding JSON.
    ``token`` (a user token or a client key) goes as ``Authorization: Bearer``; ``None``
    uses the configured token (``SHIPYARD_TOKEN`` or ``config.json``), ``""`` sends none.
    ``gateway_url`` defaults to :meth:`ClientConfig.gateway_url`. Failures raise the
    client's errors (:class:`NotFound`, :class:`Unauthenticated`, :class:`Unavailable`,
    ...) with the gateway's ``error`` message.
    """
    if config is None and (token is None or gateway_url is None):
        try:
            config = load_config()
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the client config: {exc}") from None
    if token is None:
        token = config.token if config is not None else None
    if gateway_url is None:
        assert config is not None
        gateway_url = config.gateway_url()
    url = predict_url(deployment, gateway_url)
    if isinstance(payload, bytes | bytearray):
        body = bytes(payload)
    else:
        try:
            body = json.dumps(payload).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"payload: cannot be sent as JSON: {exc}", service=GATEWAY, method="predict"
            ) from None
    return gateway_request(
        "POST",
        url,
        deployment,
        token=token,
        body=body,
        headers={"Content-Type": "application/json"},
        timeout=timeout,
    )


def gateway_request(
    method: str,
    url: str,
    deployment: str,
    *,
    token: str | None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float,
) -> Any:
    """One HTTP exchange with a gateway route of ``deployment`` (``url`` contains
    ``/deployments/``): the decoded JSON answer (the text when it is not JSON), or the
    client's error for the gateway's refusal, a timeout or an unreachable gateway."""
    sent = {"Accept": "application/json", "User-Agent": "shipyard-client", **(headers or {})}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=sent, method=method)  # noqa: S310
    gateway_url = url.split("/deployments/", 1)[0]
    try:
        with _opener(url).open(request, timeout=timeout) as response:
            data: bytes = response.read()
            content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        raise _http_error(err, deployment, has_token=bool(token)) from None
    except TimeoutError:
        raise _gateway_timeout(gateway_url, deployment, timeout) from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, TimeoutError):
            raise _gateway_timeout(gateway_url, deployment, timeout) from None
        raise _gateway_unreachable(gateway_url, err.reason) from None
    except OSError as err:
        raise _gateway_unreachable(gateway_url, err) from None
    return _decode(data, content_type)


def _gateway_timeout(gateway_url: str, deployment: str, timeout: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"the gateway at {gateway_url} did not answer the prediction for {deployment} "
        f"within {timeout:g}s",
        service=GATEWAY,
        method="predict",
    )


def _gateway_unreachable(gateway_url: str, reason: object) -> Unavailable:
    return Unavailable(
        f"cannot reach the gateway at {gateway_url}: {reason}", service=GATEWAY, method="predict"
    )


def _opener(url: str) -> urllib.request.OpenerDirector:
    """urllib's opener; without proxies for loopback addresses (a proxy set for the
    internet must not swallow requests to the local gateway)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if loopback:
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def _decode(data: bytes, content_type: str) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        charset = "utf-8"
        if "charset=" in content_type:
            charset = content_type.split("charset=", 1)[1].split(";")[0].strip() or charset
        return data.decode(charset, errors="replace")


def _error_message(body: bytes, status: int, reason: str) -> str:
    """The gateway's ``{"error": "..."}`` (or ``{"error": {"message": ...}}``,
    ``{"message": ...}``, ``{"detail": ...}``), else a short text body, else the status."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            error = error.get("message")
        for candidate in (error, data.get("message"), data.get("detail")):
            if isinstance(candidate, str) and candidate.strip():
                return candidate.strip()
    text = body.decode("utf-8", errors="replace").strip()
    if text and not text.startswith("<") and len(text) <= _ERROR_BODY_CHARS:
        return text
    return f"the gateway answered HTTP {status} {reason}".strip()


def _http_error(
    err: urllib.error.HTTPError, deployment: str, *, has_token: bool
) -> ShipyardClientError:
    try:
        body = err.read()
    except OSError:
        body = b""
    finally:
        err.close()
    message = _error_message(body, err.code, str(err.reason or ""))
    cls = _HTTP_ERRORS.get(err.code)
    kw: dict[str, Any] = {"service": GATEWAY, "method": "predict"}
    if cls is None:
        cls = ServerError if err.code >= 500 else ShipyardClientError
        kw["code"] = "INTERNAL" if err.code >= 500 else f"HTTP_{err.code}"
    if issubclass(cls, Unavailable):
        kw["hint"] = None  # the gateway answered: "is Shipyard running?" would mislead
    if cls is Unauthenticated and not has_token:
        kw["hint"] = (
            f"{deployment} is private: pass --token (a user token or a client key) "
            "or set SHIPYARD_TOKEN"
        )
    return cls(message, **kw)


class DeploymentsClient:
    """Typed calls to the scheduler service. Obtain it as ``Client().deployments``."""

    def __init__(self, transport: Transport, config: ClientConfig | None = None) -> None:
        self._transport = transport
        self._config = config or ClientConfig()
        self._logs = LogsClient(transport)
        self._metrics = MetricsClient(transport)

    def _stub(self) -> pb_grpc.SchedulerServiceStub:
        return self._transport.stub(SERVICE, pb_grpc.SchedulerServiceStub)

    def _deployment(self, method: str, request: Any) -> DeploymentView:
        reply: pb.Deployment = self._transport.call(
            SERVICE, method, getattr(self._stub(), method), request
        )
        return DeploymentView.from_proto(reply)

    def _scaling(
        self,
        name: str,
        replicas: int | None,
        min_replicas: int | None,
        max_replicas: int | None,
        target_inflight: int | None,
    ) -> pb.Scaling | None:
        """The Scaling to send, or ``None`` to leave it unchanged. What is not given
        (the range, or the autoscaling target) keeps its current value."""
        wanted = replica_range(replicas, min_replicas, max_replicas)
        if wanted is None and target_inflight is None:
            return None
        if wanted is None or target_inflight is None:
            current = self.get(name)
            if wanted is None:
                wanted = (current.min_replicas, current.max_replicas)
            if target_inflight is None:
                target_inflight = current.target_inflight
        return pb.Scaling(
            min_replicas=wanted[0], max_replicas=wanted[1], target_inflight=target_inflight
        )

    # Commands.

    def create(
        self,
        name: str,
        image: str,
        *,
        group: str = "",
        instance_type: str,
        replicas: int | None = None,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        target_inflight: int = 0,
        public: bool = False,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
        readme: str = "",
    ) -> DeploymentView:
        """Creates deployment ``name`` serving ``image`` (``name:version``, or ``name``
        for its latest version) on ``instance_type``, and returns it (``deploying``);
        follow the rollout with :meth:`wait`.

        ``replicas=N`` runs N instances; ``min_replicas`` and ``max_replicas`` give an
        autoscaled range instead (min 0: scale to zero when idle); neither means one
        instance. ``target_inflight`` is the autoscaler's in-flight requests per instance
        (0: the server's default). ``group`` defaults to the caller's only group;
        ``public`` deployments answer predictions without a key. Refused with
        :class:`QuotaExceeded` when the group's quota cannot hold it.
        """
        if not name:
            raise InvalidArgument(
                "name: a deployment needs a name (e.g. iris-prod)", service=SERVICE
            )
        split_image(image)
        if not instance_type:
            raise InvalidArgument(
                "instance_type: give one (see `shipyard instance-types list`)", service=SERVICE
            )
        low, high = replica_range(replicas, min_replicas, max_replicas) or (1, 1)
        spec = pb.DeploymentSpec(
            image=image,
            instance_type=instance_type,
            scaling=pb.Scaling(
                min_replicas=low, max_replicas=high, target_inflight=target_inflight
            ),
            access=pb.ACCESS_PUBLIC if public else pb.ACCESS_PRIVATE,
            description=description,
            metadata=_metadata(metadata),
        )
        return self._deployment(
            "CreateDeployment",
            pb.CreateDeploymentRequest(name=name, group=group, spec=spec, readme=readme),
        )

    def update(
        self,
        name: str,
        *,
        image: str | None = None,
        instance_type: str | None = None,
        replicas: int | None = None,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        target_inflight: int | None = None,
        public: bool | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        clear_metadata: bool = False,
        message: str = "",
    ) -> DeploymentView:
        """Changes a deployment; what is ``None`` stays as it is. Makes a new revision,
        rolled out with no downtime (follow it with :meth:`wait`).

        ``metadata`` is merged into the current metadata; ``clear_metadata`` empties it
        first. ``message`` is kept in the history. Changing the range without
        ``target_inflight`` keeps the current target (and the other way round).
        """
        scaling = self._scaling(name, replicas, min_replicas, max_replicas, target_inflight)
        if image:
            split_image(image)
        request = pb.UpdateDeploymentRequest(
            name=name,
            image=image or "",
            instance_type=instance_type or "",
            access=(
                pb.ACCESS_UNSPECIFIED
                if public is None
                else (pb.ACCESS_PUBLIC if public else pb.ACCESS_PRIVATE)
            ),
            description=description or "",
            set_description=description is not None,
            metadata=_metadata(metadata),
            clear_metadata=clear_metadata,
            message=message,
        )
        if scaling is not None:
            request.scaling.CopyFrom(scaling)
        return self._deployment("UpdateDeployment", request)

    def scale(
        self,
        name: str,
        replicas: int | None = None,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        *,
        target_inflight: int | None = None,
    ) -> DeploymentView:
        """Sets a fixed replica count (``replicas``) or a range (``min_replicas`` and
        ``max_replicas``; min 0 scales to zero when idle) without a new revision. What is
        not given keeps its current value."""
        scaling = self._scaling(name, replicas, min_replicas, max_replicas, target_inflight)
        if scaling is None:
            raise InvalidArgument(
                "scale: give replicas=N, or min_replicas and max_replicas", service=SERVICE
            )
        return self._deployment(
            "ScaleDeployment", pb.ScaleDeploymentRequest(name=name, scaling=scaling)
        )

    def stop(self, name: str) -> DeploymentView:
        """Stops every instance and releases the quota; the definition stays."""
        return self._deployment("StopDeployment", pb.DeploymentRef(name=name))

    def start(self, name: str) -> DeploymentView:
        """Reserves the quota again and starts the newest revision (a stopped or failed
        deployment)."""
        return self._deployment("StartDeployment", pb.DeploymentRef(name=name))

    def delete(self, name: str) -> None:
        """Stops and removes a deployment; its history and instances stay readable."""
        self._transport.call(
            SERVICE,
            "DeleteDeployment",
            self._stub().DeleteDeployment,
            pb.DeploymentRef(name=name),
        )

    # Queries.

    def get(self, name: str) -> DeploymentView:
        """One deployment, as it stands now."""
        return self._deployment("GetDeployment", pb.DeploymentRef(name=name))

    def list(
        self,
        search: str = "",
        group: str = "",
        status: str = "",
        mine: bool = False,
        include_deleted: bool = False,
    ) -> builtins.list[DeploymentView]:
        """Deployments whose name contains ``search`` (case-insensitive), of one group
        (default: every group the caller sees), in one status (default: all but
        deleted), only the caller's (``mine``), with deleted ones (``include_deleted``)."""
        request = pb.ListDeploymentsRequest(
            search=search,
            group=group,
            status=status_value(status),
            mine=mine,
            include_deleted=include_deleted,
        )
        reply: pb.ListDeploymentsResponse = self._transport.call(
            SERVICE, "ListDeployments", self._stub().ListDeployments, request
        )
        return [DeploymentView.from_proto(d) for d in reply.deployments]

    def history(self, name: str) -> builtins.list[HistoryEntryView]:
        """A deployment's history, one row per revision or action, newest first."""
        reply: pb.History = self._transport.call(
            SERVICE, "GetHistory", self._stub().GetHistory, pb.DeploymentRef(name=name)
        )
        return [HistoryEntryView.from_proto(e) for e in reply.entries]

    def instances(self, name: str, limit: int = MAX_INSTANCES) -> builtins.list[InstanceView]:
        """A deployment's last ``limit`` instances (at most 200), newest first."""
        reply: pb.ListInstancesResponse = self._transport.call(
            SERVICE,
            "ListInstances",
            self._stub().ListInstances,
            pb.ListInstancesRequest(name=name, limit=limit),
        )
        return [InstanceView.from_proto(i) for i in reply.instances]

    # Logs (the logging service; see shipyard.client.logs).

    def logs(
        self,
        name: str,
        *,
        instance: str | None = None,
        tail: int = DEFAULT_TAIL,
        since: When = None,
        until: When = None,
        grep: str | None = None,
    ) -> builtins.list[LogLine]:
        """The last ``tail`` lines (default 2000) of a deployment or one of its
        instances, oldest first (see :meth:`shipyard.client.logs.LogsClient.tail`)."""
        return self._logs.tail(
            name, instance=instance, tail=tail, since=since, until=until, grep=grep
        )

    def follow_logs(
        self,
        name: str,
        *,
        instance: str | None = None,
        tail: int = 10,
        since: When = None,
        grep: str | None = None,
    ) -> Iterator[LogLine]:
        """The last ``tail`` lines, then every new line as it arrives, until the caller
        stops iterating."""
        return self._logs.follow(name, instance=instance, tail=tail, since=since, grep=grep)

    def download_logs(self, name: str, instance: str, path: str | os.PathLike[str]) -> int:
        """Writes the whole stored log of one instance to ``path``; returns its lines."""
        return self._logs.download(name, instance, path)

    def metrics(
        self, name: str, *, since: When = None, until: When = None, step_minutes: int = 0
    ) -> DeploymentMetrics:
        """QPS, success and error rates, latency percentiles over a range (default: the
        last hour; see :meth:`shipyard.client.metrics.MetricsClient.get`)."""
        return self._metrics.get(name, since=since, until=until, step_minutes=step_minutes)

    def get_readme(self, name: str) -> DeploymentReadme:
        """A deployment's readme with who changed it last and when."""
        reply: pb.Readme = self._transport.call(
            SERVICE, "GetReadme", self._stub().GetReadme, pb.DeploymentRef(name=name)
        )
        return DeploymentReadme.from_proto(reply)

    def readme(self, name: str) -> str:
        """A deployment's readme (Markdown; empty when it has none)."""
        return self.get_readme(name).markdown

    def set_readme(self, name: str, markdown: str) -> DeploymentReadme:
        """Replaces a deployment's readme (GitHub-flavoured Markdown)."""
        reply: pb.Readme = self._transport.call(
            SERVICE,
            "SetReadme",
            self._stub().SetReadme,
            pb.SetReadmeRequest(name=name, markdown=markdown),
        )
        return DeploymentReadme.from_proto(reply)

    def wait(
        self,
        name: str,
        status: str = "deployed",
        *,
        timeout: float | None = DEFAULT_WAIT_TIMEOUT,
        after: DeploymentView | None = None,
        on_change: Callable[[DeploymentView], None] | None = None,
    ) -> DeploymentView:
        """Polls the deployment until its status is ``status`` and returns it, calling
        ``on_change(deployment)`` whenever its status, message or replica counts change.

        Raises :class:`DeploymentFailed` (with the deployment's message) when it turns
        ``failed`` (unless that is what is awaited), :class:`FailedPrecondition` when it
        is ``stopped`` or ``deleted`` and so will not get to ``deploying``/``deployed``,
        and :class:`DeadlineExceeded` after ``timeout`` seconds (``None``: no limit).

        Pass the result of the command just made as ``after`` (``wait(name,
        after=client.deployments.update(...))``): for a few seconds, answers that
        predate it (an older revision or update time, or "not found" right after a
        create) are taken for the read model catching up, not for the outcome.
        """
        if status not in DEPLOYMENT_STATUSES:
            raise _unknown_status(status)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        pause = _FIRST_POLL
        seen: tuple[str, str, int, int] | None = None
        current: DeploymentView | None = None
        while True:
            catching_up = after is not None and time.monotonic() - started < _CATCH_UP_SECONDS
            try:
                current = self.get(name)
            except NotFound:
                if not catching_up:
                    raise
            else:
                if not (catching_up and _older(current, after)):
                    key = (
                        current.status,
                        current.message,
                        current.ready_replicas,
                        current.replicas,
                    )
                    if key != seen:
                        seen = key
                        if on_change is not None:
                            on_change(current)
                    if current.status == status:
                        return current
                    _check_reachable(current, status)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                where = f"still {current.status}" if current is not None else "not found"
                raise DeadlineExceeded(
                    f"deployment {name} is {where}, not {status}, after {timeout or 0:g}s",
                    service=SERVICE,
                    method="GetDeployment",
                    hint=f"it goes on: `shipyard deploy show {name}`",
                )
            sleep = pause if deadline is None else min(pause, max(deadline - now, 0.0))
            time.sleep(sleep)
            pause = min(pause * 1.5, _MAX_POLL)

    # Predictions.

    def gateway_url(self) -> str:
        """Base URL of the gateway's REST data plane (see
        :meth:`~shipyard.client.config.ClientConfig.gateway_url`)."""
        return self._config.gateway_url()

    def predict_url(self, name: str) -> str:
        """The full URL of a deployment's raw JSON prediction route."""
        return predict_url(name, self.gateway_url())

    def predict(
        self,
        deployment: str,
        payload: Any,
        *,
        token: str | None = None,
        gateway_url: str | None = None,
        timeout: float = DEFAULT_PREDICT_TIMEOUT,
    ) -> Any:
        """Sends ``payload`` (JSON) to a deployment through the gateway and returns its
        JSON answer; see :func:`predict`. ``token`` defaults to the client's token (sent
        as ``Authorization: Bearer`` when there is one); pass a client key for a private
        deployment of someone else's group."""
        if token is None:
            # The transport holds the client's token; its metadata is the bearer header.
            header = dict(self._transport.metadata()).get("authorization", "")
            token = header.removeprefix("Bearer ")
        return predict(
            deployment,
            payload,
            token=token,
            gateway_url=gateway_url or self.gateway_url(),
            timeout=timeout,
            config=self._config,
        )


# ``client.deployments`` is a DeploymentsClient; the short name reads well in notebooks.
Deployments = DeploymentsClient


def _older(current: DeploymentView, after: DeploymentView | None) -> bool:
    """Whether ``current`` predates the command that returned ``after``."""
    if after is None:
        return False
    if current.revision < after.revision:
        return True
    return (
        current.updated_at is not None
        and after.updated_at is not None
        and current.updated_at < after.updated_at
    )


def _check_reachable(current: DeploymentView, wanted: str) -> None:
    """Raises when ``current`` will not turn ``wanted`` by itself."""
    if current.status == "failed":
        raise DeploymentFailed(current)
    if current.status in ("stopped", "deleted") and wanted in ("deploying", "deployed"):
        how = (
            f"start it with `shipyard deploy start {current.name}`"
            if current.status == "stopped"
            else "it was deleted"
        )
        raise FailedPrecondition(
            f"deployment {current.name} is {current.status}, so it will not become {wanted}",
            service=SERVICE,
            method="GetDeployment",
            hint=how,
        )
