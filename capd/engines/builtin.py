"""The builtin engine: capd's own agent loop of notifications in, model call, tool calls, again.

`drive_turn` runs as the pod's turn task. The controller interrupts it (pause, cancel,
stop) by cancelling the task: a streaming model call keeps its partial text as an
`interrupted` assistant message, a running tool is killed by the tool itself.
"""

import asyncio
from collections.abc import Awaitable, Callable

from capd.backoff import backoff_s
from capd.chat import INVALID_JSON_KEY, ChatMessage
from capd.compaction import (
    MIN_PIECE_TOKENS,
    SUMMARY_SYSTEM_PROMPT,
    Cut,
    Room,
    clip,
    excerpt_summary,
    pieces,
    plan_cut,
    reply_tokens,
    summary_message,
    summary_prompt,
    tools_tokens,
    transcript_lines,
    unread_start,
)
from capd.engines.base import (
    CompactOrder,
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
from capd.tokens import BYTES_PER_TOKEN, message_tokens, text_tokens
from capd.tools.base import ToolOutcome
from capd.window import context_window, window_in_error
from protocol.errors import ProtocolError
from protocol.events import (
    AssistantMessage,
    CompactionSkipped,
    CompactionStarted,
    ContextCompacted,
    Retry,
    TextDelta,
    ThinkingDelta,
    ToolCallDelta,
    ToolCallStart,
    ToolResult,
    Usage,
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
ASSUMED_WINDOW = 8192
"""The window a requested compaction measures against when the window is not known."""
NOTHING_TO_COMPACT = (
    "nothing to compact: the context holds only messages the model has not answered yet "
    "(and the summary of a compaction before)"
)
SMALLER_PIECES = 3
"""How many times a summary call that overflows is made again with half the transcript."""


class DoesNotFit(Exception):
    """The newest messages alone do not fit the window: a compaction took them out of the
    context (the history keeps them) and the turn ends with this message."""


class BuiltinEngine:
    can_compact = True

    def __init__(self, model: ModelConfig) -> None:
        self.provider: Provider = make_provider(model)
        self._model = model

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
            done = await self._compact(host, order, None)
        except ProviderError as exc:
            raise ProtocolError("provider_error", f"compaction failed: {exc.message}") from exc
        except DoesNotFit as exc:
            raise ProtocolError("invalid_request", str(exc)) from exc
        if not done:
            raise ProtocolError("invalid_request", NOTHING_TO_COMPACT)

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
            if host.compact_wanted is not None:
                await self._requested(host, turn.turn_id)
            elif (order := self._due(host)) is not None:
                await self._compact(host, order, turn.turn_id)
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

    async def _reply(self, host: TurnHost, turn: Turn) -> ModelReply:
        """The step's model call. When the provider says the context is too long for the
        model, the context is compacted and the call made again, once; a second overflow
        compacts the whole context, so the next turn starts within the window."""
        try:
            return await self._call_model(host, turn.turn_id, lambda: self._stream_once(host, turn))
        except ProviderError as exc:
            if not exc.overflow:
                raise
            await self._compact(host, CompactOrder("overflow"), turn.turn_id, exc)
        try:
            return await self._call_model(host, turn.turn_id, lambda: self._stream_once(host, turn))
        except ProviderError as exc:
            if not exc.overflow:
                raise
            order = CompactOrder("overflow")
            await self._compact(host, order, turn.turn_id, exc, whole=True)
            raise DoesNotFit(
                "the context did not fit the model's window even after it was compacted, so "
                "all of it was compacted for the next turn; the server said: "
                f"{exc.message}"
            ) from exc

    async def _requested(self, host: TurnHost, turn_id: str) -> None:
        """The compaction a `compact` request asked for while the turn ran. A pause leaves
        it asked for, made when the turn resumes; one not made says why."""
        order = host.compact_wanted
        assert order is not None
        try:
            made = await self._compact(host, order, turn_id)
        except ProviderError as exc:
            host.compact_wanted = None
            _skipped(host, turn_id, f"compaction failed: {exc.message}")
            raise
        except DoesNotFit:
            host.compact_wanted = None  # made, and the turn ends: see DoesNotFit
            raise
        host.compact_wanted = None
        if not made:
            _skipped(host, turn_id, NOTHING_TO_COMPACT)

    def _window(self, host: TurnHost) -> int | None:
        model = self._model
        return context_window(model.context_window, host.context.learned_window, model.name)

    def _due(self, host: TurnHost) -> CompactOrder | None:
        """An automatic compaction, when this call's context and its reply's room would
        fill more than limits.compact_at of a known window."""
        window = self._window(host)
        if window is None:
            return None
        tools = tools_tokens(host.toolbox.specs())
        used = host.context.tokens(host.manifest.system_prompt, tools) + reply_tokens(self._model)
        return CompactOrder("auto") if used > host.manifest.limits.compact_at * window else None

    async def _compact(
        self,
        host: TurnHost,
        order: CompactOrder,
        turn_id: str | None,
        overflow: ProviderError | None = None,
        *,
        whole: bool = False,
    ) -> bool:
        """Summarise the older part of the context and commit `context_compacted`; False
        when there was nothing to summarise and the newest messages fit. `overflow` is the
        error that asked for it; `whole` compacts everything (a second overflow). Raises
        DoesNotFit, after compacting everything, when the newest messages alone do not fit.
        Cancelling it (a pause) leaves the context as it was."""
        context = host.context
        messages, seqs, previous = list(context.messages), list(context.seqs), context.summary
        if not messages:
            return False
        system = host.manifest.system_prompt
        fixed = text_tokens(system) + tools_tokens(host.toolbox.specs())
        before = context.tokens(system, fixed - text_tokens(system))
        known = (overflow and window_in_error(overflow.message)) or self._window(host)
        # Unknown, the window is at least what was sent last, or less than what overflowed.
        measured = known or (before if order.trigger == "overflow" else max(before, ASSUMED_WINDOW))
        room = Room.of(measured, host.manifest.limits.compact_at, reply_tokens(self._model))
        if whole:
            cut = Cut(len(messages), 0, fits=True)
        else:
            # After an overflow the estimates proved too low: only the unread stays.
            cut = plan_cut(messages, fixed, room, keep_recent=order.trigger == "auto")
        older = messages[1 if previous is not None else 0 : cut.index]
        # An automatic compaction that would not shrink the context is not made.
        worth = sum(map(message_tokens, older)) > (room.summary if order.trigger == "auto" else 0)
        if not worth:
            if cut.fits and order.trigger != "overflow":
                return False
            cut = Cut(len(messages), 0, fits=False)
            older = messages[1 if previous is not None else 0 :]
        host.emit_ephemeral(CompactionStarted(turn_id=turn_id, trigger=order.trigger))
        summary, usage = await self._summarise(
            host, turn_id, older, previous, order.instructions, room
        )
        after = fixed + message_tokens(summary_message(summary)) + cut.kept_tokens
        host.commit_compaction(
            ContextCompacted(
                turn_id=turn_id,
                trigger=order.trigger,
                summary=summary,
                through_seq=seqs[cut.index - 1],
                tokens_before=before,
                tokens_after=after,
                window=known,
                usage=usage,
            )
        )
        if not cut.fits:
            unread = sum(map(message_tokens, messages[unread_start(messages) :]))
            said = f"; the server said: {overflow.message}" if overflow else ""
            raise DoesNotFit(
                f"the newest messages (about {unread} tokens) do not fit the model's context "
                f"window ({room.window} tokens, {room.window - room.fit} kept for the reply): "
                "they stay in the history but left the context; send something shorter, or "
                "give the model a larger window (llama.cpp --ctx-size, vLLM --max-model-len)"
                f"{said}"
            )
        return True

    async def _summarise(
        self,
        host: TurnHost,
        turn_id: str | None,
        older: list[ChatMessage],
        previous: str | None,
        instructions: str | None,
        room: Room,
    ) -> tuple[str, Usage]:
        """The summary of `older` (after the summary so far, `previous`), made piece by
        piece, each piece's summary carried into the next; when a summary call overflows,
        it all starts again with pieces half as long, at most SMALLER_PIECES times."""
        usage = Usage()
        if instructions:
            instructions = clip(instructions, room.piece // 2 * BYTES_PER_TOKEN)
        piece_tokens = max(MIN_PIECE_TOKENS, room.piece - text_tokens(instructions or ""))
        halvings = 0
        while True:
            summary = previous
            try:
                lines = transcript_lines(older, max(1, piece_tokens // 2))
                for piece in pieces(lines, piece_tokens):
                    prompt = summary_prompt(piece, summary, instructions)
                    reply = await self._call_model(
                        host, turn_id, lambda p=prompt: self._summary_once(p, room.summary)
                    )
                    usage.input_tokens += reply.usage.input_tokens
                    usage.output_tokens += reply.usage.output_tokens
                    summary = reply.text.strip() or excerpt_summary(piece, summary, room.summary)
            except ProviderError as exc:
                if not exc.overflow or halvings == SMALLER_PIECES:
                    raise
                halvings += 1
                piece_tokens //= 2
                continue
            assert summary is not None  # `older` is never empty without a summary before
            return summary, usage

    async def _summary_once(self, prompt: str, max_tokens: int) -> ModelReply:
        request = ModelRequest(
            SUMMARY_SYSTEM_PROMPT, [ChatMessage("user", prompt)], max_tokens=max_tokens
        )
        async for item in self.provider.stream(request):
            if isinstance(item, ModelReply):
                return item
        raise ProviderError("the provider ended its stream without a reply", retryable=True)

    async def _call_model(
        self, host: TurnHost, turn_id: str | None, attempt: Callable[[], Awaitable[ModelReply]]
    ) -> ModelReply:
        """One model call, sent again after a failure that may pass: at most
        `model.max_retries` times, and only once more when a 500 names the same cause again."""
        max_retries = self._model.max_retries
        tries = 0
        previous: ProviderError | None = None
        while True:
            try:
                return await attempt()
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
        # model.tool_choice goes with a turn's first call only, so the loop can end.
        choice = self._model.tool_choice if turn.steps == 0 else None
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


def _skipped(host: TurnHost, turn_id: str, reason: str) -> None:
    host.emit_ephemeral(CompactionSkipped(turn_id=turn_id, trigger="request", reason=reason))


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
