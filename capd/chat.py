"""A model conversation's parts, independent of any API: the messages of a model's context,
the specs of the tools offered to it, and a tool call's arguments as a model wrote them.

Providers translate these to and from their APIs; tools, the context and engines use them
without knowing any provider.
"""

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from protocol.events import ThinkingBlock, ToolCall
from protocol.framing import shape_problem

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
    truncated: bool = False
    thinking: tuple[ThinkingBlock, ...] = ()

    @property
    def unfinished(self) -> bool:
        """An assistant reply cut short, by a pause or by max_tokens, to be continued."""
        return self.role == "assistant" and (self.interrupted or self.truncated)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


def parse_tool_arguments(raw: str) -> dict[str, Any]:
    """A tool call's streamed JSON arguments: `{}` when empty, kept under INVALID_JSON_KEY
    when they are not a JSON object within the bounds of a request (protocol.framing)."""
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict) and shape_problem(value, raw.encode()) is None:
        return value
    return {INVALID_JSON_KEY: raw}
