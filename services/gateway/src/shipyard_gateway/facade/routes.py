"""THE route table of the REST facade: every operation, its gRPC method, and where each
request field comes from (path, query or body).

The aiohttp routes (:mod:`shipyard_gateway.facade.app`) and the OpenAPI document
(:mod:`shipyard_gateway.facade.openapi`) are both generated from :data:`ROUTES`, and the
request and response types come from the gRPC method descriptors, so neither the routes
nor the published schemas can drift from what is served.

Paths are relative to the facade's mount point (``/api/v1``) and use the same ``{param}``
template syntax in aiohttp and OpenAPI. Actions on a deployment use the ``name:verb``
custom-method style (``POST /deployments/iris:stop``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from shipyard.imagebuild.v1 import imagebuild_pb2
from shipyard.keys.v1 import client_keys_pb2, identity_pb2
from shipyard.logging.v1 import logging_pb2, metrics_pb2
from shipyard.quota.v1 import quota_pb2
from shipyard.scheduler.v1 import scheduler_pb2

__all__ = [
    "BACKENDS",
    "ROUTES",
    "Backend",
    "Body",
    "Param",
    "Route",
    "RouteKind",
]


@dataclass(frozen=True)
class Backend:
    """A gRPC service the facade calls, and which address (settings field without the
    ``_addr`` suffix) serves it."""

    address: Literal["keys", "quota", "imagebuild", "scheduler", "logging"]
    service: ServiceDescriptor

    @property
    def label(self) -> str:
        """How error messages name the service."""
        return self.address


IDENTITY = Backend("keys", identity_pb2.DESCRIPTOR.services_by_name["IdentityService"])
CLIENT_KEYS = Backend("keys", client_keys_pb2.DESCRIPTOR.services_by_name["ClientKeyService"])
QUOTA = Backend("quota", quota_pb2.DESCRIPTOR.services_by_name["QuotaService"])
IMAGEBUILD = Backend("imagebuild", imagebuild_pb2.DESCRIPTOR.services_by_name["ImageBuildService"])
SCHEDULER = Backend("scheduler", scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"])

LOGS = Backend("logging", logging_pb2.DESCRIPTOR.services_by_name["LogService"])
METRICS = Backend("logging", metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"])

BACKENDS = (IDENTITY, CLIENT_KEYS, QUOTA, IMAGEBUILD, SCHEDULER, LOGS, METRICS)

OPTIONAL_ADDRESSES = frozenset({"logging"})
"""Services the facade can do without: their routes are left out (not served, not
documented) when no address is given."""


@dataclass(frozen=True)
class Param:
    """A path or query parameter. ``field`` is the dotted request field it sets; without
    one, ``schema`` says what it is and the route's ``prepare`` uses it."""

    name: str
    location: Literal["path", "query"]
    description: str
    field: str = ""
    schema: Mapping[str, Any] | None = None
    required: bool = False
    """Query parameters only (path parameters always are)."""
    example: Any = None
    """A realistic value for the document (schemathesis tries it first)."""


@dataclass(frozen=True)
class Body:
    """The JSON request body: the whole request message (``field`` empty) or one of its
    message fields, minus the ``exclude``d fields (which come from the path)."""

    field: str = ""
    exclude: tuple[str, ...] = ()
    description: str = ""
    example: Mapping[str, Any] | None = None


RouteKind = Literal["unary", "build_logs", "log_lines", "upload", "openapi"]


@dataclass(frozen=True)
class Route:
    """One REST operation over one gRPC method.

    ``kind``: ``unary`` (the generic translation), ``build_logs`` (a server stream
    collected into one JSON answer), ``upload`` (the request body streamed to a
    client-streaming method), ``openapi`` (the document itself, no backend).
    """

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    backend: Backend | None
    rpc: str = ""
    params: tuple[Param, ...] = ()
    body: Body | None = None
    status: int = 200
    description: str = ""
    prepare: Callable[[Message, Mapping[str, Any]], None] | None = None
    """Sets request fields that are no single parameter (e.g. ``image`` = name:version)."""
    location: str = ""
    """For 201: the dotted response field whose value, appended to the request path,
    gives the ``Location`` of the created resource."""
    kind: RouteKind = "unary"
    public: bool = False
    """Needs no bearer token (only the document)."""


# --- parameters used more than once ----------------------------------------------------------

_DEPLOYMENT = Param("name", "path", "The deployment's name.", "name", example="iris-prod")
_DEPLOYMENT_REF = Param("name", "path", "The deployment's name.", "deployment", example="iris-prod")
_IMAGE_NAME = Param(
    "name",
    "path",
    "The image's name (without version).",
    schema={"type": "string", "minLength": 1},
    example="iris",
)
_VERSION_SCHEMA = {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}  # int32 in the API
_IMAGE_VERSION = Param("version", "path", "The image version.", schema=_VERSION_SCHEMA, example=1)
_IMAGE_GROUP = Param(
    "group",
    "query",
    "The group owning the image; empty or absent: the caller's only group.",
    "group",
)
_BUILD_ID = Param("build_id", "path", "The build's id.", "build_id")


def _image_ref(request: Message, params: Mapping[str, Any]) -> None:
    # The gRPC API takes "name" (the latest version) or "name:version" in one field.
    version = params.get("version")
    image = params["name"] if version is None else f"{params['name']}:{version}"
    request.image = image  # type: ignore[attr-defined]


_TIME = {"type": "string", "format": "date-time"}


def _times(prefix: str) -> Callable[[Message, Mapping[str, Any]], None]:
    """Sets ``<prefix>since`` / ``<prefix>until`` (Timestamps) from the RFC 3339 query
    parameters of the same names (the schema checked them; no offset means UTC)."""

    def prepare(request: Message, params: Mapping[str, Any]) -> None:
        for name in ("since", "until"):
            if params.get(name):
                moment = datetime.fromisoformat(str(params[name]))
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)
                target: Any = request
                for part in (prefix + name).split("."):
                    target = getattr(target, part)
                target.FromDatetime(moment)

    return prepare


_ADMIN = "Admins only."
_MEMBERS = "Members of the deployment's group, and admins."

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/openapi.json",
        "getOpenApi",
        "This OpenAPI document",
        "meta",
        None,
        kind="openapi",
        public=True,
    ),
    # --- identity (keys) ---------------------------------------------------------------
    Route(
        "GET", "/me", "whoAmI", "Who the bearer token belongs to", "identity", IDENTITY, "WhoAmI"
    ),
    Route(
        "GET",
        "/groups",
        "listGroups",
        "Groups: every group for admins, the caller's own otherwise",
        "identity",
        IDENTITY,
        "ListGroups",
    ),
    # --- deployments (scheduler) -------------------------------------------------------
    Route(
        "GET",
        "/deployments",
        "listDeployments",
        "List deployments the caller may see",
        "deployments",
        SCHEDULER,
        "ListDeployments",
        params=(
            Param("search", "query", "Substring of the name, case-insensitive.", "search"),
            Param("group", "query", "Only this group's deployments.", "group"),
            Param("status", "query", "Only deployments in this status.", "status"),
            Param("mine", "query", "Only deployments the caller created.", "mine"),
            Param("include_deleted", "query", "Include deleted deployments.", "include_deleted"),
        ),
    ),
    Route(
        "POST",
        "/deployments",
        "createDeployment",
        "Create a deployment",
        "deployments",
        SCHEDULER,
        "CreateDeployment",
        body=Body(
            description="The deployment. `group` empty: the caller's only group; "
            "`spec.access` absent: private.",
            example={
                "name": "iris-prod",
                "spec": {
                    "image": "iris:1",
                    "instance_type": "cpu.small",
                    "scaling": {"min_replicas": 1, "max_replicas": 2},
                },
            },
        ),
        status=201,
        location="name",
        description="Reserves the quota first; a refusal (409 RESOURCE_EXHAUSTED) says what "
        "is needed and what is free. The answer comes before the instances are ready: "
        "poll `GET /deployments/{name}` until `status` is `deployed`.",
    ),
    Route(
        "GET",
        "/deployments/{name}",
        "getDeployment",
        "Show a deployment",
        "deployments",
        SCHEDULER,
        "GetDeployment",
        params=(_DEPLOYMENT,),
    ),
    Route(
        "PATCH",
        "/deployments/{name}",
        "updateDeployment",
        "Update a deployment (a new revision, rolled out without downtime)",
        "deployments",
        SCHEDULER,
        "UpdateDeployment",
        params=(_DEPLOYMENT,),
        body=Body(
            exclude=("name",),
            description="Fields left out keep their value; `metadata` is merged "
            "(`clear_metadata` empties it first); `set_description` sets an empty one.",
        ),
    ),
    Route(
        "DELETE",
        "/deployments/{name}",
        "deleteDeployment",
        "Stop and remove a deployment (its history stays readable)",
        "deployments",
        SCHEDULER,
        "DeleteDeployment",
        params=(_DEPLOYMENT,),
    ),
    Route(
        "POST",
        "/deployments/{name}:stop",
        "stopDeployment",
        "Stop every instance and release the quota, keeping the definition",
        "deployments",
        SCHEDULER,
        "StopDeployment",
        params=(_DEPLOYMENT,),
    ),
    Route(
        "POST",
        "/deployments/{name}:start",
        "startDeployment",
        "Reserve the quota again and start the current revision",
        "deployments",
        SCHEDULER,
        "StartDeployment",
        params=(_DEPLOYMENT,),
    ),
    Route(
        "POST",
        "/deployments/{name}:scale",
        "scaleDeployment",
        "Set a fixed replica count (min = max) or an autoscaled range",
        "deployments",
        SCHEDULER,
        "ScaleDeployment",
        params=(_DEPLOYMENT,),
        body=Body(
            field="scaling",
            description="min_replicas 0: scale to zero when idle.",
            example={"min_replicas": 0, "max_replicas": 2},
        ),
    ),
    Route(
        "GET",
        "/deployments/{name}/history",
        "getDeploymentHistory",
        "One entry per revision or action, newest first",
        "deployments",
        SCHEDULER,
        "GetHistory",
        params=(_DEPLOYMENT,),
    ),
    Route(
        "GET",
        "/deployments/{name}/instances",
        "listDeploymentInstances",
        "The last instances of a deployment (at most 200), newest first",
        "deployments",
        SCHEDULER,
        "ListInstances",
        params=(
            _DEPLOYMENT,
            Param("limit", "query", "At most this many (0 or absent: 200).", "limit"),
        ),
    ),
    Route(
        "GET",
        "/deployments/{name}/readme",
        "getDeploymentReadme",
        "A deployment's readme (Markdown)",
        "deployments",
        SCHEDULER,
        "GetReadme",
        params=(_DEPLOYMENT,),
    ),
    Route(
        "PUT",
        "/deployments/{name}/readme",
        "setDeploymentReadme",
        "Replace a deployment's readme",
        "deployments",
        SCHEDULER,
        "SetReadme",
        params=(_DEPLOYMENT,),
        body=Body(exclude=("name",), description="GitHub-flavoured Markdown."),
    ),
    # --- client keys (keys) ------------------------------------------------------------
    Route(
        "GET",
        "/deployments/{name}/keys",
        "listClientKeys",
        "A deployment's client keys (never their secrets)",
        "keys",
        CLIENT_KEYS,
        "ListClientKeys",
        params=(
            _DEPLOYMENT_REF,
            Param("include_revoked", "query", "Include revoked keys.", "include_revoked"),
        ),
        description=_MEMBERS,
    ),
    Route(
        "POST",
        "/deployments/{name}/keys",
        "createClientKey",
        "Create a client key; the secret is in this answer only",
        "keys",
        CLIENT_KEYS,
        "CreateClientKey",
        params=(_DEPLOYMENT_REF,),
        body=Body(
            exclude=("deployment",), description="The client's name.", example={"client": "shop"}
        ),
        status=201,
        location="key.client",
        description=_MEMBERS + " Store `secret` now: it is shown once and stored hashed.",
    ),
    Route(
        "DELETE",
        "/deployments/{name}/keys/{client}",
        "revokeClientKey",
        "Revoke a client's key (the gateway refuses it within a second)",
        "keys",
        CLIENT_KEYS,
        "RevokeClientKey",
        params=(
            _DEPLOYMENT_REF,
            Param("client", "path", "The client's name.", "client", example="shop"),
        ),
        description=_MEMBERS,
    ),
    # --- images and builds (imagebuild) ------------------------------------------------
    Route(
        "GET",
        "/images",
        "listImages",
        "List image versions",
        "images",
        IMAGEBUILD,
        "ListImages",
        params=(
            Param("group", "query", "Only this group's images (absent: every group).", "group"),
            Param("name", "query", "Only the versions of this image.", "name"),
        ),
    ),
    Route(
        "GET",
        "/images/{name}",
        "getImage",
        "Show an image's latest version, or the one asked for",
        "images",
        IMAGEBUILD,
        "GetImage",
        params=(
            _IMAGE_NAME,
            Param(
                "version",
                "query",
                "The version (absent: the latest).",
                schema=_VERSION_SCHEMA,
            ),
            _IMAGE_GROUP,
        ),
        prepare=_image_ref,
    ),
    Route(
        "GET",
        "/images/{name}/{version}",
        "getImageVersion",
        "Show one image version",
        "images",
        IMAGEBUILD,
        "GetImage",
        params=(_IMAGE_NAME, _IMAGE_VERSION, _IMAGE_GROUP),
        prepare=_image_ref,
    ),
    Route(
        "DELETE",
        "/images/{name}/{version}",
        "deleteImageVersion",
        "Delete an image version (refused while a deployment uses it)",
        "images",
        IMAGEBUILD,
        "DeleteImage",
        params=(_IMAGE_NAME, _IMAGE_VERSION, _IMAGE_GROUP),
        prepare=_image_ref,
        status=204,
    ),
    Route(
        "GET",
        "/images/{name}/{version}/usage",
        "getImageUsage",
        "Which deployments use an image version",
        "images",
        IMAGEBUILD,
        "GetImageUsage",
        params=(_IMAGE_NAME, _IMAGE_VERSION, _IMAGE_GROUP),
        prepare=_image_ref,
    ),
    Route(
        "GET",
        "/images/{name}/{version}/readme",
        "getImageReadme",
        "An image version's readme (Markdown)",
        "images",
        IMAGEBUILD,
        "GetReadme",
        params=(_IMAGE_NAME, _IMAGE_VERSION, _IMAGE_GROUP),
        prepare=_image_ref,
    ),
    Route(
        "PUT",
        "/images/{name}/{version}/readme",
        "setImageReadme",
        "Replace an image version's readme",
        "images",
        IMAGEBUILD,
        "SetReadme",
        params=(_IMAGE_NAME, _IMAGE_VERSION, _IMAGE_GROUP),
        body=Body(exclude=("group", "image"), description="GitHub-flavoured Markdown."),
        prepare=_image_ref,
    ),
    Route(
        "GET",
        "/builds",
        "listBuilds",
        "List builds, newest first",
        "images",
        IMAGEBUILD,
        "ListBuilds",
        params=(
            Param("group", "query", "Only this group's builds (absent: every group).", "group"),
            Param("name", "query", "Only builds of this image name.", "name"),
            Param("limit", "query", "At most this many (0 or absent: 50).", "limit"),
        ),
    ),
    Route(
        "POST",
        "/builds",
        "startBuild",
        "Upload a model folder (a gzipped tar) and queue its build",
        "images",
        IMAGEBUILD,
        "StartBuild",
        params=(
            Param("name", "query", "The image name.", "header.name", required=True, example="iris"),
            Param(
                "group", "query", "The owning group; absent: the caller's only one.", "header.group"
            ),
            Param(
                "python",
                "query",
                "Python version (overrides shipyard.yaml).",
                "header.options.python",
            ),
            Param(
                "skip_dependency_install",
                "query",
                "Record the requirements without installing or checking them (offline sites).",
                "header.options.skip_dependency_install",
            ),
            Param(
                "source_name",
                "query",
                "Where the folder came from (e.g. ./examples/iris), for the record.",
                "header.source_name",
            ),
        ),
        status=202,
        kind="upload",
        location="build_id",
        description="The body is the model folder as a gzipped tar (`tar czf - -C ./iris .`), "
        "streamed to imagebuild as it arrives; its size limit is imagebuild's "
        "(SHIPYARD_MAX_UPLOAD_BYTES). The answer is the queued build (202): poll "
        "`GET /builds/{build_id}` until `state` is `succeeded` or `failed`. Identical "
        "inputs answer at once from the cache (`cache_hit`).",
    ),
    Route(
        "GET",
        "/builds/{build_id}",
        "getBuild",
        "Show a build",
        "images",
        IMAGEBUILD,
        "GetBuild",
        params=(_BUILD_ID,),
    ),
    Route(
        "GET",
        "/builds/{build_id}/logs",
        "getBuildLogs",
        "A build's log so far",
        "images",
        IMAGEBUILD,
        "StreamBuildLogs",
        params=(_BUILD_ID,),
        kind="build_logs",
        description="The lines logged so far (no following: poll, or use the gRPC API).",
    ),
    # --- logs and metrics (logging) -------------------------------------------------------
    Route(
        "GET",
        "/deployments/{name}/logs",
        "getDeploymentLogs",
        "The last lines of a deployment's instances (default 2000), oldest first",
        "deployments",
        LOGS,
        "TailLogs",
        params=(
            Param("name", "path", "The deployment's name.", "filter.deployment", example="iris"),
            Param(
                "instance",
                "query",
                "Only this instance (replica); absent: every instance.",
                "filter.instance",
            ),
            Param("since", "query", "Only lines from this time (RFC 3339).", schema=_TIME),
            Param("until", "query", "Only lines up to this time (RFC 3339).", schema=_TIME),
            Param("grep", "query", "Only lines containing this text (any case).", "filter.grep"),
            Param("limit", "query", "At most this many lines (absent: 2000).", "limit"),
        ),
        prepare=_times("filter."),
        kind="log_lines",
        description=_MEMBERS + " Following and downloading whole logs: the gRPC API or "
        "`shipyard deploy logs --follow | --download`.",
    ),
    Route(
        "GET",
        "/deployments/{name}/log-sources",
        "listDeploymentLogSources",
        "The instances with stored logs, and how many lines each",
        "deployments",
        LOGS,
        "ListLogSources",
        params=(_DEPLOYMENT_REF,),
        description=_MEMBERS,
    ),
    Route(
        "GET",
        "/deployments/{name}/metrics",
        "getDeploymentMetrics",
        "Requests, success rate, 4xx/5xx rates and latency percentiles over a time range",
        "deployments",
        METRICS,
        "GetMetrics",
        params=(
            _DEPLOYMENT_REF,
            Param("since", "query", "From (RFC 3339; absent: 1 hour before until).", schema=_TIME),
            Param("until", "query", "Until (RFC 3339; absent: now).", schema=_TIME),
            Param(
                "step_minutes",
                "query",
                "Width of each point of the series (absent: at most 60 points).",
                "step_minutes",
            ),
        ),
        prepare=_times(""),
        description=_MEMBERS + " Kept 3 days.",
    ),
    # --- quotas and instance types (quota) ---------------------------------------------
    Route(
        "GET",
        "/quotas",
        "listQuotas",
        "Quota and usage of every group the caller may see",
        "quotas",
        QUOTA,
        "ListGroupUsage",
    ),
    Route(
        "GET",
        "/quotas/{group}",
        "getQuota",
        "A group's quota, usage and reservations",
        "quotas",
        QUOTA,
        "GetGroupUsage",
        params=(Param("group", "path", "The group.", "group", example="team-a"),),
        description="Members of the group, and admins.",
    ),
    Route(
        "PUT",
        "/quotas/{group}",
        "setQuota",
        "Set a group's quota",
        "quotas",
        QUOTA,
        "SetGroupQuota",
        params=(Param("group", "path", "The group.", "group", example="team-a"),),
        body=Body(
            field="limits",
            description="The limits (absent fields: 0).",
            example={"cpu": 8, "memory_gib": 16, "instances": 4},
        ),
        description=_ADMIN,
    ),
    Route(
        "GET",
        "/instance-types",
        "listInstanceTypes",
        "The instance-type catalog",
        "quotas",
        QUOTA,
        "ListInstanceTypes",
    ),
    Route(
        "PUT",
        "/instance-types/{name}",
        "setInstanceType",
        "Create or replace an instance type",
        "quotas",
        QUOTA,
        "SetInstanceType",
        params=(
            Param(
                "name",
                "path",
                "The instance type.",
                "instance_type.name",
                example="cpu.small",
            ),
        ),
        body=Body(
            field="instance_type",
            exclude=("name",),
            description="Its resources.",
            example={"cpu": 0.5, "memory_gib": 1, "description": "half a core"},
        ),
        description=_ADMIN,
    ),
)
"""Every operation the facade serves, in the order of the document."""
