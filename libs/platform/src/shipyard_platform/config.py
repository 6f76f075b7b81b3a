"""What the embedded platform runs, where, and on which ports.

Everything is resolved once, by ``up`` in the caller's process, from its arguments and the
environment, then written to ``<home>/run/config.json`` for the supervisor process. So the
supervisor does exactly what the ``up`` that started it asked for.

Environment (all optional):

``SHIPYARD_NATS_URL``
    Use this NATS instead of starting the embedded one.
``SHIPYARD_DATABASE_URL``
    Use this PostgreSQL database instead of starting the embedded server.
``SHIPYARD_NATS_PORT``
    Port of the embedded NATS (default 4222).
``SHIPYARD_PG_PORT``
    Port of the embedded PostgreSQL (default 5432).
``SHIPYARD_<SERVICE>_PORT``
    gRPC port of a service, e.g. ``SHIPYARD_KEYS_PORT`` (default from
    ``shipyard.client.config.DEFAULT_PORTS``).
``SHIPYARD_GATEWAY_HTTP_PORT``
    Port of the gateway's REST data plane (default 8080).
``SHIPYARD_SERVICES``
    Comma-separated names from :data:`SERVICES` to run (default: all of them).
``SHIPYARD_UP_TIMEOUT``
    Seconds ``up`` waits for every component to be healthy (default 120).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shipyard.client.config import DEFAULT_PORTS

DEFAULT_NATS_PORT = 4222
DEFAULT_PG_PORT = 5432
DEFAULT_UP_TIMEOUT = 120.0
DEFAULT_GATEWAY_HTTP_PORT = 8080
# The embedded PostgreSQL holds one database for the suite; each service has its schema.
DATABASE_NAME = "shipyard"


@dataclass(frozen=True)
class ServiceSpec:
    """One service process of the suite.

    ``argv`` overrides the command (default ``python -m <module>``); tests use it to run a
    stand-in service. ``bootstrap_admin`` marks the service whose module provides
    ``bootstrap-admin`` (keys).
    """

    name: str
    module: str
    port: int
    bootstrap_admin: bool = False
    argv: tuple[str, ...] | None = None

    def command(self) -> list[str]:
        """The command line that runs this service."""
        if self.argv is not None:
            return list(self.argv)
        return [sys.executable, "-m", self.module]


# The one table of the suite's services, in start order. Adding a service is one row here
# (and its port in shipyard.client.config.DEFAULT_PORTS).
SERVICES: tuple[tuple[str, str, bool], ...] = (
    # (name, module run with python -m, provides bootstrap-admin)
    ("keys", "shipyard_keys", True),
    ("quota", "shipyard_quota", False),
    ("imagebuild", "shipyard_imagebuild", False),
    ("scheduler", "shipyard_scheduler", False),
    ("logging", "shipyard_logging", False),
    ("asyncinference", "shipyard_asyncinference", False),
    ("gateway", "shipyard_gateway", False),
)


def _env_port(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be a port number, got {value!r}") from None


def default_services() -> list[ServiceSpec]:
    """The services to run: :data:`SERVICES`, filtered by ``SHIPYARD_SERVICES``, with ports
    from ``SHIPYARD_<SERVICE>_PORT`` or the default ports."""
    wanted = os.environ.get("SHIPYARD_SERVICES")
    names = [n.strip() for n in wanted.split(",") if n.strip()] if wanted is not None else None
    known = {name for name, _, _ in SERVICES}
    unknown = sorted(set(names or ()) - known)
    if unknown:
        raise ValueError(f"SHIPYARD_SERVICES: unknown service(s) {', '.join(unknown)}")
    return [
        ServiceSpec(
            name=name,
            module=module,
            port=_env_port(f"SHIPYARD_{name.upper()}_PORT", DEFAULT_PORTS[name]),
            bootstrap_admin=bootstrap,
        )
        for name, module, bootstrap in SERVICES
        if names is None or name in names
    ]


@dataclass
class PlatformConfig:
    """Everything the supervisor needs. ``nats_url``/``database_url`` set means external:
    the supervisor uses them and starts no embedded server."""

    home: Path
    nats_port: int = DEFAULT_NATS_PORT
    pg_port: int = DEFAULT_PG_PORT
    nats_url: str | None = None
    database_url: str | None = None
    services: list[ServiceSpec] = field(default_factory=list)
    up_timeout: float = DEFAULT_UP_TIMEOUT
    gateway_http_port: int = DEFAULT_GATEWAY_HTTP_PORT

    @classmethod
    def from_env(cls, home: Path, services: list[ServiceSpec] | None = None) -> PlatformConfig:
        """Resolves the configuration from the environment (see the module docstring)."""
        return cls(
            home=home,
            nats_port=_env_port("SHIPYARD_NATS_PORT", DEFAULT_NATS_PORT),
            pg_port=_env_port("SHIPYARD_PG_PORT", DEFAULT_PG_PORT),
            nats_url=os.environ.get("SHIPYARD_NATS_URL") or None,
            database_url=os.environ.get("SHIPYARD_DATABASE_URL") or None,
            services=default_services() if services is None else list(services),
            up_timeout=float(os.environ.get("SHIPYARD_UP_TIMEOUT") or DEFAULT_UP_TIMEOUT),
            gateway_http_port=_env_port("SHIPYARD_GATEWAY_HTTP_PORT", DEFAULT_GATEWAY_HTTP_PORT),
        )

    def to_json(self) -> str:
        """Serialises for the supervisor process."""
        data: dict[str, Any] = asdict(self)
        data["home"] = str(self.home)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> PlatformConfig:
        """Reads what :meth:`to_json` wrote."""
        data = json.loads(text)
        services = [
            ServiceSpec(
                name=s["name"],
                module=s["module"],
                port=int(s["port"]),
                bootstrap_admin=bool(s.get("bootstrap_admin")),
                argv=tuple(s["argv"]) if s.get("argv") is not None else None,
            )
            for s in data.pop("services")
        ]
        return cls(home=Path(data.pop("home")), services=services, **data)

    def endpoints(self) -> dict[str, str]:
        """``{service: "127.0.0.1:port"}`` for the client configuration, plus the gateway's
        REST URL (``gateway_http``) when the gateway runs."""
        found = {s.name: f"127.0.0.1:{s.port}" for s in self.services}
        if "gateway" in found:
            found["gateway_http"] = f"http://127.0.0.1:{self.gateway_http_port}"
        return found
