"""The agent loop of one turn: notifications in, model call, tool calls, again.

`drive_turn` runs as the pod's turn task. The controller interrupts it (pause, cancel,
stop) by cancelling the task: a streaming model call keeps its partial text as an
`interrupted` assistant message, a running tool is killed by the tool itself.
"""

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from capd.context import Context
from capd.providers.base import (
    ModelReply,
    ModelRequest,
    Provider,
    ProviderError,
    TextChunk,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
    ToolSpec,
)
from capd.tools import run_tool
from capd.tools.base import ToolContext, ToolOutcome
from protocol.events import (
    AssistantMessage,
    DurableEvent,
    Invoke,
    Notification,
    PodEventBase,
    Retry,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolResult,
    TurnResult,
)
from protocol.manifest import Manifest

RETRY_BASE_S = 0.5
RETRY_CAP_S = 30.0


@dataclass
class Turn:
    """A turn in progress. `steps`, `output` and `partial` follow from its assistant_message
    events; the host updates them as it applies each event, live or at restore."""

    turn_id: str
    invoke: Invoke
    steps: int = 0
    running_s: float = 0.0
    output: str = ""
    partial: str = ""


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    result: TurnResult
    output: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PendingNote:
    """A buffered notify or pod_event, waiting to enter the model's context."""

    kind: Invoke
    source: str
    text: str
    pod_event_seq: int | None = None
    """For a pod_event: the seq of its `pod_event_received` event."""
    pending_id: int | None = None
    """For a notify: its row in the store's `pending` table, deleted as it is injected."""


class TurnHost(Protocol):
    """What a turn needs from its pod; the controller provides it."""

    manifest: Manifest
    provider: Provider
    context: Context
    tool_specs: list[ToolSpec]
    tool_context: ToolContext
    notes: list[PendingNote]

    def emit(self, event: DurableEvent, *, consumed: Sequence[int] = ()) -> None: ...

    def emit_ephemeral(self, event: PodEventBase) -> None: ...


async def drive_turn(host: TurnHost, turn: Turn) -> TurnOutcome:
    """Run steps until the model stops, a limit is hit, or the model call fails."""
    limits = host.manifest.limits
    started = time.monotonic()
    deadline = asyncio.timeout(max(0.0, limits.turn_timeout_s - turn.running_s))
    try:
        async with deadline:
            return await _steps(host, turn)
    except TimeoutError:
        if not deadline.expired():
            raise
        return TurnOutcome(
            "limit_reached",
            turn.output,
            f"turn ran longer than limits.turn_timeout_s={limits.turn_timeout_s:g}",
        )
    except ProviderError as exc:
        return TurnOutcome("errored", turn.output, f"model call failed: {exc.message}")
    finally:
        turn.running_s += time.monotonic() - started


async def _steps(host: TurnHost, turn: Turn) -> TurnOutcome:
    max_steps = host.manifest.limits.max_steps
    while True:
        inject_notes(host, turn.turn_id)
        if turn.steps >= max_steps:
            return TurnOutcome(
                "limit_reached", turn.output, f"turn reached limits.max_steps={max_steps}"
            )
        reply = await _call_model(host, turn)
        host.emit(
            AssistantMessage(
                turn_id=turn.turn_id,
                text=reply.text,
                tool_calls=reply.tool_calls,
                usage=reply.usage,
                thinking=reply.thinking,
            )
        )
        if not reply.tool_calls:
            return TurnOutcome("finished", turn.output)
        for call in reply.tool_calls:
            outcome = await _run_call(host, call)
            host.emit(
                ToolResult(
                    turn_id=turn.turn_id,
                    call_id=call.id,
                    name=call.name,
                    output=outcome.output,
                    is_error=outcome.is_error,
                )
            )


async def _run_call(host: TurnHost, call: ToolCall) -> ToolOutcome:
    """Run a tool the pod offers; any other name is an error the model can read."""
    enabled = [spec.name for spec in host.tool_specs]
    if call.name in enabled:
        return await run_tool(call.name, call.arguments, host.tool_context)
    listed = ", ".join(enabled) or "none"
    return ToolOutcome(f"tool {call.name} is not enabled for this pod (enabled: {listed})", True)


def inject_notes(host: TurnHost, turn_id: str) -> None:
    """Move buffered notifications into the context, each as a `notification` event."""
    while host.notes:
        note = host.notes.pop(0)
        host.emit(
            Notification(
                turn_id=turn_id,
                source=note.source,
                text=note.text,
                pod_event_seq=note.pod_event_seq,
            ),
            consumed=[note.pending_id] if note.pending_id is not None else [],
        )


async def _call_model(host: TurnHost, turn: Turn) -> ModelReply:
    max_retries = host.manifest.model.max_retries
    attempt = 0
    while True:
        try:
            return await _stream_once(host, turn)
        except ProviderError as exc:
            if not exc.retryable or attempt >= max_retries:
                if attempt:
                    exc.message = f"{exc.message} (gave up after {attempt + 1} attempts)"
                raise
            attempt += 1
            wait_s = exc.retry_after_s if exc.retry_after_s is not None else _backoff_s(attempt)
            host.emit_ephemeral(
                Retry(
                    turn_id=turn.turn_id,
                    attempt=attempt,
                    max_attempts=max_retries,
                    wait_ms=int(wait_s * 1000),
                    error=exc.message,
                )
            )
            await asyncio.sleep(wait_s)


async def _stream_once(host: TurnHost, turn: Turn) -> ModelReply:
    request = ModelRequest(host.manifest.system_prompt, host.context.messages, host.tool_specs)
    turn_id = turn.turn_id
    streamed: list[str] = []
    try:
        async for item in host.provider.stream(request):
            match item:
                case TextChunk(text=text):
                    streamed.append(text)
                    host.emit_ephemeral(TextDelta(turn_id=turn_id, text=text))
                case ThinkingChunk(text=text):
                    host.emit_ephemeral(ThinkingDelta(turn_id=turn_id, text=text))
                case ToolCallBegin(call_id=call_id, name=name):
                    host.emit_ephemeral(ToolCallStart(turn_id=turn_id, call_id=call_id, name=name))
                case ToolCallArgs(call_id=call_id, json=fragment):
                    host.emit_ephemeral(
                        ToolCallDelta(turn_id=turn_id, call_id=call_id, json=fragment)
                    )
                case ModelReply():
                    return item
    except asyncio.CancelledError:
        if streamed:
            text = "".join(streamed)
            host.emit(AssistantMessage(turn_id=turn_id, text=text, interrupted=True))
        raise
    raise ProviderError("the provider ended its stream without a reply", retryable=True)


def _backoff_s(attempt: int) -> float:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... capped at 30 s."""
    return min(RETRY_CAP_S, RETRY_BASE_S * 2 ** (attempt - 1)) * random.uniform(1, 1.25)
