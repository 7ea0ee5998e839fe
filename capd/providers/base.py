"""The provider seam: (system prompt, messages, tools) in, a stream of deltas and a reply out.

A provider's `stream()` yields TextChunk / ThinkingChunk / ToolCallBegin / ToolCallArgs as
they arrive and ends with exactly one ModelReply. Failures raise ProviderError; the agent
loop retries the retryable ones. Cancelling the iteration must abort the request at once.
"""

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from capd.chat import ChatMessage, ToolSpec
from protocol.events import ThinkingBlock, ToolCall, Usage

CONTINUE_TEXT = "(Your reply above was interrupted. Continue it from exactly where it stopped.)"
CONTINUE_CUT_TEXT = (
    "(Your reply above was cut off at the output token limit. Continue it from exactly "
    "where it stopped.)"
)


def continue_text(message: ChatMessage) -> str:
    """The user line that follows an assistant reply cut short, so the model continues it:
    APIs take a last assistant message as a prefill (which newer models refuse) or start
    afresh, and some chat templates want roles to alternate."""
    return CONTINUE_CUT_TEXT if message.truncated else CONTINUE_TEXT


@dataclass(frozen=True, slots=True)
class ModelRequest:
    system_prompt: str
    messages: Sequence[ChatMessage]
    tools: Sequence[ToolSpec] = ()
    tool_choice: str | None = None
    """`auto`, `required`, `none` or a tool's name; None leaves it to the API's default."""
    max_tokens: int | None = None
    """The reply's limit for this call (a summary's), in place of `model.max_tokens`."""


@dataclass(frozen=True, slots=True)
class TextChunk:
    text: str


@dataclass(frozen=True, slots=True)
class ThinkingChunk:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallBegin:
    call_id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArgs:
    call_id: str
    json: str


@dataclass(slots=True)
class ModelReply:
    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    thinking: list[ThinkingBlock] = field(default_factory=list)
    """Complete thinking blocks, for APIs that want them back (the deltas stream anyway)."""
    truncated: bool = False
    """The model's output limit (max_tokens) cut the reply off."""


StreamItem = TextChunk | ThinkingChunk | ToolCallBegin | ToolCallArgs | ModelReply


class ProviderError(Exception):
    """A failed model call. `retryable` marks failures that may pass when the same request
    is sent again (408, 409, 429, most 5xx, connection failures); `overflow` says the
    conversation no longer fits the model's context window, which no retry can mend."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        retry_after_s: float | None = None,
        overflow: bool = False,
        specific: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable and not overflow
        self.status = status
        self.retry_after_s = retry_after_s
        self.overflow = overflow
        self.specific = specific
        """The server said what went wrong (not a generic "internal server error"): the same
        words again mean the request itself fails, not a passing fault."""


class Provider(Protocol):
    def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]: ...

    async def aclose(self) -> None: ...
