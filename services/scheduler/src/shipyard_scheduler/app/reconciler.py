"""The reconciler: desired state (the deployments projection) → actual instances (the
runtime backend), and what it sees back → instance and deployment events.

One reconciler leads at a time (a PostgreSQL advisory lock); other scheduler replicas
stand by. Each pass:

1. reads every deployment that should run and the specs of its newest and active
   revisions;
2. asks the backend for what runs (``observe``) and records every change of an
   instance as an event (created, starting, ready, failed, terminated);
3. applies the revisions that should run and removes the rest; a new revision gets
   traffic (``RevisionActivated``) only once its instances are ready, and the old one is
   removed ``drain_seconds`` later (zero-downtime update);
4. concludes: ``deployed`` once the newest revision serves with its target replicas,
   ``failed`` (with the instance's last log lines) when an instance of the newest
   revision crash-loops; a failed revision is removed and the previous one keeps serving;
5. asks the autoscaler for a new target.

It wakes on every change to a deployment or an instance (``pg_notify``) and at least
every ``interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

import asyncpg

from shipyard_core import db
from shipyard_core.aggregate import Repository, retry_on_conflict
from shipyard_core.aio import pause
from shipyard_core.errors import ConcurrencyError
from shipyard_core.eventstore import EventStore
from shipyard_scheduler.adapters.backend import (
    InstancePhase,
    ObservedInstance,
    RevisionSpec,
    RuntimeBackend,
)
from shipyard_scheduler.app.autoscaler import Autoscaler
from shipyard_scheduler.domain import SCHEDULER_EVENTS, Deployment, Instance, Spec, Status
from shipyard_scheduler.projections import ROUTES_CHANNEL, DeploymentsProjection

log = logging.getLogger(__name__)
_T = DeploymentsProjection.live_tables()
LOCK_KEY = "shipyard.scheduler.reconciler"


class Reconciler:
    """Drives a runtime backend toward the deployments' desired state."""

    def __init__(
        self,
        dsn: str,
        pool: asyncpg.Pool,
        store: EventStore,
        backend: RuntimeBackend,
        autoscaler: Autoscaler,
        *,
        interval: float = 0.5,
        max_restarts: int = 3,
        drain_seconds: float = 2.0,
    ) -> None:
        self.dsn = dsn
        self.pool = pool
        self.backend = backend
        self.autoscaler = autoscaler
        self.interval = interval
        self.max_restarts = max_restarts
        self.drain_seconds = drain_seconds
        self.deployments = Repository(store, Deployment, SCHEDULER_EVENTS)
        self.instance_repo = Repository(store, Instance, SCHEDULER_EVENTS)
        self.instances: dict[str, Instance] = {}
        self._removing: dict[str, str] = {}
        self._activated_at: dict[str, float] = {}
        self._wake = asyncio.Event()
        self.leading = False
        self.passes = 0
        backend.on_change(self.wake)

    def wake(self) -> None:
        """Runs a pass soon (a command changed something)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Leads (or stands by) until ``stop``; survives database outages."""
        while not stop.is_set():
            try:
                await self._lead(stop)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("reconciler lost its database connection: %s", exc)
                await pause(stop, 1.0)

    async def _lead(self, stop: asyncio.Event) -> None:
        conn = await db.connect(self.dsn)
        try:
            while not stop.is_set():
                if await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", LOCK_KEY):
                    break
                await pause(stop, 1.0)  # another replica reconciles; stand by
            if stop.is_set():
                return
            await conn.add_listener(ROUTES_CHANNEL, self._on_notify)
            await self.backend.open()
            await self._load_instances()
            self.leading = True
            log.info("reconciler leads (backend %s)", self.backend.name)
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.reconcile_once()
                except ConcurrencyError:
                    continue  # a command changed a deployment meanwhile: look again
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    raise
                except Exception:
                    log.exception("reconcile pass failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                # Our own instance events notify too: a short floor keeps a burst of them
                # from spinning passes.
                await pause(stop, min(0.05, self.interval))
        finally:
            self.leading = False
            with contextlib.suppress(Exception):
                await self.backend.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    def _on_notify(self, *_args: Any) -> None:
        self._wake.set()

    async def _load_instances(self) -> None:
        """The instances the projection thinks are alive, as aggregates (their events are
        written by this leader only, so keeping them in memory is safe)."""
        rows = await self.pool.fetch(
            f"SELECT instance_id FROM {_T['instances']} WHERE status <> 'terminated'"
        )
        self.instances = {}
        for r in rows:
            self.instances[r["instance_id"]] = await self.instance_repo.load(r["instance_id"])

    async def reconcile_once(self) -> None:
        """One pass (see the module docstring)."""
        now = time.monotonic()
        rows = await self.pool.fetch(
            f"SELECT name, group_name, status, revision, active_revision, failed_revision, "
            f"replicas, min_replicas, max_replicas, target_inflight FROM {_T['deployments']} "
            "WHERE status NOT IN ('stopped', 'deleted')"
        )
        wanted = {r["name"]: r for r in rows}
        specs = await self._specs(wanted)
        observed = await self.backend.observe()
        await self._record(observed)

        by_revision: dict[tuple[str, int], list[ObservedInstance]] = defaultdict(list)
        for inst in observed:
            by_revision[(inst.deployment, inst.revision)].append(inst)

        keep: set[tuple[str, int]] = set()
        for d in wanted.values():
            keep |= await self._deployment(d, specs, by_revision, now)
        # Also the revisions without instances (a Deployment whose pods were never
        # created): what is not kept goes, seen through its instances or not.
        running = set(by_revision) | await self.backend.revisions()
        for key in sorted(running):
            if key not in keep:
                name, revision = key
                reason = self._why_removed(name, revision, wanted)
                for inst in by_revision.get(key, []):
                    self._removing[inst.instance_id] = reason
                await self.backend.remove(name, revision)
        self.passes += 1

    async def _specs(self, wanted: dict[str, asyncpg.Record]) -> dict[tuple[str, int], Spec]:
        if not wanted:
            return {}
        rows = await self.pool.fetch(
            f"SELECT r.name, r.revision, r.spec FROM {_T['revisions']} r "
            f"JOIN {_T['deployments']} d ON d.name = r.name "
            "WHERE d.name = ANY($1::text[]) AND r.revision IN (d.revision, d.active_revision)",
            list(wanted),
        )
        return {(r["name"], r["revision"]): Spec.model_validate(r["spec"]) for r in rows}

    def _why_removed(self, name: str, revision: int, wanted: dict[str, asyncpg.Record]) -> str:
        d = wanted.get(name)
        if d is None:
            return "deployment stopped or deleted"
        if revision == d["failed_revision"]:
            return f"revision {revision} failed"
        return f"revision {revision} replaced by revision {d['active_revision']}"

    async def _deployment(
        self,
        d: asyncpg.Record,
        specs: dict[tuple[str, int], Spec],
        by_revision: dict[tuple[str, int], list[ObservedInstance]],
        now: float,
    ) -> set[tuple[str, int]]:
        """Drives one deployment; returns the revisions that must keep running."""
        name, newest, active = d["name"], d["revision"], d["active_revision"]
        target = d["replicas"]
        keep: set[tuple[str, int]] = set()
        newest_spec = specs.get((name, newest))
        if newest_spec is None:
            return {k for k in by_revision if k[0] == name}  # projection catching up
        new_failed = d["failed_revision"] == newest
        ready_new = sum(i.phase is InstancePhase.READY for i in by_revision[(name, newest)])

        if not new_failed:
            await self.backend.apply(self._revision(d, newest, newest_spec, target))
            keep.add((name, newest))
        if active != newest and active != d["failed_revision"] and (name, active) in specs:
            await self.backend.apply(self._revision(d, active, specs[(name, active)], target))
            keep.add((name, active))

        # Traffic moves only to a revision whose instances are all ready.
        if active != newest and not new_failed and ready_new >= target:
            await self._on_deployment(name, lambda dep: dep.activate(newest))
            self._activated_at[name] = now
            keep.discard((name, active))
            active = newest
        # The revision that served before keeps running while requests drain.
        if now - self._activated_at.get(name, -1e9) < self.drain_seconds:
            keep |= {k for k in by_revision if k[0] == name}

        if not new_failed:
            crashed = [
                i
                for i in by_revision[(name, newest)]
                if i.restarts >= self.max_restarts and i.phase is not InstancePhase.READY
            ]
            if crashed:
                # Between restarts the instance runs again with no message: say why it
                # exited last time, else show its log.
                crashed.sort(key=lambda i: i.phase is not InstancePhase.FAILED)
                first = crashed[0]
                known = self.instances.get(first.instance_id)
                why = first.message or (known.last_failure if known else "")
                if not why:
                    tail = await self.backend.logs_tail(first.instance_id, 20)
                    why = f"restarted {first.restarts} times; last log lines:\n{tail}"
                message = f"revision {newest} failed: instance {first.instance_id} {why}"
                if active != newest and any(
                    i.phase is InstancePhase.READY for i in by_revision[(name, active)]
                ):
                    message += f"\n(revision {active} still serves)"
                await self._on_deployment(name, lambda dep: dep.conclude(Status.FAILED, message))
                keep.discard((name, newest))
                return keep
            if active == newest and ready_new >= target and d["status"] != Status.DEPLOYED:
                await self._on_deployment(name, lambda dep: dep.conclude(Status.DEPLOYED))

        decision = self.autoscaler.decide(
            name, target, d["min_replicas"], d["max_replicas"], d["target_inflight"], now
        )
        if decision is not None:
            replicas, reason = decision
            await self._on_deployment(name, lambda dep: dep.autoscale(replicas, reason))
        return keep

    @staticmethod
    def _revision(d: asyncpg.Record, revision: int, spec: Spec, replicas: int) -> RevisionSpec:
        return RevisionSpec(
            deployment=d["name"],
            group=d["group_name"],
            revision=revision,
            replicas=replicas,
            image=spec.image,
            image_digest=spec.image_digest,
            pack_key=spec.pack_key,
            image_kind=spec.image_kind,
            image_ref=spec.image_ref,
            workers=spec.workers,
            instance_type=spec.instance_type,
            cpu=spec.cpu,
            memory_gib=spec.memory_gib,
            gpu=spec.gpu,
        )

    async def _on_deployment(self, name: str, decide: Any) -> None:
        async def command() -> None:
            deployment = await self.deployments.load(name)
            decide(deployment)
            if deployment.pending:
                await self.deployments.save(deployment, actor="scheduler")

        await retry_on_conflict(command)

    async def _record(self, observed: list[ObservedInstance]) -> None:
        """Turns what the backend sees into instance events."""
        seen = set()
        changed: list[Instance] = []
        for obs in observed:
            seen.add(obs.instance_id)
            inst = self.instances.get(obs.instance_id)
            if inst is None:
                inst = await self.instance_repo.load(obs.instance_id)
                self.instances[obs.instance_id] = inst
            inst.created(obs.deployment, obs.revision, self.backend.name)
            if obs.phase is InstancePhase.STARTING:
                inst.starting(obs.address, obs.restarts)
            elif obs.phase is InstancePhase.READY:
                inst.ready(obs.address)
            elif obs.phase is InstancePhase.FAILED:
                inst.failed(obs.restarts, obs.message)
            elif obs.phase is InstancePhase.TERMINATED:
                inst.terminated(self._removing.get(obs.instance_id) or obs.message or "scaled down")
            if inst.pending:
                changed.append(inst)
        for iid in list(self.instances):
            if iid in seen:
                continue
            inst = self.instances.pop(iid)
            # Not removed by us: it vanished (killed outside Shipyard, `shipyard down`,
            # a node lost).
            inst.terminated(self._removing.pop(iid, "") or "gone: no longer running")
            if inst.pending:
                changed.append(inst)
        for inst in changed:
            try:
                await self.instance_repo.save(inst, actor="scheduler")
            except ConcurrencyError:
                # Only the leader writes instances; a conflict means a former leader did.
                self.instances[inst.id] = await self.instance_repo.load(inst.id)
