"""The builtin engine: capd's own agent loop of notifications in, model call, tool calls, again.

`drive_turn` runs as the pod's turn task. The controller interrupts it (pause, cancel,
stop) by cancelling the task: a streaming model call keeps its partial text as an
`interrupted` assistant message, a running tool is killed by the tool itself.
"""

import asyncio

from capd.backoff import backoff_s
from capd.chat import INVALID_JSON_KEY
from capd.engines.base import (
    Turn,
    TurnHost,
    TurnOutcome,
    never_asks,
    run_timed,
)
from capd.providers import make_provider
from capd.providers.base import (
    ModelReply,
    ModelRequest,
    Provider,
    ProviderError,
    TextChunk,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
)
from capd.tools.base import ToolOutcome
from protocol.events import (
    AssistantMessage,
    Retry,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolResult,
)
from protocol.manifest import ModelConfig

RETRY_BASE_S = 0.5
"""The wait before a model call's first retry; it doubles with each retry after it."""
CUT_CALL = ToolOutcome(
    "not run: max_tokens cut the reply off while this call's arguments were being written, "
    "so they are incomplete; make the call again, in smaller parts if it is long (for "
    "example, write a long file in pieces)",
    True,
)
"""The result of a tool call whose arguments a reply cut off by max_tokens left unfinished."""


class BuiltinEngine:
    def __init__(self, model: ModelConfig) -> None:
        self.provider: Provider = make_provider(model)
        self._max_retries = model.max_retries
        self._tool_choice = model.tool_choice

    async def drive_turn(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        """Run steps until the model stops, a limit is hit, or the model call fails."""
        try:
            return await run_timed(host, turn, lambda: self._steps(host, turn))
        except ProviderError as exc:
            return TurnOutcome("errored", turn.output, _failure(exc))

    def answer_permission(self, request_id: str, option_id: str | None) -> None:
        raise never_asks("builtin")

    async def aclose(self) -> None:
        await self.provider.aclose()

    async def _steps(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        """A reply max_tokens cut off is continued by the next step, at most
        limits.max_continuations times in a row; then the turn finishes with what it has."""
        limits = host.manifest.limits
        cut_in_a_row = 0
        while True:
            host.inject_notes(turn.turn_id)
            if turn.steps >= limits.max_steps:
                return TurnOutcome(
                    "limit_reached",
                    turn.output,
                    f"turn reached limits.max_steps={limits.max_steps}",
                )
            reply = await self._call_model(host, turn)
            host.emit(
                AssistantMessage(
                    turn_id=turn.turn_id,
                    text=reply.text,
                    tool_calls=reply.tool_calls,
                    usage=reply.usage,
                    thinking=reply.thinking,
                    truncated=reply.truncated,
                )
            )
            for call in reply.tool_calls:
                cut = reply.truncated and INVALID_JSON_KEY in call.arguments
                outcome = CUT_CALL if cut else await host.toolbox.run(call.name, call.arguments)
                host.emit(
                    ToolResult(
                        turn_id=turn.turn_id,
                        call_id=call.id,
                        name=call.name,
                        output=outcome.output,
                        is_error=outcome.is_error,
                    )
                )
            cut_in_a_row = cut_in_a_row + 1 if reply.truncated else 0
            if cut_in_a_row > limits.max_continuations:
                return TurnOutcome("finished", turn.output)
            if not reply.tool_calls and not reply.truncated:
                return TurnOutcome("finished", turn.output)

    async def _call_model(self, host: TurnHost, turn: Turn) -> ModelReply:
        """One model call, sent again after a failure that may pass: at most
        `model.max_retries` times, and only once more when a 500 names the same cause again."""
        max_retries = self._max_retries
        attempt = 0
        previous: ProviderError | None = None
        while True:
            try:
                return await self._stream_once(host, turn)
            except ProviderError as exc:
                if _repeats(exc, previous):
                    exc.message = f"{exc.message} (the same answer twice; not retried again)"
                    raise
                if not exc.retryable or attempt >= max_retries:
                    if attempt:
                        exc.message = f"{exc.message} (gave up after {attempt + 1} attempts)"
                    raise
                previous = exc
                attempt += 1
                wait_s = (
                    exc.retry_after_s
                    if exc.retry_after_s is not None
                    else backoff_s(attempt, RETRY_BASE_S)
                )
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

    async def _stream_once(self, host: TurnHost, turn: Turn) -> ModelReply:
        system_prompt = host.manifest.system_prompt
        # model.tool_choice goes with a turn's first call only, so the loop can end.
        choice = self._tool_choice if turn.steps == 0 else None
        request = ModelRequest(system_prompt, host.context.messages, host.toolbox.specs(), choice)
        turn_id = turn.turn_id
        streamed: list[str] = []
        try:
            async for item in self.provider.stream(request):
                match item:
                    case TextChunk(text=text):
                        streamed.append(text)
                        host.emit_ephemeral(TextDelta(turn_id=turn_id, text=text))
                    case ThinkingChunk(text=text):
                        host.emit_ephemeral(ThinkingDelta(turn_id=turn_id, text=text))
                    case ToolCallBegin(call_id=call_id, name=name):
                        host.emit_ephemeral(
                            ToolCallStart(turn_id=turn_id, call_id=call_id, name=name)
                        )
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


def _failure(error: ProviderError) -> str:
    """The turn's error line for a model call that failed for good."""
    if not error.overflow:
        return f"model call failed: {error.message}"
    return (
        "the conversation no longer fits the model's context window, so the next turns "
        "will fail the same way: give the model a larger context (llama.cpp --ctx-size, "
        "vLLM --max-model-len) or a smaller model.max_tokens, or go on in a new pod; "
        f"the server said: {error.message}"
    )


def _repeats(error: ProviderError, previous: ProviderError | None) -> bool:
    """A 500 that names its cause, or a 200 whose stream ended before its reply did, that
    says word for word what the last attempt's said comes from the request, not from a
    passing fault (whose generic words, "internal server error", are retried as usual)."""
    return (
        previous is not None
        and error.specific
        and error.status in (200, 500)
        and error.status == previous.status
        and error.message == previous.message
    )
