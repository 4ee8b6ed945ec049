"""Settings of metrics and TLS, and tracing's reading of the OTEL_* environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from pydantic import ValidationError

from usersvc.config import Settings
from usersvc.tracing import exporter_names, tracer_provider_from_env


def test_tls_settings_must_be_complete(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="go together"):
        Settings(tls_cert_file=tmp_path / "a.crt")
    with pytest.raises(ValidationError, match="needs USERSVC_TLS_CERT_FILE"):
        Settings(tls_client_ca_file=tmp_path / "ca.pem")
    with pytest.raises(ValidationError, match="host:port"):
        Settings(metrics_address="9090")


def test_tracing_is_off_unless_the_environment_names_an_exporter() -> None:
    assert exporter_names({}) == []
    assert exporter_names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) == ["otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "otlp,console"}) == ["otlp", "console"]
    disabled = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}
    assert exporter_names(disabled) == []
    assert tracer_provider_from_env({}) is None
    provider = tracer_provider_from_env(
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SERVICE_NAME": "users-eu"}
    )
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "users-eu"
    provider.shutdown()
    with pytest.raises(ValueError, match="not installed"):
        tracer_provider_from_env({"OTEL_TRACES_EXPORTER": "carrier-pigeon"})
    # No global provider is installed by any of this.
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
