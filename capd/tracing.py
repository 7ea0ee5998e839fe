"""OpenTelemetry traces, off unless asked for: the facade the rest of capd calls.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
is set and `OTEL_SDK_DISABLED` is not `true`, and the `otel` extra is installed. Only then
does `setup` import `capd.otel`, the one module that imports opentelemetry; `TRACER` stays
None otherwise, and every call site checks it first (`if tracing.TRACER is not None`),
which costs a module attribute lookup: the OTel API's no-op spans cost ~16 µs each.

The attribute names are the GenAI semantic conventions' (semantic-conventions-genai,
Development status), written here rather than imported: the Python semconv package marks
them all deprecated (moved), and capd never emits the replaced `gen_ai.system`.
"""

import logging
import os
from typing import TYPE_CHECKING

from protocol.manifest import AcpEngine, ClaudeCodeEngine, Manifest

if TYPE_CHECKING:
    from capd.otel import Tracer

log = logging.getLogger(__name__)

TRACER: "Tracer | None" = None
"""The tracer while tracing is on; None (the default) means no span is ever made."""

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
CAPTURE_CONTENT_VARIABLE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
MISSING_EXTRA = (
    "%s is set but the OpenTelemetry packages are not installed (%s); capd runs without "
    "traces: pip install 'capd[otel]'"
)

OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
AGENT_NAME = "gen_ai.agent.name"
AGENT_ID = "gen_ai.agent.id"
CONVERSATION_ID = "gen_ai.conversation.id"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_STREAM = "gen_ai.request.stream"
FINISH_REASONS = "gen_ai.response.finish_reasons"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TOOL_NAME = "gen_ai.tool.name"
TOOL_TYPE = "gen_ai.tool.type"
TOOL_CALL_ID = "gen_ai.tool.call.id"
TOOL_DESCRIPTION = "gen_ai.tool.description"
TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
TOOL_RESULT = "gen_ai.tool.call.result"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
TURN_ID = "capd.turn.id"
TURN_INVOKE = "capd.turn.invoke"
TURN_RESULT = "capd.turn.result"
TURN_PAUSED = "capd.turn.paused"
LINK_KIND = "capd.link"
"""On a link of an `invoke_agent` span: `run` (the `traceparent` that asked for the turn)
or `resumed` (the turn's previous running segment)."""


def enabled(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> str | None:
    """The variable that turns tracing on, or None when it is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    return next((name for name in ENDPOINT_VARIABLES if environ.get(name)), None)


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


def provider_name(manifest: Manifest) -> str:
    """`gen_ai.provider.name` of a pod: its model's provider, or its external engine's."""
    match manifest.engine:
        case ClaudeCodeEngine():
            return "anthropic"
        case AcpEngine():
            return "acp"
    assert manifest.model is not None
    provider = manifest.model.provider
    return "capd.scripted" if provider == "scripted" else provider
