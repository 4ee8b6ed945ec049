"""W3C trace context kept beside work that continues later (outbox rows), and links back to it.

OpenTelemetry's API only (no SDK, no gRPC): with tracing off, the current span is invalid and
nothing is stored.
"""

from __future__ import annotations

from opentelemetry import propagate, trace

TRACEPARENT = "traceparent"


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, to store beside work that continues later."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get(TRACEPARENT)


def link_to(traceparent: str | None) -> list[trace.Link]:
    """A span link to the trace a stored traceparent names (none when absent or invalid)."""
    if not traceparent:
        return []
    context = propagate.extract({TRACEPARENT: traceparent})
    span_context = trace.get_current_span(context).get_span_context()
    return [trace.Link(span_context)] if span_context.is_valid else []
