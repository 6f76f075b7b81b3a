"""shipyard_core.kube: how the cluster adapters reach the Kubernetes API, and the errors
its calls become. The kubeconfig path talks to ``shipyard_testing.fake_kube`` over real
HTTP; the in-cluster path is given a service account's files (token and CA) and the
environment a kubelet sets, and is checked up to the client's configuration (there is no
HTTPS API server here to call)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import urllib3.exceptions
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.config import incluster_config

from shipyard_core import kube
from shipyard_core.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from shipyard_testing.fake_kube import FakeKubeAPI, serve

NS = "shipyard-models"


def _kubeconfig(path: Path, server: str, token: str = "t0ken") -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "me", "user": {"token": token}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
                "current-context": "fake",
            }
        )
    )
    return path


@pytest.fixture
def outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)


@pytest.mark.usefixtures("outside_a_cluster")
def test_the_kubeconfig_of_the_environment_is_read_when_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeKubeAPI(namespace=NS)
    with serve(api) as url:
        # Set after the kubernetes package was imported: load_api_client reads it itself.
        monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "config", url)))
        client = kube.load_api_client()
        try:
            assert client.configuration.host == url
            assert client.configuration.get_api_key_with_prefix("BearerToken") == "Bearer t0ken"
            k8s.CoreV1Api(client).list_namespaced_pod(NS)
        finally:
            client.close()
    assert api.calls() == [("GET", f"/api/v1/namespaces/{NS}/pods")]


@pytest.mark.usefixtures("outside_a_cluster")
def test_an_explicit_file_and_context_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    path = _kubeconfig(tmp_path / "config", "http://127.0.0.1:9", token="other")
    client = kube.load_api_client(context="fake", config_file=str(path))
    try:
        assert client.configuration.host == "http://127.0.0.1:9"
        assert client.configuration.get_api_key_with_prefix("BearerToken") == "Bearer other"
    finally:
        client.close()
    with pytest.raises(FailedPrecondition, match="no Kubernetes configuration"):
        kube.load_api_client(context="no-such-context", config_file=str(path))


@pytest.mark.usefixtures("outside_a_cluster")
def test_neither_a_cluster_nor_a_kubeconfig_is_a_failed_precondition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(FailedPrecondition, match="not in a cluster and no usable kubeconfig"):
        kube.load_api_client()


def test_in_a_pod_the_service_account_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("pod-token")
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nnot checked here\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(account / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(account / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    # A kubeconfig that would point elsewhere is ignored inside a cluster.
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "config", "http://127.0.0.1:9")))
    client = kube.load_api_client()
    try:
        assert client.configuration.host == "https://10.96.0.1:443"
        # (the in-cluster loader writes the scheme in lower case; HTTP does not mind)
        token = client.configuration.get_api_key_with_prefix("BearerToken")
        assert token.lower() == "bearer pod-token"
        assert client.configuration.ssl_ca_cert == str(account / "ca.crt")
    finally:
        client.close()


def _api_error(status: int, message: str | None = None) -> ApiException:
    exc = ApiException(status=status, reason="Reason")
    if message is not None:
        exc.body = json.dumps({"kind": "Status", "message": message})
    return exc


@pytest.mark.parametrize(
    ("status", "error", "text"),
    [
        (404, NotFound, 'reading x: jobs.batch "x" not found'),
        (409, AlreadyExists, "reading x: already there"),
        (403, FailedPrecondition, "the cluster refused reading x: forbidden (grant it)"),
        (422, FailedPrecondition, "the cluster rejected reading x: invalid"),
        (503, Unavailable, "the Kubernetes API failed reading x: busy"),
        (429, Unavailable, "the Kubernetes API failed reading x: slow down"),
    ],
)
def test_call_turns_api_errors_into_shipyard_errors(
    status: int, error: type[Exception], text: str
) -> None:
    message = text.rsplit(": ", 1)[1].removesuffix(" (grant it)")

    def fail(**_timeout: object) -> None:
        raise _api_error(status, message)

    with pytest.raises(error) as raised:
        kube.call("reading x", fail, rbac_hint="grant it")
    assert str(raised.value) == text


def test_call_passes_arguments_and_unreachable_is_unavailable() -> None:
    seen: dict[str, object] = {}

    def add(*, a: int, b: int, _request_timeout: object) -> int:
        seen["timeout"] = _request_timeout
        return a + b

    assert kube.call("adding", add, rbac_hint="", a=1, b=2) == 3
    # Every call has a connect and read timeout, unless the caller sets its own.
    assert seen["timeout"] == kube.REQUEST_TIMEOUT
    kube.call("adding", add, rbac_hint="", a=1, b=2, _request_timeout=5)
    assert seen["timeout"] == 5

    def unreachable(**_timeout: object) -> None:
        raise urllib3.exceptions.MaxRetryError(None, "/", "connection refused")  # type: ignore[arg-type]

    with pytest.raises(Unavailable, match="cannot reach the Kubernetes API for listing"):
        kube.call("listing", unreachable, rbac_hint="")
    # Without a Status body the HTTP status and reason speak.
    assert kube.api_message(_api_error(500)) == "HTTP 500 Reason"
