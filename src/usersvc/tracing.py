"""OpenTelemetry tracing, configured by the standard OTEL_* environment variables.

Tracing is on when an exporter is named (`OTEL_TRACES_EXPORTER`, e.g. `otlp` or `console`) or
an OTLP endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
and `OTEL_SDK_DISABLED` is not `true`. Otherwise nothing is installed: no interceptor, no
database hooks, so an untraced server pays nothing. The sampler (`OTEL_TRACES_SAMPLER`,
`OTEL_TRACES_SAMPLER_ARG`, default parentbased_always_on), resource (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`) and propagators (`OTEL_PROPAGATORS`, default W3C tracecontext and
baggage) come from the SDK's own reading of the environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.util._importlib_metadata import entry_points

log = logging.getLogger(__name__)

SERVICE_NAME = "usersvc"
# Probes and reflection are not worth a trace each: a kubelet alone calls health every few
# seconds. (The stock aio instrumentation also cannot wrap health Watch, which writes to its
# context instead of yielding.)
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for; empty when tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not named:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [n.strip() for n in named.split(",") if n.strip()]
    return [] if names == ["none"] else [n for n in names if n != "none"]


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found and name == "otlp":
        # "otlp" is the meta-package's name; the gRPC exporter is what is installed.
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
        )
        transport = "http" if protocol.startswith("http") else "grpc"
        found = entry_points(group="opentelemetry_traces_exporter", name=f"otlp_proto_{transport}")
    if not found:
        raise ValueError(f"OTEL_TRACES_EXPORTER names {name!r}, which is not installed")
    exporter_class = next(iter(found)).load()
    exporter: SpanExporter = exporter_class()
    return exporter


def tracer_provider_from_env(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """A tracer provider exporting where OTEL_* says, or None when tracing is off."""
    env = os.environ if environ is None else environ
    names = exporter_names(env)
    if not names:
        return None
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or SERVICE_NAME})
    provider = TracerProvider(resource=resource)
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    log.info("tracing on", extra={"exporters": names})
    return provider


def server_interceptor(provider: trace.TracerProvider) -> grpc.aio.ServerInterceptor:
    """opentelemetry-instrumentation-grpc's grpc.aio server interceptor: continues a caller's
    `traceparent`, one SERVER span per call (health and reflection left out)."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    def traced(details: grpc.HandlerCallDetails) -> bool:
        return not details.method.lstrip("/").startswith(UNTRACED_SERVICES)

    interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=provider, filter_=traced
    )
    return interceptor


def instrument_engine(engine: Any, provider: trace.TracerProvider) -> None:
    """Database spans (opentelemetry-instrumentation-sqlalchemy) for one engine's statements."""
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.instrumentation.sqlalchemy.version import __version__
    from opentelemetry.metrics import NoOpMeter

    tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy", __version__, provider)
    # The instrumentation also counts pool usage on a meter; usersvc exports pool gauges to
    # Prometheus already, so the OpenTelemetry side gets a meter that drops them.
    usage = NoOpMeter("usersvc").create_up_down_counter("db.client.connections.usage")
    EngineTracer(tracer, getattr(engine, "sync_engine", engine), usage)  # type: ignore[no-untyped-call]
