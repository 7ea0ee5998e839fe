"""The OpenTelemetry side of `capd.tracing`: the only module that imports opentelemetry,
imported only when tracing is on.

Spans go through a BatchSpanProcessor whose thread exports them over OTLP/HTTP
(protobuf), so the event loop never waits on the collector. The exporter reads the
endpoint, headers, timeout and compression from the standard `OTEL_EXPORTER_OTLP_*`
variables. The provider is made the global one, so the mcp SDK's own spans join the
turn's trace.
"""

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from capd import semconv as t
from capd.metrics import UNKNOWN_TOOL
from capd.providers.base import ModelReply, ProviderError
from capd.tools.base import ToolOutcome
from protocol import VERSION
from protocol.events import TurnResult
from protocol.manifest import Manifest, ModelConfig

log = logging.getLogger(__name__)

SHUTDOWN_S = 3.0
"""How long shutdown waits for the last spans to be exported."""
DEFAULT_SERVERS = {
    "openai": ("api.openai.com", 443),
    "anthropic": ("api.anthropic.com", 443),
}


class SpannedTurn(Protocol):
    """What a turn's span reads of it (`capd.engines.base.Turn`; not imported, as the
    engines import the toolbox, which imports `capd.tracing`)."""

    turn_id: str
    invoke: str
    traceparent: str | None


class Tracer:
    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("capd", VERSION)
        self.capture_content = os.environ.get(t.CAPTURE_CONTENT_VARIABLE, "").lower() == "true"

    @classmethod
    def from_env(cls, debug: bool) -> "Tracer":
        if (unsupported := unsupported_setting()) is not None:
            log.warning("%s: capd exports traces over OTLP with http/protobuf only", unsupported)
        if not debug:  # the exporter logs a warning per failed attempt
            logging.getLogger("opentelemetry").setLevel(logging.ERROR)
        resource = Resource.create(
            {
                "service.name": os.environ.get("OTEL_SERVICE_NAME") or "capd",
                "service.version": VERSION,
                "service.instance.id": f"{socket.gethostname()}/{os.getpid()}",
            }
        )
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        log.info("exporting traces (OTLP/HTTP)")
        return cls(provider)

    async def shutdown(self) -> None:
        """Export the spans still queued, waiting at most SHUTDOWN_S. The export blocks (a
        collector on this loop would never answer), so it runs in a thread; a daemon one,
        as the SDK's own timeout is 30 s and a collector that is down keeps it retrying:
        the process exits without waiting for it."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def export_the_rest() -> None:
            self._provider.shutdown()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(done.set)

        threading.Thread(target=export_the_rest, name="otel shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_S):
                await done.wait()

    # -- invoke_agent -------------------------------------------------------------------

    def start_turn(
        self,
        manifest: Manifest,
        turn: "SpannedTurn",
        previous: Span | None,
    ) -> tuple[Span, contextvars.Context]:
        """The `invoke_agent` span of a turn's running segment, and the context to run the
        turn task in (the span current there, not in the caller's)."""
        links = []
        if (caller := _span_context(turn.traceparent)) is not None:
            links.append(Link(caller, {t.LINK_KIND: "run"}))
        if previous is not None:
            links.append(Link(previous.get_span_context(), {t.LINK_KIND: "resumed"}))
        attributes: dict[str, Any] = {
            t.OPERATION: "invoke_agent",
            t.PROVIDER: t.provider_name(manifest),
            t.AGENT_NAME: manifest.name,
            t.AGENT_ID: manifest.name,
            t.CONVERSATION_ID: manifest.name,
            t.TURN_ID: turn.turn_id,
            t.TURN_INVOKE: turn.invoke,
        }
        if manifest.model is not None and manifest.model.name:
            attributes[t.REQUEST_MODEL] = manifest.model.name
        span = self._tracer.start_span(
            f"invoke_agent {manifest.name}",
            context=otel_context.Context(),  # a new trace: what asked for it is a link
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            links=links,
        )
        ctx = contextvars.copy_context()
        ctx.run(otel_context.attach, trace.set_span_in_context(span))
        return span, ctx

    def end_turn(
        self,
        manifest: Manifest,
        turn: "SpannedTurn",
        span: Span | None,
        result: TurnResult | None,
        error: str | None,
    ) -> None:
        """End a segment: with the turn's result, or (None) paused. A turn that ends with
        no segment running (cancelled while paused, or before its first segment) gets a
        zero-length one, linked `resumed` to the last, to carry its result."""
        if span is None or not span.is_recording():
            if result is None:
                return
            span, _ = self.start_turn(manifest, turn, span)
        if result is None:
            span.set_attribute(t.TURN_PAUSED, True)
        else:
            span.set_attribute(t.TURN_RESULT, result)
            if result in ("errored", "limit_reached"):
                span.set_attribute(t.ERROR_TYPE, result)
            if result == "errored":
                span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    # -- chat ---------------------------------------------------------------------------

    async def chat(
        self, config: ModelConfig, call: Callable[[], Awaitable[ModelReply]]
    ) -> ModelReply:
        """A `chat` span around a whole model call, its retries included."""
        attributes: dict[str, Any] = {
            t.OPERATION: "chat",
            t.PROVIDER: t.model_provider(config),
            t.REQUEST_STREAM: True,
        }
        if config.name:
            attributes[t.REQUEST_MODEL] = config.name
        if config.max_tokens is not None:
            attributes[t.REQUEST_MAX_TOKENS] = config.max_tokens
        if config.temperature is not None:
            attributes[t.REQUEST_TEMPERATURE] = config.temperature
        if (server := _server(config)) is not None:
            attributes[t.SERVER_ADDRESS], attributes[t.SERVER_PORT] = server
        name = f"chat {config.name}" if config.name else "chat"
        with self._tracer.start_as_current_span(
            name,
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                reply = await call()
            except ProviderError as exc:
                _failed(span, _error_type(exc), exc.message)
                raise
            except Exception as exc:
                _failed(span, type(exc).__qualname__, str(exc))
                raise
            span.set_attribute(t.INPUT_TOKENS, reply.usage.input_tokens)
            span.set_attribute(t.OUTPUT_TOKENS, reply.usage.output_tokens)
            span.set_attribute(t.FINISH_REASONS, [_finish_reason(reply)])
            return reply

    def retry(self, attempt: int, wait_s: float, error: ProviderError) -> None:
        """A retry of the current `chat` span's model call, as an event of it."""
        trace.get_current_span().add_event(
            "retry",
            {"attempt": attempt, "wait_ms": int(wait_s * 1000), t.ERROR_TYPE: _error_type(error)},
        )

    # -- execute_tool -------------------------------------------------------------------

    async def tool(
        self,
        name: str,
        offered: bool,
        tool_type: str,
        call_id: str | None,
        description: str | None,
        arguments: dict[str, Any],
        run: Callable[[], Awaitable[ToolOutcome]],
    ) -> ToolOutcome:
        """An `execute_tool` span around a tool call; `tool_type` is `function` (capd's
        tools) or `extension` (an MCP server's). A tool the pod does not offer is named
        `unknown` in the span's name, as in the metrics: the model makes such names up."""
        attributes: dict[str, Any] = {
            t.OPERATION: "execute_tool",
            t.TOOL_NAME: name,
            t.TOOL_TYPE: tool_type,
        }
        if call_id is not None:
            attributes[t.TOOL_CALL_ID] = call_id
        if description:
            attributes[t.TOOL_DESCRIPTION] = description
        if self.capture_content:
            attributes[t.TOOL_ARGUMENTS] = orjson.dumps(arguments).decode()
        with self._tracer.start_as_current_span(
            f"execute_tool {name if offered else UNKNOWN_TOOL}",
            kind=SpanKind.INTERNAL,
            attributes=attributes,
        ) as span:
            outcome = await run()
            if outcome.is_error:
                span.set_attribute(t.ERROR_TYPE, "tool_error")
                span.set_status(Status(StatusCode.ERROR))
            if self.capture_content:
                span.set_attribute(t.TOOL_RESULT, outcome.output)
            return outcome

    def traceparent(self) -> str | None:
        ctx = trace.get_current_span().get_span_context()
        if not ctx.is_valid:
            return None
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def unsupported_setting() -> str | None:
    """`VARIABLE=value` of a setting capd does not follow (it warns and goes on): an
    exporter other than OTLP, a protocol other than http/protobuf (the traces' own
    variable first, as the exporter reads them)."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "otlp")
    if exporter.strip().lower() != "otlp":
        return f"OTEL_TRACES_EXPORTER={exporter}"
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        if value := os.environ.get(name):
            return None if value == "http/protobuf" else f"{name}={value}"
    return None


def _span_context(traceparent: str | None) -> SpanContext | None:
    """The span a W3C `traceparent` names (the protocol checked its form), None if invalid."""
    if traceparent is None:
        return None
    _, trace_id, span_id, flags = traceparent.split("-")
    ctx = SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )
    return ctx if ctx.is_valid else None


def _server(config: ModelConfig) -> tuple[str, int] | None:
    if config.base_url is None:
        return DEFAULT_SERVERS.get(config.provider)
    url = urlsplit(config.base_url)
    if url.hostname is None:
        return None
    return url.hostname, url.port or (443 if url.scheme == "https" else 80)


def _finish_reason(reply: ModelReply) -> str:
    if reply.truncated:
        return "length"
    return "tool_calls" if reply.tool_calls else "stop"


def _error_type(error: ProviderError) -> str:
    return str(error.status) if error.status else type(error).__name__


def _failed(span: Span, error_type: str, message: str) -> None:
    span.set_attribute(t.ERROR_TYPE, error_type)
    span.set_status(Status(StatusCode.ERROR, message))
