"""The provider seam: (system prompt, messages, tools) in, a stream of deltas and a reply out.

A provider's `stream()` yields TextChunk / ThinkingChunk / ToolCallBegin / ToolCallArgs as
they arrive and ends with exactly one ModelReply. Failures raise ProviderError; the agent
loop retries the retryable ones. Cancelling the iteration must abort the request at once.
"""

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from protocol.events import ThinkingBlock, ToolCall, Usage

INVALID_JSON_KEY = "__invalid_json__"
"""Key under which a provider keeps tool-call arguments that were not a JSON object."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One entry of a model's context, independent of any API's message format."""

    role: Literal["user", "assistant", "tool"]
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    call_id: str = ""
    name: str = ""
    is_error: bool = False
    interrupted: bool = False
    thinking: tuple[ThinkingBlock, ...] = ()


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ModelRequest:
    system_prompt: str
    messages: Sequence[ChatMessage]
    tools: Sequence[ToolSpec] = ()


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
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable and not overflow
        self.status = status
        self.retry_after_s = retry_after_s
        self.overflow = overflow


def parse_tool_arguments(raw: str) -> dict[str, Any]:
    """A tool call's streamed JSON arguments: `{}` when empty, kept under INVALID_JSON_KEY
    when they are not a JSON object."""
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {INVALID_JSON_KEY: raw}


class Provider(Protocol):
    def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]: ...

    async def aclose(self) -> None: ...
