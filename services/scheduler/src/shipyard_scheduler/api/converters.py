"""Views ↔ protobuf for the SchedulerService."""

from __future__ import annotations

from typing import Any

from shipyard.scheduler.v1 import scheduler_pb2 as pb
from shipyard_core.errors import InvalidArgument
from shipyard_core.grpckit.convert import to_timestamp
from shipyard_scheduler.app.commands import Scaling, SpecChange
from shipyard_scheduler.app.views import (
    DeploymentView,
    HistoryView,
    InstanceView,
    ReadmeView,
    RouteView,
)

STATUS = {
    "deploying": pb.DEPLOYMENT_STATUS_DEPLOYING,
    "deployed": pb.DEPLOYMENT_STATUS_DEPLOYED,
    "failed": pb.DEPLOYMENT_STATUS_FAILED,
    "stopped": pb.DEPLOYMENT_STATUS_STOPPED,
    "deleted": pb.DEPLOYMENT_STATUS_DELETED,
}
STATUS_NAMES: dict[int, str] = {int(v): k for k, v in STATUS.items()}
INSTANCE_STATUS = {
    "pending": pb.INSTANCE_STATUS_PENDING,
    "starting": pb.INSTANCE_STATUS_STARTING,
    "ready": pb.INSTANCE_STATUS_READY,
    "failed": pb.INSTANCE_STATUS_FAILED,
    "terminated": pb.INSTANCE_STATUS_TERMINATED,
}
ACCESS = {"private": pb.ACCESS_PRIVATE, "public": pb.ACCESS_PUBLIC}
ACCESS_NAMES: dict[int, str] = {int(v): k for k, v in ACCESS.items()}


def scaling_in(msg: pb.Scaling, present: bool) -> Scaling | None:
    """A request's scaling (None when the field was not sent)."""
    if not present:
        return None
    return Scaling(msg.min_replicas, msg.max_replicas, msg.target_inflight)


def access_in(value: int) -> str | None:
    """A request's access (None: unspecified)."""
    if value == pb.ACCESS_UNSPECIFIED:
        return None
    if value not in ACCESS_NAMES:
        raise InvalidArgument("access", f"{value} is not an access mode", "use private or public")
    return ACCESS_NAMES[value]


def create_change(spec: pb.DeploymentSpec) -> SpecChange:
    """A create request's spec."""
    return SpecChange(
        image=spec.image,
        instance_type=spec.instance_type,
        scaling=scaling_in(spec.scaling, spec.HasField("scaling")),
        access=access_in(spec.access),
        description=spec.description,
        metadata=dict(spec.metadata),
    )


def update_change(req: pb.UpdateDeploymentRequest) -> SpecChange:
    """An update request's changes."""
    return SpecChange(
        image=req.image or None,
        instance_type=req.instance_type or None,
        scaling=scaling_in(req.scaling, req.HasField("scaling")),
        access=access_in(req.access),
        description=req.description if (req.description or req.set_description) else None,
        metadata=dict(req.metadata),
        clear_metadata=req.clear_metadata,
    )


def _scaling(spec: dict[str, Any]) -> pb.Scaling:
    return pb.Scaling(
        min_replicas=int(spec.get("min_replicas", 0)),
        max_replicas=int(spec.get("max_replicas", 0)),
        target_inflight=int(spec.get("target_inflight", 0)),
    )


def _image(spec: dict[str, Any]) -> pb.ImageRef:
    return pb.ImageRef(
        name=str(spec.get("image_name", "")),
        version=int(spec.get("image_version", 0)),
        digest=str(spec.get("image_digest", "")),
        kind=str(spec.get("image_kind") or "pack"),
        reference=str(spec.get("image_ref", "")),
    )


def deployment_out(v: DeploymentView) -> pb.Deployment:
    """A deployment."""
    return pb.Deployment(
        name=v.name,
        group=v.group,
        revision=v.revision,
        active_revision=v.active_revision,
        image=_image(v.spec),
        instance_type=str(v.spec.get("instance_type", "")),
        scaling=pb.Scaling(
            min_replicas=v.min_replicas,
            max_replicas=v.max_replicas,
            target_inflight=v.target_inflight,
        ),
        replicas=v.replicas,
        ready_replicas=v.ready_replicas,
        access=ACCESS.get(str(v.spec.get("access")), pb.ACCESS_PRIVATE),
        description=str(v.spec.get("description", "")),
        metadata=dict(v.spec.get("metadata") or {}),
        status=STATUS.get(v.status, pb.DEPLOYMENT_STATUS_UNSPECIFIED),
        message=v.message,
        created_by=v.created_by,
        created_at=to_timestamp(v.created_at),
        updated_by=v.updated_by,
        updated_at=to_timestamp(v.updated_at),
        endpoint=v.endpoint,
    )


def history_out(name: str, entries: list[HistoryView]) -> pb.History:
    """A deployment's history."""
    return pb.History(
        name=name,
        entries=[
            pb.HistoryEntry(
                revision=e.revision,
                action=e.action,
                actor=e.actor,
                at=to_timestamp(e.at),
                stopped=e.stopped,
                image=_image(e.spec),
                scaling=_scaling(e.spec),
                group=e.group,
                instance_type=str(e.spec.get("instance_type", "")),
                description=str(e.spec.get("description", "")),
                message=e.message,
                metadata=dict(e.spec.get("metadata") or {}),
                access=ACCESS.get(str(e.spec.get("access")), pb.ACCESS_PRIVATE),
            )
            for e in entries
        ],
    )


def instance_out(v: InstanceView) -> pb.Instance:
    """An instance."""
    return pb.Instance(
        instance_id=v.instance_id,
        deployment=v.deployment,
        revision=v.revision,
        status=INSTANCE_STATUS.get(v.status, pb.INSTANCE_STATUS_UNSPECIFIED),
        address=v.address,
        restarts=v.restarts,
        message=v.message,
        created_at=to_timestamp(v.created_at),
        ready_at=to_timestamp(v.ready_at),
        ended_at=to_timestamp(v.ended_at),
        backend=v.backend,
    )


def readme_out(v: ReadmeView) -> pb.Readme:
    """A readme."""
    return pb.Readme(
        name=v.name,
        markdown=v.markdown,
        updated_by=v.updated_by,
        updated_at=to_timestamp(v.updated_at),
    )


def route_out(v: RouteView | None) -> pb.RouteUpdate:
    """A route update (None: the initial table is complete)."""
    if v is None:
        return pb.RouteUpdate(synced=True)
    return pb.RouteUpdate(
        deployment=v.deployment,
        group=v.group,
        access=ACCESS.get(v.access, pb.ACCESS_PRIVATE),
        revision=v.revision,
        addresses=v.addresses,
        scaled_to_zero=v.scaled_to_zero,
        stopped=v.stopped,
        removed=v.removed,
    )
