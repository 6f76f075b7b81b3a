"""Settings every Shipyard service shares.

Each service subclasses :class:`CommonSettings`, adds its own fields and overrides the
defaults that differ (``service_name``, ``grpc_port``)::

    class QuotaSettings(CommonSettings):
        service_name: str = "quota"
        grpc_port: int = 50052

        default_cpu_quota: int = 16
        \"\"\"CPU cores a group gets when no quota was set for it.\"\"\"

Values come from keyword arguments, then the environment (``SHIPYARD_<FIELD>``, case
insensitive), then the defaults. Every field carries a docstring; ``use_attribute_docstrings``
turns it into the field's description, so ``model_json_schema()`` documents the whole
configuration (subclasses inherit that, so their docstrings count too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class CommonSettings(BaseSettings):
    """Configuration shared by every Shipyard service (env prefix ``SHIPYARD_``)."""

    model_config = SettingsConfigDict(
        env_prefix="SHIPYARD_",
        use_attribute_docstrings=True,
        # Every service reads the same environment, which holds the other services'
        # SHIPYARD_* variables too; those are not errors.
        extra="ignore",
        validate_default=True,
    )

    service_name: str
    """Name of this service (``quota``, ``scheduler``, ...): the OpenTelemetry
    ``service.name``, the ``service`` field of every log line, the JetStream consumer
    prefix. Subclasses set it as a default."""

    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server with JetStream enabled. Several URLs may be given comma-separated."""

    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    """PostgreSQL DSN of the system of record (each service uses its own schema in it)."""

    grpc_host: str = "127.0.0.1"
    """Interface the gRPC server binds to. Use ``0.0.0.0`` (or ``[::]``) in a container."""

    grpc_port: int = Field(ge=0, le=65535)
    """Port the gRPC server binds to; 0 lets the OS choose (the host reports the bound
    port). Each service subclass sets its well-known default."""

    keys_addr: str = "127.0.0.1:50051"
    """``host:port`` of the identity (keys) service, whose ``Authenticate`` resolves the
    bearer token of every incoming call."""

    data_dir: Path = Field(
        default=Path("~/.shipyard"),
        # SHIPYARD_HOME is the name the client and `shipyard up` use for the same folder.
        validation_alias=AliasChoices("data_dir", "SHIPYARD_DATA_DIR", "SHIPYARD_HOME"),
    )
    """Folder for local state (embedded NATS/PostgreSQL data, object store, logs).
    ``SHIPYARD_DATA_DIR`` or ``SHIPYARD_HOME``; ``~`` is expanded."""

    log_level: LogLevel = "INFO"
    """Lowest level that is logged: DEBUG, INFO, WARNING, ERROR or CRITICAL."""

    log_json: bool = True
    """Log one JSON object per line on stderr (for collectors); false gives plain text
    for people reading a terminal."""

    otlp_endpoint: str | None = None
    """OTLP/gRPC collector (e.g. ``http://127.0.0.1:4317``) that receives traces. Unset:
    spans are still created (trace ids appear in logs and are propagated) but not
    exported."""

    internal_token: str = ""
    """Shared secret the services of one installation use to call each other (the gateway
    asking the scheduler for routes). ``shipyard up`` generates one per installation; on
    Kubernetes it comes from a Secret. Empty: internal calls need an admin token."""

    auth_cache_seconds: float = Field(default=1.0, ge=0)
    """How long an answer of the identity service (token to principal) is reused. Longer
    means fewer calls to it but a revoked token keeps working that long; 0 disables the
    cache."""

    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    """On SIGTERM, how long in-flight calls and background tasks get to finish before they
    are cancelled. Keep it below the orchestrator's kill timeout (30 s on Kubernetes)."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Keeps the documentation of fields a subclass overrides without a docstring
        (``grpc_port: int = 50052``), so every field stays documented."""
        super().__pydantic_init_subclass__(**kwargs)
        inherited = False
        for name, field in cls.model_fields.items():
            if field.description:
                continue
            for base in cls.__mro__[1:]:
                parent = getattr(base, "model_fields", {}).get(name)
                if parent is not None and parent.description:
                    field.description = parent.description
                    inherited = True
                    break
        if inherited:
            cls.model_rebuild(force=True)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        # `SHIPYARD_LOG_LEVEL=debug` is what people type.
        return value.upper() if isinstance(value, str) else value

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def grpc_address(self) -> str:
        """``host:port`` the gRPC server binds to (IPv6 hosts are bracketed)."""
        host = self.grpc_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.grpc_port}"
