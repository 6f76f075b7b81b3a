"""Reads of the deployments projection: deployments, history, instances, readmes and the
gateway's routes. A caller sees only the deployments of its groups (admins: all); one of
another group is reported as not existing rather than forbidden, so names do not leak."""

from __future__ import annotations

from typing import Any

import asyncpg

from shipyard_core.auth import Principal
from shipyard_core.errors import InvalidArgument, NotFound
from shipyard_scheduler.app.views import (
    DeploymentView,
    HistoryView,
    InstanceView,
    ReadmeView,
    RouteView,
)
from shipyard_scheduler.projections import DeploymentsProjection

STATUSES = ("deploying", "deployed", "failed", "stopped", "deleted")
MAX_INSTANCES = 200

_T = DeploymentsProjection.live_tables()
_DEPLOYMENT_SQL = (
    f"SELECT d.*, (SELECT count(*) FROM {_T['instances']} i WHERE i.deployment = d.name "
    "AND i.revision = d.active_revision AND i.status = 'ready') AS ready_replicas "
    f"FROM {_T['deployments']} d"
)


def not_found(name: str) -> NotFound:
    """The one message for a deployment that does not exist or is not the caller's."""
    return NotFound(f"deployment {name!r} does not exist; see `shipyard deploy list`")


class DeploymentQueries:
    """Reads for the API (with permission checks) and for the reconciler (without)."""

    def __init__(self, pool: asyncpg.Pool, gateway_url: str) -> None:
        self.pool = pool
        self.gateway_url = gateway_url.rstrip("/")

    async def image_digests_in_use(self) -> frozenset[str]:
        """The image digests of every deployment that is not deleted, at its newest and
        its active revision (stopped and scaled-to-zero ones included: they start again)."""
        rows = await self.pool.fetch(
            f"SELECT DISTINCT r.spec->>'image_digest' AS digest FROM {_T['revisions']} r "
            f"JOIN {_T['deployments']} d ON d.name = r.name "
            "WHERE d.status <> 'deleted' AND r.revision IN (d.revision, d.active_revision)"
        )
        return frozenset(r["digest"] for r in rows if r["digest"])

    def _view(self, r: asyncpg.Record) -> DeploymentView:
        return DeploymentView(
            name=r["name"],
            group=r["group_name"],
            status=r["status"],
            message=r["message"],
            revision=r["revision"],
            active_revision=r["active_revision"],
            spec=dict(r["spec"]),
            replicas=r["replicas"],
            ready_replicas=int(r["ready_replicas"]),
            min_replicas=r["min_replicas"],
            max_replicas=r["max_replicas"],
            target_inflight=r["target_inflight"],
            created_by=r["created_by"],
            created_at=r["created_at"],
            updated_by=r["updated_by"],
            updated_at=r["updated_at"],
            endpoint=f"{self.gateway_url}/deployments/{r['name']}/predict",
        )

    async def _row(self, caller: Principal, name: str) -> asyncpg.Record:
        row = await self.pool.fetchrow(f"{_DEPLOYMENT_SQL} WHERE d.name = $1", name)
        if row is None or not caller.can_see(row["group_name"]):
            raise not_found(name)
        return row

    async def get(
        self, caller: Principal, name: str, *, deleted_ok: bool = False
    ) -> DeploymentView:
        """One deployment (a deleted one only with ``deleted_ok``)."""
        row = await self._row(caller, name)
        if row["status"] == "deleted" and not deleted_ok:
            raise not_found(name)
        return self._view(row)

    async def list_deployments(
        self,
        caller: Principal,
        *,
        search: str = "",
        group: str = "",
        status: str = "",
        mine: bool = False,
        include_deleted: bool = False,
    ) -> list[DeploymentView]:
        """Deployments the caller may see, filtered; newest first."""
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if group:
            caller.require_member(group)
            where.append(f"d.group_name = {arg(group)}")
        elif not caller.admin:
            where.append(f"d.group_name = ANY({arg(sorted(caller.groups))}::text[])")
        if status:
            if status not in STATUSES:
                raise InvalidArgument(
                    "status", f"{status!r} is not a status", f"use one of {', '.join(STATUSES)}"
                )
            where.append(f"d.status = {arg(status)}")
        elif not include_deleted:
            where.append("d.status <> 'deleted'")
        if search:
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append(f"d.name ILIKE {arg('%' + escaped + '%')}")
        if mine:
            where.append(f"d.created_by = {arg(caller.user)}")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self.pool.fetch(
            f"{_DEPLOYMENT_SQL}{clause} ORDER BY d.created_at DESC, d.name", *args
        )
        return [self._view(r) for r in rows]

    async def history(self, caller: Principal, name: str) -> list[HistoryView]:
        """Every revision and action, newest first (deleted deployments too)."""
        await self._row(caller, name)
        rows = await self.pool.fetch(
            f"SELECT * FROM {_T['history']} WHERE name = $1 ORDER BY seq DESC", name
        )
        return [
            HistoryView(
                revision=r["revision"],
                action=r["action"],
                actor=r["actor"],
                at=r["at"],
                stopped=r["stopped"],
                spec=dict(r["spec"]),
                group=r["group_name"],
                replicas=r["replicas"],
                message=r["message"],
            )
            for r in rows
        ]

    async def instances(
        self, caller: Principal, name: str, limit: int = MAX_INSTANCES
    ) -> list[InstanceView]:
        """The newest ``limit`` (≤ 200) instances (deleted deployments too)."""
        await self._row(caller, name)
        if limit < 0:
            raise InvalidArgument("limit", "must be 0 (all kept, 200) or more")
        limit = min(limit or MAX_INSTANCES, MAX_INSTANCES)
        rows = await self.pool.fetch(
            f"SELECT * FROM {_T['instances']} WHERE deployment = $1 "
            "ORDER BY created_at DESC, instance_id DESC LIMIT $2",
            name,
            limit,
        )
        return [_instance(r) for r in rows]

    async def readme(self, caller: Principal, name: str) -> ReadmeView:
        """The readme."""
        row = await self._row(caller, name)
        return ReadmeView(name, row["readme"], row["readme_updated_by"], row["readme_updated_at"])

    # -- for the gateway (internal) ------------------------------------------------------

    async def routes(self, names: list[str] | None = None) -> list[RouteView]:
        """Routes of the named deployments (all when None); unknown or deleted ones come
        back ``removed``."""
        where = "" if names is None else "WHERE d.name = ANY($1::text[])"
        args: list[Any] = [] if names is None else [names]
        rows = await self.pool.fetch(
            f"SELECT d.name, d.group_name, d.status, d.replicas, d.active_revision, "
            f"d.spec->>'access' AS access, COALESCE(array_agg(i.address ORDER BY i.instance_id) "
            f"FILTER (WHERE i.instance_id IS NOT NULL), '{{}}') AS addresses "
            f"FROM {_T['deployments']} d LEFT JOIN {_T['instances']} i ON i.deployment = d.name "
            "AND i.revision = d.active_revision AND i.status = 'ready' "
            f"{where} GROUP BY d.name",
            *args,
        )
        found = {r["name"]: r for r in rows}
        views = []
        for name in names if names is not None else list(found):
            r = found.get(name)
            if r is None or r["status"] == "deleted":
                views.append(RouteView(deployment=name, removed=True))
                continue
            views.append(
                RouteView(
                    deployment=name,
                    group=r["group_name"],
                    access=r["access"] or "private",
                    revision=r["active_revision"],
                    addresses=list(r["addresses"]),
                    scaled_to_zero=r["replicas"] == 0 and r["status"] != "stopped",
                    stopped=r["status"] == "stopped",
                )
            )
        return views


def _instance(r: asyncpg.Record) -> InstanceView:
    return InstanceView(
        instance_id=r["instance_id"],
        deployment=r["deployment"],
        revision=r["revision"],
        status=r["status"],
        address=r["address"],
        restarts=r["restarts"],
        message=r["message"],
        backend=r["backend"],
        created_at=r["created_at"],
        ready_at=r["ready_at"],
        ended_at=r["ended_at"],
    )
