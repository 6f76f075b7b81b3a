"""The ``kubernetes`` runtime backend: each revision is a Deployment plus a Service.

:class:`KubernetesBackend` implements :class:`~shipyard_scheduler.adapters.backend.RuntimeBackend`
with the official ``kubernetes`` client. The client is synchronous; every call runs in a
worker thread (``asyncio.to_thread``) with a request timeout, so a slow API server never
blocks the event loop nor hangs a reconcile pass.

- :meth:`~KubernetesBackend.apply` server-side-applies the manifests of
  ``k8s_manifests.py`` (one PATCH each, creating or updating, field manager
  ``shipyard-scheduler``). The Deployment controller keeps ``replicas`` pods and the
  kubelet restarts crashed ones with backoff: the semantics the protocol asks for.
- :meth:`~KubernetesBackend.observe` lists the managed pods and maps each one to an
  :class:`ObservedInstance` (:func:`instance_from_pod`), adding the newest warning Event
  of a pod that is not ready (``FailedScheduling``, image pulls, failed mounts...).
- Everything survives a scheduler restart by construction: the objects live in the
  cluster, so :meth:`~KubernetesBackend.open` has nothing to adopt.

The cluster objects this needs are in ``infra/k8s/scheduler-rbac.yaml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any

import urllib3.exceptions
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from shipyard_core import kube
from shipyard_core.errors import (
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from shipyard_scheduler.adapters.backend import InstancePhase, ObservedInstance, RevisionSpec
from shipyard_scheduler.adapters.k8s_manifests import (
    CONTAINER,
    DEFAULT_NAMESPACE,
    DEFAULT_RUNTIME_IMAGE,
    DEFAULT_SERVICE_IMAGE,
    DEFAULT_STORE_SECRET,
    INIT_CONTAINER,
    LABEL_DEPLOYMENT,
    LABEL_REVISION,
    MANAGED_SELECTOR,
    SERVE_PORT,
    PodSettings,
    deployment_manifest,
    resource_name,
    service_manifest,
)

FIELD_MANAGER = "shipyard-scheduler"
APPLY_PATCH = "application/apply-patch+yaml"
RBAC_FILE = "infra/k8s/scheduler-rbac.yaml"
_MESSAGE_LIMIT = 2000


# --------------------------------------------------------------------------- errors


def _call(doing: str, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """:func:`shipyard_core.kube.call` with this adapter's RBAC hint."""
    return kube.call(
        doing,
        fn,
        rbac_hint=f"the scheduler's service account needs the Role in {RBAC_FILE}",
        **kwargs,
    )


def _request(doing: str, fn: Callable[..., Any], /, **kwargs: Any) -> bytes:
    """:func:`_call` for the raw response body, read (and the connection released) here.

    Raw bytes rather than the client's models: the backend reads a few fields, and the
    models' strict deserialization fails on objects they do not expect (a partial object,
    a field newer than the client), which must not break a reconcile pass. Logs also stay
    as written (some clients parse a log that is one JSON document).
    """
    response = _call(doing, fn, _preload_content=False, **kwargs)
    try:
        data = response.data
    except urllib3.exceptions.HTTPError as exc:
        raise Unavailable(f"the Kubernetes API broke off {doing}: {exc}") from exc
    finally:
        response.release_conn()
    return bytes(data)


# --------------------------------------------------------------------------- pods


def _parse_time(value: Any) -> float:
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _exit(terminated: dict[str, Any]) -> str:
    """``exited with code 137 (OOMKilled): <termination message>``."""
    code = terminated.get("exitCode")
    reason = terminated.get("reason") or ""
    text = f"exited with code {code}" + (f" ({reason})" if reason else "")
    message = (terminated.get("message") or "").strip()
    return f"{text}: {message}" if message else text


def _waiting(waiting: dict[str, Any]) -> str:
    reason = waiting.get("reason") or "waiting"
    message = (waiting.get("message") or "").strip()
    return f"{reason}: {message}" if message else reason


def _container_failure(cs: dict[str, Any]) -> str | None:
    """Why a container is crash-looping or dead (None when it is not): the last exit
    (reason, code, termination message with the last log lines) and the backoff."""
    state = cs.get("state") or {}
    last = (cs.get("lastState") or {}).get("terminated")
    waiting = state.get("waiting")
    if state.get("terminated"):
        return _exit(state["terminated"])
    if waiting and waiting.get("reason") == "CrashLoopBackOff":
        parts = [_exit(last)] if last else []
        parts.append(_waiting(waiting))
        return "; ".join(parts)
    return None


def _clip(text: str) -> str:
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


def instance_from_pod(pod: dict[str, Any]) -> ObservedInstance | None:
    """Maps a pod (its JSON, as the API returns it) to an instance; None for a pod without
    Shipyard's deployment and revision labels.

    - being deleted (``deletionTimestamp``), or ``Succeeded``: TERMINATED;
    - the pack download (init container) crash-looping or failed: FAILED, with its error;
    - ``Pending``: PENDING, with why (unschedulable, image pull, config error) if known;
    - ``Running``: READY when the Ready condition holds; FAILED when the model container is
      crash-looping or has exited (message: the last exit's reason, code and log lines, and
      the backoff); STARTING otherwise (with the previous exit, if it restarted);
    - ``Failed`` (evicted, node shutdown): FAILED with the pod's reason; ``Unknown`` (the
      node stopped reporting): PENDING.

    ``restarts`` counts the restarts of the init and model containers, ``address`` is
    ``podIP:8080`` once the pod has an IP.
    """
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        deployment = labels[LABEL_DEPLOYMENT]
        revision = int(labels[LABEL_REVISION])
    except (KeyError, ValueError):
        return None
    status = pod.get("status") or {}
    pod_phase = status.get("phase") or "Pending"
    ip = status.get("podIP") or ""
    init = {c.get("name"): c for c in status.get("initContainerStatuses") or []}
    main = {c.get("name"): c for c in status.get("containerStatuses") or []}
    restarts = sum(int(c.get("restartCount") or 0) for c in [*init.values(), *main.values()])
    conditions = {c.get("type"): c for c in status.get("conditions") or []}

    def instance(phase: InstancePhase, message: str = "") -> ObservedInstance:
        return ObservedInstance(
            instance_id=meta.get("name", ""),
            deployment=deployment,
            revision=revision,
            phase=phase,
            address=f"{ip}:{SERVE_PORT}" if ip else "",
            restarts=restarts,
            message=_clip(message),
        )

    if meta.get("deletionTimestamp"):
        return instance(InstancePhase.TERMINATED, "terminating")
    if pod_phase == "Succeeded":
        return instance(InstancePhase.TERMINATED, "exited")
    if pod_phase == "Failed":
        why = ": ".join(p for p in (status.get("reason"), status.get("message")) if p)
        return instance(InstancePhase.FAILED, why or "the pod failed")

    fetch = init.get(INIT_CONTAINER)
    if fetch is not None:
        failure = _container_failure(fetch)
        done = ((fetch.get("state") or {}).get("terminated") or {}).get("exitCode") == 0
        if failure is not None and not done:
            return instance(
                InstancePhase.FAILED, f"fetching the environment pack failed: {failure}"
            )

    model = main.get(CONTAINER) or {}
    if pod_phase == "Running":
        failure = _container_failure(model)
        if failure is not None:
            return instance(InstancePhase.FAILED, failure)
        if (conditions.get("Ready") or {}).get("status") == "True":
            return instance(InstancePhase.READY)
        last = (model.get("lastState") or {}).get("terminated")
        return instance(InstancePhase.STARTING, f"restarted after it {_exit(last)}" if last else "")

    # Pending (or Unknown): say what it waits for, when the pod says.
    for cs in [*init.values(), model]:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "PodInitializing", "ContainerCreating"):
            return instance(InstancePhase.PENDING, _waiting(waiting))
    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") == "False":
        why = ": ".join(p for p in (scheduled.get("reason"), scheduled.get("message")) if p)
        return instance(InstancePhase.PENDING, why)
    if pod_phase == "Unknown":
        return instance(InstancePhase.PENDING, "the pod's node stopped reporting")
    return instance(InstancePhase.PENDING)


def latest_warning(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The newest ``Warning`` Event of ``events`` (Event JSON), or None."""

    def when(event: dict[str, Any]) -> float:
        return max(
            _parse_time(event.get("lastTimestamp")),
            _parse_time(event.get("eventTime")),
            _parse_time(event.get("firstTimestamp")),
            _parse_time((event.get("metadata") or {}).get("creationTimestamp")),
        )

    warnings = [e for e in events if e.get("type") == "Warning"]
    return max(warnings, key=when) if warnings else None


def with_event(instance: ObservedInstance, event: dict[str, Any] | None) -> ObservedInstance:
    """``instance`` with ``<reason>: <message>`` of ``event`` appended to its message,
    unless the pod's status said the same already (the scheduler writes an unschedulable
    pod's condition and its FailedScheduling event with the same text)."""
    if event is None:
        return instance
    reason = event.get("reason") or ""
    text = (event.get("message") or "").strip()
    if (text or reason) in instance.message:
        return instance
    line = ": ".join(p for p in (reason, text) if p)
    message = f"{instance.message} ({line})" if instance.message else line
    return dataclasses.replace(instance, message=_clip(message))


# --------------------------------------------------------------------------- backend


class KubernetesBackend:
    """Runs revisions as Deployments and Services in one namespace.

    ``api_client`` is used as given (and left open by :meth:`close`); without one, a client
    is built from the in-cluster service account or the kubeconfig
    (:func:`shipyard_core.kube.load_api_client`) and closed by :meth:`close`. The other
    arguments are :class:`PodSettings`'.

    ``resync_seconds``: :meth:`apply` is called on every reconcile pass; it sends the
    manifests again only when they changed or this long after it last sent them (so an
    object deleted by hand comes back within that time). 0 sends them on every call.
    """

    name = "kubernetes"

    def __init__(
        self,
        api_client: k8s.ApiClient | None = None,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        service_image: str = DEFAULT_SERVICE_IMAGE,
        runtime_image: str = DEFAULT_RUNTIME_IMAGE,
        pull_secret: str | None = None,
        store_secret: str | None = DEFAULT_STORE_SECRET,
        object_store: str = "s3://shipyard",
        s3_endpoint: str | None = None,
        grace_seconds: int = 30,
        drain_seconds: int = 5,
        startup_seconds: int = 600,
        request_timeout: float = 30.0,
        resync_seconds: float = 60.0,
        max_event_lookups: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = PodSettings(
            namespace=namespace,
            service_image=service_image,
            runtime_image=runtime_image,
            object_store=object_store,
            s3_endpoint=s3_endpoint,
            store_secret=store_secret,
            pull_secret=pull_secret,
            grace_seconds=grace_seconds,
            drain_seconds=drain_seconds,
            startup_seconds=startup_seconds,
        )
        self.namespace = namespace
        self._owns_client = api_client is None
        self._client = api_client if api_client is not None else kube.load_api_client()
        self._core = k8s.CoreV1Api(self._client)
        self._apps = k8s.AppsV1Api(self._client)
        self._timeout = request_timeout
        self._resync = resync_seconds
        self._max_event_lookups = max_event_lookups
        self._clock = clock
        # revision key -> (the manifests last applied, when): what makes apply() cheap.
        self._applied: dict[tuple[str, int], tuple[tuple[dict[str, Any], ...], float]] = {}

    async def _run(self, doing: str, fn: Callable[..., Any], /, **kwargs: Any) -> bytes:
        """One API call in a worker thread, with the request timeout; the raw body."""
        kwargs["_request_timeout"] = self._timeout
        return await asyncio.to_thread(_request, doing, fn, **kwargs)

    async def _json(self, doing: str, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        return json.loads(await self._run(doing, fn, **kwargs))

    async def open(self) -> None:
        """Checks that the namespace's pods can be listed (reachability and RBAC fail
        here, at start, with the fix named). Nothing to adopt: the revisions' objects live
        in the cluster and keep running while the scheduler is away."""
        await self._run(
            f"listing the pods of namespace {self.namespace}",
            self._core.list_namespaced_pod,
            namespace=self.namespace,
            label_selector=MANAGED_SELECTOR,
            limit=1,
        )

    async def apply(self, spec: RevisionSpec) -> None:
        """Server-side applies the revision's Deployment and Service (creating or updating
        them; ``replicas`` scales it). Idempotent; skipped when the same manifests were
        applied less than ``resync_seconds`` ago. ``InvalidArgument`` for a spec the
        manifests cannot carry, ``FailedPrecondition`` when the cluster refuses them."""
        manifests = (
            deployment_manifest(spec, self.settings),
            service_manifest(spec, self.settings),
        )
        key = (spec.deployment, spec.revision)
        last = self._applied.get(key)
        if last is not None and last[0] == manifests and self._clock() - last[1] < self._resync:
            return
        name = resource_name(spec.deployment, spec.revision)
        # Apply with force: the scheduler is the only writer of these fields, so a
        # conflict (someone's kubectl edit/scale) is overridden rather than a stuck revision.
        common = {
            "name": name,
            "namespace": self.namespace,
            "field_manager": FIELD_MANAGER,
            "force": True,
            "_content_type": APPLY_PATCH,
        }
        # The Deployment first: a Service without pods is harmless, the reverse is too, but
        # the pods are what takes long to come up.
        self._applied.pop(key, None)
        await self._run(
            f"applying Deployment {name}",
            self._apps.patch_namespaced_deployment,
            body=manifests[0],
            **common,
        )
        await self._run(
            f"applying Service {name}",
            self._core.patch_namespaced_service,
            body=manifests[1],
            **common,
        )
        self._applied[key] = (manifests, self._clock())

    async def remove(self, deployment: str, revision: int) -> None:
        """Deletes the revision's Deployment and Service; its pods then get SIGTERM (after
        the preStop drain delay) and are killed after the grace period. Unknown revisions
        are a no-op.

        Background propagation: the Deployment is gone at once and the garbage collector
        removes its ReplicaSet and pods. Foreground would keep the Deployment, with its
        name, until every pod has exited; an apply of the same revision in that window
        would update an object about to disappear. Pods terminate gracefully either way,
        and observe() reports them TERMINATED until they are gone.
        """
        self._applied.pop((deployment, revision), None)
        name = resource_name(deployment, revision)
        with contextlib.suppress(NotFound):
            await self._run(
                f"deleting Deployment {name}",
                self._apps.delete_namespaced_deployment,
                name=name,
                namespace=self.namespace,
                propagation_policy="Background",
            )
        with contextlib.suppress(NotFound):
            await self._run(
                f"deleting Service {name}",
                self._core.delete_namespaced_service,
                name=name,
                namespace=self.namespace,
                propagation_policy="Background",
            )

    async def revisions(self) -> set[tuple[str, int]]:
        """The revisions of the managed Deployments of the namespace, with pods or not."""
        found = await self._json(
            f"listing the Deployments of namespace {self.namespace}",
            self._apps.list_namespaced_deployment,
            namespace=self.namespace,
            label_selector=MANAGED_SELECTOR,
        )
        out: set[tuple[str, int]] = set()
        for item in found.get("items") or []:
            labels = (item.get("metadata") or {}).get("labels") or {}
            with contextlib.suppress(KeyError, ValueError):
                out.add((labels[LABEL_DEPLOYMENT], int(labels[LABEL_REVISION])))
        return out

    async def observe(self) -> list[ObservedInstance]:
        """Every managed pod of the namespace as an instance (see :func:`instance_from_pod`),
        sorted by deployment, revision and id. A pod that is not ready gets its newest
        warning Event appended to its message (at most ``max_event_lookups`` pods per
        call: one API call each)."""
        pods = await self._json(
            f"listing the pods of namespace {self.namespace}",
            self._core.list_namespaced_pod,
            namespace=self.namespace,
            label_selector=MANAGED_SELECTOR,
        )
        instances: list[ObservedInstance] = []
        lookups = 0
        for pod in pods.get("items") or []:
            instance = instance_from_pod(pod)
            if instance is None:
                continue
            needs_event = instance.phase in (
                InstancePhase.PENDING,
                InstancePhase.STARTING,
                InstancePhase.FAILED,
            )
            if needs_event and lookups < self._max_event_lookups:
                lookups += 1
                instance = with_event(instance, await self._pod_warning(instance.instance_id))
            instances.append(instance)
        instances.sort(key=lambda i: (i.deployment, i.revision, i.instance_id))
        return instances

    async def _pod_warning(self, pod: str) -> dict[str, Any] | None:
        try:
            events = await self._json(
                f"listing the events of pod {pod}",
                self._core.list_namespaced_event,
                namespace=self.namespace,
                field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod}",
            )
        except (FailedPrecondition, Unavailable):
            # Events only add detail: without them the pod's own status still tells.
            return None
        return latest_warning(list(events.get("items") or []))

    async def logs_tail(self, instance_id: str, lines: int = 50) -> str:
        """The model container's last ``lines`` lines (its previous run's while it waits to
        restart); before it has started, the pack download's; ``""`` for a pod that is
        gone or has no log yet."""
        for container in (CONTAINER, INIT_CONTAINER):
            try:
                data = await self._run(
                    f"reading the log of pod {instance_id}",
                    self._core.read_namespaced_pod_log,
                    name=instance_id,
                    namespace=self.namespace,
                    container=container,
                    tail_lines=lines,
                )
            except NotFound:
                return ""
            except FailedPrecondition as exc:
                # 400: the container has not started (the model's while the pack is still
                # being fetched): fall back to the init container's log.
                if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 400:
                    continue
                raise
            return data.decode("utf-8", errors="replace")
        return ""

    def on_change(self, wake: Callable[[], None]) -> None:
        """Ignored: pod changes are seen by ``observe`` on the reconciler's interval (a
        watch on pods would be the way to wake it sooner)."""

    async def close(self) -> None:
        """Forgets what it applied and closes the client it built; the revisions keep
        running in the cluster."""
        self._applied.clear()
        if self._owns_client:
            await asyncio.to_thread(self._client.close)


__all__ = [
    "FIELD_MANAGER",
    "KubernetesBackend",
    "instance_from_pod",
    "latest_warning",
    "with_event",
]
