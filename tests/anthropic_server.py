"""A local Anthropic Messages server for tests: real HTTP/1.1, real SSE.

    async with AnthropicTestServer() as server:
        server.enqueue(TextReply(["Hel", "lo"]), ToolUseReply([ToolUse("bash", {...})]))
        ...  # point a provider, or a capd subprocess, at server.base_url

Each POST /v1/messages takes the next queued reply (see `tests/sse_server.py` for queues
per model, held replies and framing); with none queued, a streamed text reply says
"(no scripted reply)". Events are framed as the API frames them, `event: <type>` then
`data: <json>`, and a stream is `message_start`, per content block `content_block_start`,
its deltas and `content_block_stop` (a `ping` after the first start), then
`message_delta` and `message_stop`.

Like the real API, the server refuses (400 `invalid_request_error`, no reply taken) a
request that breaks the rules a client most easily gets wrong: missing `max_tokens` or
`anthropic-version`, roles that do not alternate, empty content or text, a trailing
assistant turn (newer models refuse prefills), tool uses without their results first in
the next user turn, and, with thinking on, a tool-use turn that does not start with its
signed thinking.
"""

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.sse_server import ErrorResponse, SseStream, SseTestServer, compact

MESSAGES_PATH = "/v1/messages"
FALLBACK_TEXT = "(no scripted reply)"


@dataclass(frozen=True)
class TextReply:
    """A streamed text answer; `thinking` pieces stream first, as one signed thinking block."""

    text: str | Sequence[str] = "Hello!"
    thinking: Sequence[str] = ()
    signature: str = ""
    """The thinking block's signature; empty: a fresh one."""
    delay_ms: float = 0
    """Pause between events."""
    input_tokens: int = 10
    output_tokens: int = 5
    stop_reason: str = "end_turn"
    """"max_tokens": the reply was cut off by max_tokens."""


@dataclass(frozen=True)
class ToolUse:
    """One tool_use block of a ToolUseReply; a `str` for `input` is streamed verbatim."""

    name: str
    input: dict[str, Any] | str = field(default_factory=dict)
    id: str = ""
    """Empty: a fresh `toolu_...` id."""


@dataclass(frozen=True)
class ToolUseReply:
    """A streamed answer ending in tool_use blocks (stop_reason `tool_use`), one after the
    other as the API streams parallel calls; each input arrives as an empty
    `input_json_delta` and then pieces of `fragment_chars` characters."""

    calls: Sequence[ToolUse]
    text: Sequence[str] = ()
    """Pieces of a text block before the calls."""
    thinking: Sequence[str] = ()
    signature: str = ""
    redacted: str = ""
    """When set, a redacted_thinking block with this data follows the thinking."""
    fragment_chars: int = 8
    delay_ms: float = 0
    input_tokens: int = 10
    output_tokens: int = 5
    stop_reason: str = "tool_use"
    """"max_tokens": cut off (give the last call's input as an incomplete JSON `str`)."""


@dataclass(frozen=True)
class ErrorReply:
    """A non-streamed error: `status` with `{"type": "error", "error": {"type", "message"}}`."""

    status: int
    message: str
    type: str = "invalid_request_error"
    retry_after: str | None = None
    """Value of a retry-after header, sent when set."""


@dataclass(frozen=True)
class StreamErrorReply:
    """Streams `text` pieces, then an `error` event, then ends the body, as the API does
    when it fails mid-stream (e.g. `overloaded_error`)."""

    message: str
    type: str = "overloaded_error"
    text: Sequence[str] = ()


@dataclass(frozen=True)
class DropReply:
    """Streams `text` pieces, then closes the connection without ending the body."""

    text: Sequence[str] = ("partial",)


@dataclass(frozen=True)
class RawStreamReply:
    """A 200 event stream whose `events` are written verbatim, one HTTP chunk each."""

    events: Sequence[str]
    delay_ms: float = 0


StreamedReply = TextReply | ToolUseReply | StreamErrorReply | DropReply | RawStreamReply
Reply = StreamedReply | ErrorReply


class AnthropicTestServer(SseTestServer[Reply]):
    """Serves queued replies to POST /v1/messages on 127.0.0.1 (a free port)."""

    PATH = MESSAGES_PATH

    def answer(self, reply: Reply, model: str) -> SseStream | ErrorResponse:
        if isinstance(reply, ErrorReply):
            headers = {"retry-after": reply.retry_after} if reply.retry_after is not None else {}
            return ErrorResponse(reply.status, _error_body(reply.message, reply.type), headers)
        return _stream_for(reply, model)

    def fallback(self) -> Reply:
        return TextReply(FALLBACK_TEXT)

    def error_body(self, message: str) -> bytes:
        return _error_body(message)

    def refuse(self, body: dict[str, Any], headers: dict[str, str]) -> ErrorResponse | None:
        if problem := _request_problem(body, headers):
            return ErrorResponse(400, _error_body(problem))
        return None


# -- requests -----------------------------------------------------------------------------


def _request_problem(body: dict[str, Any], headers: dict[str, str]) -> str | None:
    if "anthropic-version" not in headers:
        return "anthropic-version: header is required"
    if not body.get("model"):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    thinking = body.get("thinking")
    if thinking and thinking.get("budget_tokens", 0) >= body["max_tokens"]:
        return "`max_tokens` must be greater than `thinking.budget_tokens`"
    messages = body.get("messages")
    if not messages:
        return "messages: at least one message is required"
    if messages[-1]["role"] != "user":
        return "Prefilling assistant messages is not supported for this model."
    for position, message in enumerate(messages):
        where = f"messages.{position}"
        if message["role"] != ("user", "assistant")[position % 2]:
            return f"{where}: roles must alternate between user and assistant, starting with user"
        content = message["content"]
        if not content:
            return f"{where}: all messages must have non-empty content"
        if isinstance(content, list):
            if any(block["type"] == "text" and not block["text"] for block in content):
                return f"{where}: text content blocks must be non-empty"
            if problem := _tool_results_problem(messages, position):
                return problem
    if thinking and (problem := _thinking_problem(messages)):
        return problem
    return None


def _tool_results_problem(messages: list[dict[str, Any]], position: int) -> str | None:
    """Every tool_use of an assistant turn is answered first thing in the next user turn."""
    message = messages[position]
    if message["role"] != "assistant":
        return None
    uses = [block["id"] for block in message["content"] if block["type"] == "tool_use"]
    if not uses:
        return None
    following = messages[position + 1]["content"] if position + 1 < len(messages) else []
    following = following if isinstance(following, list) else []
    leading = []
    for block in following:
        if block["type"] != "tool_result":
            break
        leading.append(block["tool_use_id"])
    if sorted(leading) != sorted(uses):
        return (
            f"messages.{position + 1}: `tool_use` ids were found without `tool_result` blocks "
            f"immediately after: {', '.join(uses)}. Each `tool_use` block must have a "
            "corresponding `tool_result` block in the next message."
        )
    return None


def _thinking_problem(messages: list[dict[str, Any]]) -> str | None:
    """With thinking on, the assistant turn whose tool results end the request must start
    with the thinking block that came with it."""
    last = messages[-1]["content"]
    if len(messages) < 2 or not isinstance(last, list) or last[0]["type"] != "tool_result":
        return None
    first = messages[-2]["content"][0]
    if first["type"] == "redacted_thinking" or (
        first["type"] == "thinking" and first.get("signature")
    ):
        return None
    return (
        f"messages.{len(messages) - 2}.content.0.type: Expected `thinking` or "
        f"`redacted_thinking`, but found `{first['type']}`. When `thinking` is enabled, a "
        "final `assistant` message must start with a thinking block."
    )


def _error_body(message: str, type_: str = "invalid_request_error") -> bytes:
    error = {"type": "error", "error": {"type": type_, "message": message}}
    return compact({**error, "request_id": f"req_{secrets.token_hex(12)}"}).encode()


# -- responses ----------------------------------------------------------------------------


def _stream_for(reply: StreamedReply, model: str) -> SseStream:
    match reply:
        case TextReply():
            events = _Events(model, reply.input_tokens)
            events.thinking(reply.thinking, reply.signature)
            pieces = [reply.text] if isinstance(reply.text, str) else list(reply.text)
            events.text(pieces)
            return SseStream(events.end(reply.stop_reason, reply.output_tokens), reply.delay_ms)
        case ToolUseReply():
            events = _Events(model, reply.input_tokens)
            events.thinking(reply.thinking, reply.signature)
            if reply.redacted:
                events.block({"type": "redacted_thinking", "data": reply.redacted}, [])
            events.text(reply.text)
            for call in reply.calls:
                events.tool_use(call, reply.fragment_chars)
            return SseStream(events.end(reply.stop_reason, reply.output_tokens), reply.delay_ms)
        case StreamErrorReply():
            events = _Events(model, 10)
            events.text(reply.text)
            error = {"type": "error", "error": {"type": reply.type, "message": reply.message}}
            return SseStream([*events.frames, _sse("error", error)])
        case DropReply():
            events = _Events(model, 10)
            events.text(reply.text)
            return SseStream(events.frames, drop=True)
        case RawStreamReply():
            return SseStream([event.encode() for event in reply.events], reply.delay_ms)


class _Events:
    """The events of one message, built block by block."""

    def __init__(self, model: str, input_tokens: int) -> None:
        message = {
            "id": f"msg_{secrets.token_hex(12)}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        }
        self.frames = [_sse("message_start", {"type": "message_start", "message": message})]
        self._index = 0

    def block(self, content_block: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
        index = self._index
        self.frames.append(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": content_block},
            )
        )
        if index == 0:
            self.frames.append(_sse("ping", {"type": "ping"}))
        self.frames += [
            _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
            for d in deltas
        ]
        self.frames.append(
            _sse("content_block_stop", {"type": "content_block_stop", "index": index})
        )
        self._index += 1

    def thinking(self, pieces: Sequence[str], signature: str) -> None:
        if not pieces:
            return
        deltas = [{"type": "thinking_delta", "thinking": piece} for piece in pieces]
        signature = signature or f"sig_{secrets.token_hex(24)}"
        deltas.append({"type": "signature_delta", "signature": signature})
        self.block({"type": "thinking", "thinking": "", "signature": ""}, deltas)

    def text(self, pieces: Sequence[str]) -> None:
        if pieces:
            deltas = [{"type": "text_delta", "text": piece} for piece in pieces]
            self.block({"type": "text", "text": ""}, deltas)

    def tool_use(self, call: ToolUse, fragment_chars: int) -> None:
        arguments = call.input if isinstance(call.input, str) else compact(call.input)
        pieces = [""] + [
            arguments[start : start + fragment_chars]
            for start in range(0, len(arguments), fragment_chars)
        ]
        start = {
            "type": "tool_use",
            "id": call.id or f"toolu_{secrets.token_hex(12)}",
            "name": call.name,
            "input": {},
        }
        self.block(start, [{"type": "input_json_delta", "partial_json": p} for p in pieces])

    def end(self, stop_reason: str, output_tokens: int) -> list[bytes]:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
        return [
            *self.frames,
            _sse("message_delta", delta),
            _sse("message_stop", {"type": "message_stop"}),
        ]


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {compact(data)}\n\n".encode()
