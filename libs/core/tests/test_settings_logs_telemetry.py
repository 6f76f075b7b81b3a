"""CommonSettings, configure_logging and the trace-context helpers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from shipyard_core.logs import configure_logging
from shipyard_core.settings import CommonSettings
from shipyard_core.telemetry import (
    configure_tracing,
    current_trace_ids,
    extract_context,
    inject_headers,
)


class QuotaLikeSettings(CommonSettings):
    service_name: str = "quota"
    grpc_port: int = 50052

    default_cpu: int = 16
    """CPU cores a group gets without a quota."""


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for key in list(os.environ):
        if key.startswith("SHIPYARD_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_defaults_and_subclass_overrides(clean_env: pytest.MonkeyPatch) -> None:
    settings = QuotaLikeSettings()
    assert settings.service_name == "quota"
    assert settings.grpc_port == 50052
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.database_url == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert settings.keys_addr == "127.0.0.1:50051"
    assert settings.data_dir == Path("~/.shipyard").expanduser()
    assert (settings.log_level, settings.log_json) == ("INFO", True)
    assert settings.otlp_endpoint is None
    assert settings.auth_cache_seconds == 1.0
    assert settings.shutdown_grace_seconds == 10
    assert settings.grpc_address == "127.0.0.1:50052"


def test_environment_wins_over_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("SHIPYARD_GRPC_PORT", "0")
    clean_env.setenv("SHIPYARD_LOG_LEVEL", "debug")
    clean_env.setenv("SHIPYARD_LOG_JSON", "false")
    clean_env.setenv("SHIPYARD_HOME", str(tmp_path))
    clean_env.setenv("SHIPYARD_DEFAULT_CPU", "4")
    clean_env.setenv("SHIPYARD_SOMETHING_FOR_ANOTHER_SERVICE", "x")  # ignored, not an error
    settings = QuotaLikeSettings()
    assert (settings.grpc_port, settings.log_level, settings.log_json) == (0, "DEBUG", False)
    assert settings.data_dir == tmp_path
    assert settings.default_cpu == 4
    clean_env.setenv("SHIPYARD_DATA_DIR", str(tmp_path / "data"))
    assert QuotaLikeSettings().data_dir == tmp_path / "data"


def test_every_field_is_documented_even_when_overridden() -> None:
    undocumented = [
        name for name, field in QuotaLikeSettings.model_fields.items() if not field.description
    ]
    assert undocumented == []
    assert "Port" in (QuotaLikeSettings.model_fields["grpc_port"].description or "")


def test_service_name_and_port_are_required_in_the_base(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="service_name"):
        CommonSettings()


@pytest.fixture
def tracing() -> TracerProvider:
    return configure_tracing("test", None)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield stream
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_service_trace_and_extra(
    tracing: TracerProvider, log_stream: io.StringIO
) -> None:
    configure_logging(QuotaLikeSettings(log_json=True), stream=log_stream)
    log = logging.getLogger("shipyard.test")
    log.info("outside")
    with trace.get_tracer("t").start_as_current_span("op") as span:
        log.warning("scaled %s", "iris", extra={"replicas": 3, "path": Path("/x")})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    outside, scaled, failed = (json.loads(line) for line in log_stream.getvalue().splitlines())

    assert outside["service"] == "quota"
    assert "trace_id" not in outside
    assert outside["time"].endswith("Z")
    assert "T" in outside["time"]
    assert scaled["level"] == "WARNING"
    assert scaled["logger"] == "shipyard.test"
    assert scaled["message"] == "scaled iris"
    assert scaled["replicas"] == 3
    assert scaled["path"] == "/x"
    assert scaled["trace_id"] == trace.format_trace_id(span.get_span_context().trace_id)
    assert scaled["span_id"] == trace.format_span_id(span.get_span_context().span_id)
    assert "ValueError: boom" in failed["exception"]


def test_reconfiguring_replaces_the_handler_and_text_mode_is_plain(
    log_stream: io.StringIO,
) -> None:
    configure_logging(QuotaLikeSettings(log_json=True), stream=io.StringIO())
    configure_logging(QuotaLikeSettings(log_json=False, log_level="DEBUG"), stream=log_stream)
    logging.getLogger("shipyard.test").debug("hello", extra={"deployment": "iris"})
    (line,) = log_stream.getvalue().splitlines()
    assert not line.startswith("{")
    assert "DEBUG" in line
    assert "shipyard.test hello deployment=iris" in line


def test_configure_tracing_twice_returns_the_same_provider(tracing: TracerProvider) -> None:
    assert configure_tracing("test", None) is tracing
    assert trace.get_tracer_provider() is tracing


def test_headers_round_trip(tracing: TracerProvider) -> None:
    assert inject_headers({}) == {}  # no span, no bogus traceparent
    assert current_trace_ids() is None
    with trace.get_tracer("t").start_as_current_span("publish") as span:
        headers = inject_headers({"Nats-Msg-Id": "e-1"})
        assert headers["Nats-Msg-Id"] == "e-1"
        assert headers["traceparent"].split("-")[1] == trace.format_trace_id(
            span.get_span_context().trace_id
        )
    # A consumer's span continues the publisher's trace, whatever it was doing itself.
    tracer = trace.get_tracer("t")
    carried = extract_context({"Traceparent": headers["traceparent"]})
    with (
        tracer.start_as_current_span("unrelated"),
        tracer.start_as_current_span("consume", context=carried) as consumer,
    ):
        assert consumer.get_span_context().trace_id == span.get_span_context().trace_id
    assert not trace.get_current_span(extract_context(None)).get_span_context().is_valid
