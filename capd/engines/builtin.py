"""The builtin engine: capd's own agent loop of notifications in, model call, tool calls, again.

`drive_turn` runs as the pod's turn task. The controller interrupts it (pause, cancel,
stop) by cancelling the task: a streaming model call keeps its partial text as an
`interrupted` assistant message, a running tool is killed by the tool itself, and a
question a call waits on (`permissions` said `ask`) is closed with no answer.
"""

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from capd import metrics, tracing
from capd.backoff import backoff_s
from capd.chat import INVALID_JSON_KEY
from capd.engines.base import (
    CompactOrder,
    Engine,
    Turn,
    TurnHost,
    TurnOutcome,
    run_timed,
)
from capd.engines.compactor import NOTHING_TO_COMPACT, Compactor, DoesNotFit
from capd.engines.questions import Questions
from capd.permissions import (
    ALLOW_ALWAYS,
    ALLOW_ONCE,
    OPTIONS,
    REJECTED,
    Gate,
    can_ask,
    tool_call,
)
from capd.prices import cost_usd, price_of
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
from protocol.errors import ProtocolError
from protocol.events import (
    AssistantMessage,
    PermissionGrant,
    Retry,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolResult,
)
from protocol.manifest import TOOL_CHOICES, ModelConfig, Permissions

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
    can_compact = True
    checks_budget = True

    def __init__(self, model: ModelConfig, permissions: Permissions) -> None:
        self.provider: Provider = make_provider(model)
        self._model = model
        self._permissions = permissions
        self._questions = Questions()
        self._compactor = Compactor(self.provider, model, self._call_model)

    async def drive_turn(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        """Run steps until the model stops, a limit is hit, or the model call fails."""
        try:
            return await run_timed(host, turn, lambda: self._steps(host, turn))
        except ProviderError as exc:
            return TurnOutcome("errored", turn.output, _failure(exc))
        except DoesNotFit as exc:
            return TurnOutcome("errored", turn.output, str(exc))

    async def compact(self, host: TurnHost, order: CompactOrder) -> None:
        try:
            done = await self._compactor.compact(host, order, None)
        except ProviderError as exc:
            raise ProtocolError("provider_error", f"compaction failed: {exc.message}") from exc
        except DoesNotFit as exc:
            raise ProtocolError("invalid_request", str(exc)) from exc
        if not done:
            raise ProtocolError("invalid_request", NOTHING_TO_COMPACT)

    async def forget_session(self, host: TurnHost) -> bool:
        return False

    async def settle(self) -> None:
        pass

    def engine_state(self) -> None:
        return None

    def holds_process(self) -> bool:
        return False

    def crowded(self) -> bool:
        return False

    async def release(self) -> bool:
        return False

    def take_over(self, old: Engine) -> None:
        pass

    def answer_permission(self, request_id: str, option_id: str | None) -> None:
        if not can_ask(self._permissions):
            raise ProtocolError(
                "invalid_request",
                "this pod never asks for permission: no rule of its permissions, nor their "
                "default, says ask",
            )
        self._questions.answer(request_id, option_id)

    def mcp_status(self) -> list[dict[str, Any]]:
        return []

    async def aclose(self) -> None:
        await self.provider.aclose()

    async def _steps(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        """A reply max_tokens cut off is continued by the next step, at most
        limits.max_continuations times in a row; then the turn finishes with what it has."""
        limits = host.manifest.limits
        cut_in_a_row = 0
        while True:
            host.check_budget()
            host.inject_notes(turn.turn_id)
            await host.toolbox.servers_started()
            if turn.steps >= limits.max_steps:
                return TurnOutcome(
                    "limit_reached",
                    turn.output,
                    f"turn reached limits.max_steps={limits.max_steps}",
                )
            if host.compact_wanted is not None:
                await self._compactor.requested(host, turn.turn_id)
            elif (order := self._compactor.due(host)) is not None:
                await self._compactor.compact(host, order, turn.turn_id)
            reply = await self._reply(host, turn)
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
            gate = Gate(self._permissions, host.grants)
            for call in reply.tool_calls:
                cut = reply.truncated and INVALID_JSON_KEY in call.arguments
                approve = functools.partial(self._approve, host, turn, gate, call.id)
                outcome = (
                    CUT_CALL
                    if cut
                    else await host.toolbox.run(call.name, call.arguments, approve, call.id)
                )
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

    async def _approve(
        self,
        host: TurnHost,
        turn: Turn,
        gate: Gate,
        call_id: str,
        name: str,
        arguments: dict[str, Any],
    ) -> str | None:
        """What the pod's permissions say of the call: None (it runs), or why not."""
        action, rule = gate.decide(name, arguments)
        if action == "allow":
            return None
        if action == "deny":
            return gate.denial(rule)
        chosen = await self._questions.wait(
            host,
            turn.turn_id,
            tool_call(call_id, name, arguments),
            OPTIONS,
            PermissionGrant(rule=rule, tool=name),
        )
        return None if chosen in (ALLOW_ONCE, ALLOW_ALWAYS) else REJECTED

    async def _reply(self, host: TurnHost, turn: Turn) -> ModelReply:
        """The step's model call. When the provider says the context is too long for the
        model, the context is compacted and the call made again, once; a second overflow
        compacts the whole context, so the next turn starts within the window."""
        try:
            return await self._call_model(host, turn.turn_id, lambda: self._stream_once(host, turn))
        except ProviderError as exc:
            if not exc.overflow:
                raise
            await self._compactor.compact(host, CompactOrder("overflow"), turn.turn_id, exc)
        try:
            return await self._call_model(host, turn.turn_id, lambda: self._stream_once(host, turn))
        except ProviderError as exc:
            if not exc.overflow:
                raise
            order = CompactOrder("overflow")
            await self._compactor.compact(host, order, turn.turn_id, exc, whole=True)
            raise DoesNotFit(
                "the context did not fit the model's window even after it was compacted, so "
                "all of it was compacted for the next turn; the server said: "
                f"{exc.message}"
            ) from exc

    def _call_model(
        self, host: TurnHost, turn_id: str | None, attempt: Callable[[], Awaitable[ModelReply]]
    ) -> Awaitable[ModelReply]:
        """The model call, in a `chat` span when tracing is on (a plain function, so that
        off it costs no coroutine of its own)."""
        if tracing.TRACER is None:
            return self._retrying(host, turn_id, attempt)
        call = functools.partial(self._retrying, host, turn_id, attempt)
        return tracing.TRACER.chat(self._model, call)

    @metrics.timed_model_call
    async def _retrying(
        self, host: TurnHost, turn_id: str | None, attempt: Callable[[], Awaitable[ModelReply]]
    ) -> ModelReply:
        """One model call, sent again after a failure that may pass: at most
        `model.max_retries` times, and only once more when a 500 names the same cause again.
        The reply's usage carries its cost at the model's price, when that is known."""
        max_retries = self._model.max_retries
        tries = 0
        previous: ProviderError | None = None
        while True:
            try:
                reply = await attempt()
                reply.usage.cost_usd = cost_usd(price_of(self._model), reply.usage)
                return reply
            except ProviderError as exc:
                if _repeats(exc, previous):
                    exc.message = f"{exc.message} (the same answer twice; not retried again)"
                    raise
                if not exc.retryable or tries >= max_retries:
                    if tries:
                        exc.message = f"{exc.message} (gave up after {tries + 1} attempts)"
                    raise
                previous = exc
                tries += 1
                wait_s = (
                    exc.retry_after_s
                    if exc.retry_after_s is not None
                    else backoff_s(tries, RETRY_BASE_S)
                )
                metrics.model_retried(self._model.provider)
                if tracing.TRACER is not None:
                    tracing.TRACER.retry(tries, wait_s, exc)
                if turn_id is not None:
                    host.emit_ephemeral(
                        Retry(
                            turn_id=turn_id,
                            attempt=tries,
                            max_attempts=max_retries,
                            wait_ms=int(wait_s * 1000),
                            error=exc.message,
                        )
                    )
                await asyncio.sleep(wait_s)

    async def _stream_once(self, host: TurnHost, turn: Turn) -> ModelReply:
        system_prompt = host.manifest.system_prompt
        specs = host.toolbox.specs()
        # model.tool_choice goes with a turn's first call only, so the loop can end.
        choice = self._model.tool_choice if turn.steps == 0 else None
        if choice not in (None, *TOOL_CHOICES) and all(spec.name != choice for spec in specs):
            choice = None  # an MCP server's tool it does not offer now (it is down)
        request = ModelRequest(system_prompt, host.context.messages, specs, choice)
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
    """A 500 that names its cause and says word for word what the last attempt's said
    comes from the request, not from a passing fault (whose generic words, "internal
    server error", are retried as usual)."""
    return (
        previous is not None
        and error.specific
        and error.status == 500
        and previous.status == 500
        and error.message == previous.message
    )
