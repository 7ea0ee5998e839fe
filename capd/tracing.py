"""OpenTelemetry traces, off unless asked for: the facade the rest of capd calls.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
is set, `OTEL_SDK_DISABLED` is not `true` nor `OTEL_TRACES_EXPORTER` `none`, and the
`otel` extra is installed. Only then
does `setup` import `capd.otel`, the one module that imports opentelemetry; `TRACER` stays
None otherwise, and every call site checks it first (`if tracing.TRACER is not None`),
which costs a module attribute lookup: the OTel API's no-op spans cost ~16 µs each.
Names and attributes: `capd.semconv`.
"""

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capd.otel import Tracer

log = logging.getLogger(__name__)

TRACER: "Tracer | None" = None
"""The tracer while tracing is on; None (the default) means no span is ever made."""

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
MISSING_EXTRA = (
    "%s is set but the OpenTelemetry packages are not installed (%s); capd runs without "
    "traces: pip install 'capd[otel]'"
)


def enabled() -> str | None:
    """The variable that turns tracing on, or None when it is off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    return next((name for name in ENDPOINT_VARIABLES if os.environ.get(name)), None)


def setup(debug: bool) -> None:
    """Turn tracing on if the environment asks for it; a missing extra is one warning."""
    global TRACER
    variable = enabled()
    if variable is None:
        return
    try:
        from capd import otel
    except ImportError as exc:
        log.warning(MISSING_EXTRA, variable, exc)
        return
    try:
        TRACER = otel.Tracer.from_env(debug)
    except Exception as exc:  # a bad OTEL_* setting: the exporter's own words
        log.warning("capd runs without traces: %s: %s", type(exc).__name__, exc)


async def shutdown() -> None:
    """Export what is left (bounded) and stop tracing."""
    global TRACER
    tracer, TRACER = TRACER, None
    if tracer is not None:
        await tracer.shutdown()


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the current span (a tool call's), None when tracing is off."""
    return None if TRACER is None else TRACER.traceparent()
