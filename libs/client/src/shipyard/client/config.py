"""Where the client finds Shipyard: service addresses and the caller's token.

Sources, strongest first: explicit arguments, environment (``SHIPYARD_TOKEN``,
``SHIPYARD_<SERVICE>_ADDR``, ``SHIPYARD_HOME``), the config file ``config.json`` in the
Shipyard home (default ``~/.shipyard``, written by ``shipyard up``), the default ports.

The gateway's HTTP data plane (predictions) is found the same way:
``SHIPYARD_GATEWAY_URL``, else ``endpoints["gateway_http"]`` in ``config.json``, else
``http://127.0.0.1:8080`` (see :meth:`ClientConfig.gateway_url`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# The one table of default ports. The embedded platform starts each service on its port;
# the client connects there unless told otherwise.
DEFAULT_PORTS: dict[str, int] = {
    "keys": 50051,
    "quota": 50052,
    "imagebuild": 50053,
    "scheduler": 50054,
    "asyncinference": 50055,
    "logging": 50056,
    # The gateway's gRPC port (health now, the Open Inference gRPC API next); its REST
    # data plane is DEFAULT_GATEWAY_URL.
    "gateway": 8081,
}

# The gateway's REST data plane: where predictions go. Its key in ``endpoints`` and the
# environment variable that overrides it.
GATEWAY_ENDPOINT = "gateway_http"
GATEWAY_URL_ENV = "SHIPYARD_GATEWAY_URL"
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8080"

CONFIG_FILE = "config.json"


def shipyard_home() -> Path:
    """The Shipyard home (data dir and config): ``$SHIPYARD_HOME`` or ``~/.shipyard``."""
    return Path(os.environ.get("SHIPYARD_HOME") or Path.home() / ".shipyard").expanduser()


@dataclass
class ClientConfig:
    """What a client needs to talk to Shipyard."""

    token: str | None = None
    endpoints: dict[str, str] = field(default_factory=dict)

    def address(self, service: str) -> str:
        """``host:port`` of a service's gRPC API."""
        env = os.environ.get(f"SHIPYARD_{service.upper()}_ADDR")
        if env:
            return env
        if service in self.endpoints:
            return self.endpoints[service]
        if service not in DEFAULT_PORTS:
            raise KeyError(f"unknown service {service!r}")
        return f"127.0.0.1:{DEFAULT_PORTS[service]}"

    def gateway_url(self) -> str:
        """Base URL of the gateway's REST data plane (predictions), without a trailing
        slash: ``$SHIPYARD_GATEWAY_URL``, else ``endpoints["gateway_http"]`` from the
        config file, else ``http://127.0.0.1:8080``. A value without a scheme
        (``host:port``) means ``http://host:port``."""
        url = (
            os.environ.get(GATEWAY_URL_ENV)
            or self.endpoints.get(GATEWAY_ENDPOINT)
            or DEFAULT_GATEWAY_URL
        ).strip()
        if "://" not in url:
            url = f"http://{url}"
        return url.rstrip("/")


def load_config(home: Path | None = None) -> ClientConfig:
    """Reads ``config.json`` from the Shipyard home (if any) and applies the environment."""
    path = (home or shipyard_home()) / CONFIG_FILE
    data: dict[str, object] = {}
    if path.exists():
        data = json.loads(path.read_text())
    endpoints = data.get("endpoints") or {}
    token = os.environ.get("SHIPYARD_TOKEN") or data.get("token")
    return ClientConfig(
        token=str(token) if token else None,
        endpoints={str(k): str(v) for k, v in dict(endpoints).items()},  # type: ignore[call-overload]
    )


def save_config(config: ClientConfig, home: Path | None = None) -> Path:
    """Writes ``config.json`` readable by its owner only (it holds a token)."""
    directory = home or shipyard_home()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CONFIG_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"token": config.token, "endpoints": config.endpoints}, fh, indent=2)
    os.replace(tmp, path)
    return path
