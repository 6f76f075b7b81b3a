"""A small fake of the Kubernetes REST API, over real HTTP, for adapter tests.

No cluster is reachable from the development machines, so the Kubernetes adapters
(``shipyard_imagebuild.adapters.kaniko``, ``shipyard_scheduler.adapters.kubernetes``) run
the real ``kubernetes`` client against :class:`FakeKubeAPI` served on 127.0.0.1 by
:func:`serve`. It answers the namespaced REST paths those adapters use with canned JSON
and records every request, so a test can assert on the verbs, paths, query parameters and
bodies the client sent, and on how the adapter reads the answers.

It is NOT a Kubernetes API server: there is no admission, no schema validation, no
controllers (a Deployment never gets pods: tests put pod JSON in ``pods``), and patches are
approximations (server-side apply replaces the object with the applied one; merge and
strategic-merge patches are both RFC 7386 merges). What it proves is the client-side
half of the conversation, nothing about what a cluster would do with it.

Only the standard library is used, so importing it needs no Kubernetes client.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "API_PATH",
    "APPLY_PATCH",
    "FakeKubeAPI",
    "Recorded",
    "now",
    "rbac_attributes",
    "role_allows",
    "serve",
    "status",
]

APPLY_PATCH = "application/apply-patch+yaml"
"""The content type of a server-side apply request."""

API_PATH = re.compile(
    r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<resource>[^/]+)"
    r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)
"""A namespaced REST path: ``group`` (None for the core API), ``ns``, ``resource``, and the
optional object ``name`` and subresource ``sub``."""

Answer = tuple[int, str, bytes]
"""HTTP status, content type, body."""


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    """The JSON body, parsed (None when there was none)."""
    content_type: str = ""


def now() -> str:
    """The current UTC time as the API server writes timestamps."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A ``Status`` object, the body the API server sends with an error."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, ``null`` deletes a key."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _field(obj: dict[str, Any], dotted: str) -> Any:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _equalities(selector: str) -> dict[str, str]:
    """``a=b,c=d`` (the only selector form the fake understands) as a dict."""
    return dict(term.split("=", 1) for term in selector.split(",") if term)


@dataclass
class FakeKubeAPI:
    """Just enough of the namespaced Kubernetes REST API, with failure injection.

    - ``POST`` to a collection creates (201 with the object plus uid, creationTimestamp
      and resourceVersion; 409 when the name exists); ``GET`` reads (through
      :meth:`on_read`) or lists, ``PUT`` replaces, ``DELETE`` deletes (404 when missing).
    - ``PATCH`` with ``application/apply-patch+yaml`` (server-side apply) creates the
      object (201) or replaces it with the applied one (200); it needs ``fieldManager``,
      like a real server. Other patch types merge (RFC 7386).
    - Pods and events are whatever a test puts in ``pods`` and ``events``; lists of them
      (and of stored objects) filter by ``labelSelector`` and ``fieldSelector`` equality
      terms (``a=b,c=d``).
    - ``logs`` holds log text under ``"<pod>/<container>"`` or ``"<pod>"``; a log read of a
      pod in ``pods`` without any answers 400 (its container is not running yet), of an
      unknown pod 404.
    - ``fail[(method, resource)] = code`` makes those calls answer that error status.
    - Only ``namespace`` is served; every other path is a 404.
    """

    namespace: str = "default"
    requests: list[Recorded] = field(default_factory=list)
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    """Stored objects by (plural resource, name), e.g. ``("deployments", "x")``."""
    pods: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)
    fail: dict[tuple[str, str], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of every request so far, in order."""
        return [(r.method, r.path) for r in self.requests]

    def on_read(self, resource: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Hook for subclasses: the object a ``GET`` returns (a copy of the stored one)."""
        return obj

    def handle(self, method: str, target: str, body: bytes, content_type: str = "") -> Answer:
        """Answers one request; called by the server :func:`serve` starts."""
        url = urlsplit(target)
        query = parse_qs(url.query)
        parsed = json.loads(body) if body else None
        with self.lock:
            self.requests.append(Recorded(method, url.path, query, parsed, content_type))
            m = API_PATH.match(url.path)
            if not m or m["ns"] != self.namespace:
                return self._json(404, status(404, "NotFound", f"no route {url.path}"))
            resource, name, sub = m["resource"], m["name"], m["sub"]
            if (method, resource) in self.fail:
                code = self.fail[(method, resource)]
                return self._json(code, status(code, "Injected", f"injected {code}"))
            if name is None:
                return self._collection(method, resource, query, parsed)
            if sub == "log" and resource == "pods" and method == "GET":
                return self._log(name, query.get("container", [""])[0])
            if sub is not None:
                return self._json(404, status(404, "NotFound", f"no subresource {sub}"))
            return self._object(method, resource, name, query, parsed, content_type)

    # -------------------------------------------------------------- collections

    def _collection(
        self, method: str, resource: str, query: dict[str, list[str]], parsed: Any
    ) -> Answer:
        if method == "POST":
            name = parsed["metadata"]["name"]
            if (resource, name) in self.objects:
                msg = f'{resource} "{name}" already exists'
                return self._json(409, status(409, "AlreadyExists", msg))
            return self._json(201, self._store(resource, name, parsed))
        if method == "GET":
            if resource == "pods":
                items = self.pods
            elif resource == "events":
                items = self.events
            else:
                items = [o for (r, _), o in self.objects.items() if r == resource]
            labels = _equalities(query.get("labelSelector", [""])[0])
            fields = _equalities(query.get("fieldSelector", [""])[0])
            selected = [
                copy.deepcopy(o)
                for o in items
                if all((o["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())
                and all(str(_field(o, k)) == v for k, v in fields.items())
            ]
            return self._json(200, {"apiVersion": "v1", "metadata": {}, "items": selected})
        return self._json(405, status(405, "MethodNotAllowed", f"{method} on {resource}"))

    def _log(self, pod: str, container: str) -> Answer:
        text = self.logs.get(f"{pod}/{container}", self.logs.get(pod))
        if text is not None:
            return 200, "text/plain", text.encode()
        if any(p["metadata"]["name"] == pod for p in self.pods):
            msg = f'container "{container}" in pod "{pod}" is waiting to start: PodInitializing'
            return self._json(400, status(400, "BadRequest", msg))
        return self._json(404, status(404, "NotFound", f'pods "{pod}" not found'))

    # -------------------------------------------------------------- objects

    def _object(
        self,
        method: str,
        resource: str,
        name: str,
        query: dict[str, list[str]],
        parsed: Any,
        content_type: str,
    ) -> Answer:
        key = (resource, name)
        if method == "PATCH" and content_type.startswith(APPLY_PATCH):
            if not query.get("fieldManager"):
                msg = "PatchOptions.meta.k8s.io is invalid: fieldManager: Required value"
                return self._json(422, status(422, "Invalid", msg))
            if key not in self.objects:
                return self._json(201, self._store(resource, name, parsed))
            return self._json(200, self._replace(key, parsed))
        if key not in self.objects:
            return self._json(404, status(404, "NotFound", f'{resource} "{name}" not found'))
        if method == "GET":
            return self._json(200, self.on_read(resource, name, copy.deepcopy(self.objects[key])))
        if method == "PUT":
            return self._json(200, self._replace(key, parsed))
        if method == "PATCH":
            return self._json(200, self._replace(key, _merge_patch(self.objects[key], parsed)))
        if method == "DELETE":
            del self.objects[key]
            return self._json(200, status(200, "", ""))
        return self._json(405, status(405, "MethodNotAllowed", f"{method} on {resource}"))

    def _store(self, resource: str, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        stored = copy.deepcopy(obj)
        stored["metadata"].update(
            uid=str(uuid.uuid4()), creationTimestamp=now(), resourceVersion="1"
        )
        self.objects[(resource, name)] = stored
        return stored

    def _replace(self, key: tuple[str, str], obj: dict[str, Any]) -> dict[str, Any]:
        old = self.objects[key]["metadata"]
        stored = copy.deepcopy(obj)
        stored["metadata"].update(
            uid=old["uid"],
            creationTimestamp=old["creationTimestamp"],
            resourceVersion=str(int(old["resourceVersion"]) + 1),
        )
        self.objects[key] = stored
        return stored

    @staticmethod
    def _json(code: int, obj: Any) -> Answer:
        return code, "application/json", json.dumps(obj).encode()


@contextlib.contextmanager
def serve(api: FakeKubeAPI) -> Iterator[str]:
    """Serves ``api`` on a free port of 127.0.0.1; yields its base URL (the ``host`` of a
    ``kubernetes.client.Configuration``) and stops the server on exit."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            ctype = self.headers.get("Content-Type") or ""
            code, answer_type, payload = api.handle(self.command, self.path, body, ctype)
            self.send_response(code)
            self.send_header("Content-Type", answer_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval: shutdown() waits for one, once per test.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ------------------------------------------------------------------ RBAC


_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def rbac_attributes(method: str, path: str) -> tuple[str, str, str, str]:
    """(namespace, apiGroup, resource[/subresource], verb) of a namespaced REST call, as
    RBAC sees it (a ``GET`` of a collection is ``list``, of an object ``get``)."""
    m = API_PATH.match(path)
    if not m:
        raise ValueError(f"not a namespaced API path: {path}")
    resource = m["resource"] + (f"/{m['sub']}" if m["sub"] else "")
    verb = _VERBS.get(method) or ("get" if m["name"] else "list")
    return m["ns"], m["group"] or "", resource, verb


def role_allows(rules: list[dict[str, Any]], method: str, path: str) -> bool:
    """Whether a Role's ``rules`` allow the call (no wildcards or resourceNames)."""
    _, group, resource, verb = rbac_attributes(method, path)
    return any(
        group in rule.get("apiGroups", [])
        and resource in rule.get("resources", [])
        and verb in rule.get("verbs", [])
        for rule in rules
    )
