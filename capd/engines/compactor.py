"""Compactions of the builtin engine: when one is due, and making it with the pod's own
model (capd/compaction.py decides where the cut falls and writes the prompt).

A compaction inside a turn runs in the turn's task, so a pause or cancel stops it like
any model call; nothing changes until its `context_compacted` is committed.
"""

from collections.abc import Awaitable, Callable

from capd.chat import ChatMessage
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
    transcript_lines,
    unread_start,
)
from capd.engines.base import CompactOrder, TurnHost
from capd.prices import add_usage
from capd.providers.base import ModelReply, ModelRequest, Provider, ProviderError
from capd.tokens import BYTES_PER_TOKEN, message_tokens, text_tokens
from capd.window import context_window, window_in_error
from protocol.events import CompactionSkipped, CompactionStarted, ContextCompacted, Usage
from protocol.manifest import ModelConfig

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


CallModel = Callable[
    [TurnHost, str | None, Callable[[], Awaitable[ModelReply]]], Awaitable[ModelReply]
]
"""The engine's model call with its retries: (host, turn id, one attempt) → the reply."""


class Compactor:
    def __init__(self, provider: Provider, model: ModelConfig, call_model: CallModel) -> None:
        self._provider = provider
        self._model = model
        self._call_model = call_model

    async def requested(self, host: TurnHost, turn_id: str) -> None:
        """The compaction a `compact` request asked for while the turn ran. A pause leaves
        it asked for, made when the turn resumes; one not made says why."""
        order = host.compact_wanted
        assert order is not None
        try:
            made = await self.compact(host, order, turn_id)
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

    def window(self, host: TurnHost) -> int | None:
        model = self._model
        return context_window(model.context_window, host.context.learned_window, model.name)

    def due(self, host: TurnHost) -> CompactOrder | None:
        """An automatic compaction, when this call's context and its reply's room would
        fill more than limits.compact_at of a known window."""
        window = self.window(host)
        if window is None:
            return None
        context = host.context.tokens(host.manifest.system_prompt, host.toolbox.spec_tokens)
        used = context + reply_tokens(self._model)
        return CompactOrder("auto") if used > host.manifest.limits.compact_at * window else None

    async def compact(
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
        fixed = text_tokens(system) + host.toolbox.spec_tokens
        before = context.tokens(system, fixed - text_tokens(system))
        known = (overflow and window_in_error(overflow.message)) or self.window(host)
        # Unknown, the window is at least what was sent last, or less than what overflowed.
        measured = known or (before if order.trigger == "overflow" else max(before, ASSUMED_WINDOW))
        room = Room.of(measured, host.manifest.limits.compact_at, reply_tokens(self._model))
        if whole:
            cut = Cut(len(messages), 0, fits=True)
        else:
            # After an overflow the estimates proved too low: only the unread stays.
            cut = plan_cut(messages, fixed, room, keep_recent=order.trigger == "auto")
        first = 0 if previous is None else 1  # the summary so far goes in as such
        older = messages[first : cut.index]
        # An automatic compaction that would not shrink the context is not made.
        worth = sum(map(message_tokens, older)) > (room.summary if order.trigger == "auto" else 0)
        if not worth:
            if cut.fits and order.trigger != "overflow":
                return False
            cut = Cut(len(messages), 0, fits=False)
            older = messages[first:]
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
                    usage = add_usage(usage, reply.usage)
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
        async for item in self._provider.stream(request):
            if isinstance(item, ModelReply):
                return item
        raise ProviderError("the provider ended its stream without a reply", retryable=True)


def _skipped(host: TurnHost, turn_id: str, reason: str) -> None:
    host.emit_ephemeral(CompactionSkipped(turn_id=turn_id, trigger="request", reason=reason))
