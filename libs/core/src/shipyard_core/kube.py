"""Reaching and calling the Kubernetes API with Shipyard's errors (for the adapters that
drive a cluster: imagebuild's Kaniko builds, the scheduler's kubernetes backend).

- :func:`load_api_client`: a client from the pod's service account, else the kubeconfig.
- :func:`call`: one API call, its failures turned into Shipyard errors.
- ``MODEL_IMAGE_*``: what an OCI model image built by a cluster build holds and how it
  runs, the one contract between the Dockerfile that builds it (imagebuild) and the pods
  that run it (the scheduler's kubernetes backend).

Needs the ``kubernetes`` client (the ``shipyard-core[kubernetes]`` extra); the services
that use it depend on it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import urllib3.exceptions
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from shipyard_core.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ShipyardError,
    Unavailable,
)

# The OCI model image (imagebuild's ``kaniko.dockerfile()`` makes it; the scheduler's
# ``k8s_manifests`` runs it): the model server from ``shipyard_runtime``, installed into the
# base image's Python, serving the model folder.
MODEL_IMAGE_UID = 10001
"""The unprivileged uid and gid the model server runs as (the image's ``USER``)."""
MODEL_IMAGE_DIR = "/model"
"""The model folder in the image (its ``WORKDIR``; root's files, read-only to the user)."""
MODEL_IMAGE_PORT = 8080
"""The port the model server listens on (the image's ``EXPOSE``)."""
MODEL_IMAGE_ENV = "/opt/shipyard"
"""The virtual environment with the model's requirements and ``shipyard_runtime``, owned
by the unprivileged user (who installs into it: requirements' build code never runs as
root in the build)."""
MODEL_IMAGE_PYTHON = f"{MODEL_IMAGE_ENV}/bin/python"
"""The interpreter that has ``shipyard_runtime`` installed."""


def load_api_client(context: str | None = None, config_file: str | None = None) -> k8s.ApiClient:
    """An ``ApiClient`` from the pod's service account when running in a cluster, else
    from the kubeconfig (``config_file``, else ``$KUBECONFIG`` as it is now, else
    ``~/.kube/config``; ``context`` or its current one). ``FailedPrecondition`` when there
    is neither. The caller closes it."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except ConfigException:
        # The client reads $KUBECONFIG once, when it is imported; read it here instead.
        path = config_file or os.environ.get("KUBECONFIG") or None
        try:
            k8s_config.load_kube_config(
                config_file=path, context=context, client_configuration=configuration
            )
        except (ConfigException, OSError) as exc:
            raise FailedPrecondition(
                f"no Kubernetes configuration: not in a cluster and no usable kubeconfig ({exc})"
            ) from exc
    return k8s.ApiClient(configuration)


def api_message(exc: ApiException) -> str:
    """The API server's own message (from its Status body) or the HTTP reason."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return f"HTTP {exc.status} {exc.reason or ''}".strip()


REQUEST_TIMEOUT = (10.0, 60.0)
"""Seconds to connect to the Kubernetes API and to wait for each read of an answer."""


def call(doing: str, fn: Callable[..., Any], /, *, rbac_hint: str, **kwargs: Any) -> Any:
    """Calls the Kubernetes API, turning its failures into Shipyard errors: 404 is
    ``NotFound`` and 409 ``AlreadyExists`` (callers catch those), refusals and rejected
    objects ``FailedPrecondition`` (the cluster's configuration, not the caller, must
    change; ``rbac_hint`` says what to grant), an unreachable, slow or overloaded API
    server ``Unavailable`` (a later attempt retries). Every call has a connect and read
    timeout (``REQUEST_TIMEOUT``, unless the caller gives one): a connection a load
    balancer dropped silently must not hold a thread forever."""
    kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
    try:
        return fn(**kwargs)
    except ApiException as exc:
        status, message = exc.status or 0, api_message(exc)
        error: ShipyardError
        if status == 404:
            error = NotFound(f"{doing}: {message}")
        elif status == 409:
            error = AlreadyExists(f"{doing}: {message}")
        elif status in (401, 403):
            error = FailedPrecondition(f"the cluster refused {doing}: {message} ({rbac_hint})")
        elif status == 429 or status >= 500 or status == 0:
            error = Unavailable(f"the Kubernetes API failed {doing}: {message}")
        else:
            error = FailedPrecondition(f"the cluster rejected {doing}: {message}")
        raise error from exc
    except urllib3.exceptions.HTTPError as exc:
        raise Unavailable(f"cannot reach the Kubernetes API for {doing}: {exc}") from exc
