"""A local Anthropic Messages server for tests: real HTTP/1.1, real SSE.

    async with AnthropicTestServer() as server:
        server.enqueue(TextReply(["Hel", "lo"]), ToolUseReply([ToolUse("bash", {...})]))
        ...  # point a provider, or a capd subprocess, at server.base_url

Each POST /v1/messages takes the next queued reply (see `tests/fakes/sse_server.py` for queues
per model, held replies and framing); with none queued, a streamed text reply says
"(no scripted reply)". Events are framed as the API frames them, `event: <type>` then
`data: <json>`, and a stream is `message_start`, per content block `content_block_start`,
its deltas and `content_block_stop` (a `ping` after the first start), then
`message_delta` and `message_stop`. A request that does not ask to stream (Claude Code
asks so again when a stream fails) gets a text or tool-use reply as one JSON message.

Like the real API, the server refuses (400 `invalid_request_error`, no reply taken) a
request that breaks the rules a client most easily gets wrong: missing `max_tokens` or
`anthropic-version`, roles that do not alternate, empty content or text, a trailing
assistant turn (newer models refuse prefills), tool uses without their results first in
the next user turn, a client tool without `input_schema`, more than four `cache_control`
breakpoints and, with thinking `enabled` (not `adaptive`), a tool-use turn that does not
start with its signed thinking. It takes what Claude Code sends: `role: "system"` entries
among the messages (outside the user/assistant alternation), the `?beta=true` query,
`POST /v1/messages/count_tokens` (an estimate); other routes get a 404 `not_found_error`.
"""

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.sse_server import ErrorResponse, SseStream, SseTestServer, compact

MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
MAX_CACHE_BREAKPOINTS = 4
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

    def answer_whole(self, reply: Reply, model: str) -> ErrorResponse | None:
        # Claude Code asks again without `stream` when a stream fails.
        if isinstance(reply, TextReply | ToolUseReply):
            return ErrorResponse(200, compact(_events_for(reply, model).message).encode())
        return None

    def fallback(self) -> Reply:
        return TextReply(FALLBACK_TEXT)

    def error_body(self, message: str) -> bytes:
        return _error_body(message)

    def refuse(self, body: dict[str, Any], headers: dict[str, str]) -> ErrorResponse | None:
        if problem := _request_problem(body, headers):
            return ErrorResponse(400, _error_body(problem))
        return None

    def route(self, method: str, path: str, body: bytes) -> ErrorResponse | None:
        if (method, path) == ("POST", COUNT_TOKENS_PATH):
            # An estimate, as Claude Code's /context asks for it: a token per 4 bytes.
            return ErrorResponse(200, compact({"input_tokens": len(body) // 4}).encode())
        return ErrorResponse(404, _error_body(f"{method} {path} not found", "not_found_error"))


# -- requests -----------------------------------------------------------------------------


def _request_problem(body: dict[str, Any], headers: dict[str, str]) -> str | None:
    if "anthropic-version" not in headers:
        return "anthropic-version: header is required"
    if not body.get("model"):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    thinking = body.get("thinking") or {}
    enabled = thinking.get("type") == "enabled"  # not "adaptive": the model may not think
    if enabled and thinking.get("budget_tokens", 0) >= body["max_tokens"]:
        return "`max_tokens` must be greater than `thinking.budget_tokens`"
    if problem := _tools_problem(body.get("tools") or []) or _cache_control_problem(body):
        return problem
    messages = body.get("messages")
    if not messages:
        return "messages: at least one message is required"
    # `system` entries (Claude Code sends them mid-conversation) stand outside the turns.
    turns = [(position, m) for position, m in enumerate(messages) if m["role"] != "system"]
    if not turns or turns[-1][1]["role"] != "user":
        return "Prefilling assistant messages is not supported for this model."
    for position, message in enumerate(messages):
        if message["role"] == "system" and (problem := _content_problem(message, position)):
            return problem
    for index, (position, message) in enumerate(turns):
        where = f"messages.{position}"
        if message["role"] != ("user", "assistant")[index % 2]:
            return f"{where}: roles must alternate between user and assistant, starting with user"
        if problem := _content_problem(message, position) or _tool_results_problem(turns, index):
            return problem
    if enabled and (problem := _thinking_problem(turns)):
        return problem
    return None


def _content_problem(message: dict[str, Any], position: int) -> str | None:
    content = message["content"]
    if not content:
        return f"messages.{position}: all messages must have non-empty content"
    if isinstance(content, list) and any(
        block["type"] == "text" and not block["text"] for block in content
    ):
        return f"messages.{position}: text content blocks must be non-empty"
    return None


def _tools_problem(tools: list[dict[str, Any]]) -> str | None:
    """Client tools need a name and an input_schema (server tools have a `type` instead)."""
    for position, tool in enumerate(tools):
        for key in ("name", "input_schema"):
            if key not in tool and tool.get("type", "custom") == "custom":
                return f"tools.{position}.custom.{key}: Field required"
    return None


def _cache_control_problem(body: dict[str, Any]) -> str | None:
    system = body.get("system")
    blocks = [
        *(system if isinstance(system, list) else []),
        *(body.get("tools") or []),
        *(
            block
            for message in body.get("messages") or []
            if isinstance(message["content"], list)
            for block in message["content"]
        ),
    ]
    marked = sum("cache_control" in block for block in blocks)
    if marked > MAX_CACHE_BREAKPOINTS:
        return (
            f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {marked}."
        )
    return None


def _tool_results_problem(turns: list[tuple[int, dict[str, Any]]], index: int) -> str | None:
    """Every tool_use of an assistant turn is answered first thing in the next user turn."""
    _, message = turns[index]
    if message["role"] != "assistant":
        return None
    uses = [block["id"] for block in message["content"] if block["type"] == "tool_use"]
    if not uses:
        return None
    position, following = turns[index + 1] if index + 1 < len(turns) else (turns[-1][0] + 1, {})
    content = following.get("content")
    leading = []
    for block in content if isinstance(content, list) else []:
        if block["type"] != "tool_result":
            break
        leading.append(block["tool_use_id"])
    if sorted(leading) != sorted(uses):
        return (
            f"messages.{position}: `tool_use` ids were found without `tool_result` blocks "
            f"immediately after: {', '.join(uses)}. Each `tool_use` block must have a "
            "corresponding `tool_result` block in the next message."
        )
    return None


def _thinking_problem(turns: list[tuple[int, dict[str, Any]]]) -> str | None:
    """With thinking on, the assistant turn whose tool results end the request must start
    with the thinking block that came with it."""
    last = turns[-1][1]["content"]
    if len(turns) < 2 or not isinstance(last, list) or last[0]["type"] != "tool_result":
        return None
    position, assistant = turns[-2]
    first = assistant["content"][0]
    if first["type"] == "redacted_thinking" or (
        first["type"] == "thinking" and first.get("signature")
    ):
        return None
    return (
        f"messages.{position}.content.0.type: Expected `thinking` or "
        f"`redacted_thinking`, but found `{first['type']}`. When `thinking` is enabled, a "
        "final `assistant` message must start with a thinking block."
    )


def _error_body(message: str, type_: str = "invalid_request_error") -> bytes:
    error = {"type": "error", "error": {"type": type_, "message": message}}
    return compact({**error, "request_id": f"req_{secrets.token_hex(12)}"}).encode()


# -- responses ----------------------------------------------------------------------------


def _events_for(reply: TextReply | ToolUseReply, model: str) -> "_Events":
    """The events of a streamed reply, and the message they make."""
    events = _Events(model, reply.input_tokens)
    events.thinking(reply.thinking, reply.signature)
    match reply:
        case TextReply():
            events.text([reply.text] if isinstance(reply.text, str) else list(reply.text))
            events.end(reply.stop_reason, reply.output_tokens)
        case ToolUseReply():
            if reply.redacted:
                events.block({"type": "redacted_thinking", "data": reply.redacted}, [])
            events.text(reply.text)
            for call in reply.calls:
                events.tool_use(call, reply.fragment_chars)
            events.end(reply.stop_reason, reply.output_tokens)
    return events


def _stream_for(reply: StreamedReply, model: str) -> SseStream:
    match reply:
        case TextReply() | ToolUseReply():
            return SseStream(_events_for(reply, model).frames, reply.delay_ms)
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
    """The events of one message, built block by block, and the message they make."""

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
        self._message = message
        self._blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        self._index = 0

    @property
    def message(self) -> dict[str, Any]:
        """The whole message, as a request that does not stream gets it."""
        content = [_whole_block(start, deltas) for start, deltas in self._blocks]
        return {**self._message, "content": content}

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
        self._blocks.append((content_block, deltas))
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

    def end(self, stop_reason: str, output_tokens: int) -> None:
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
        self.frames += [
            _sse("message_delta", delta),
            _sse("message_stop", {"type": "message_stop"}),
        ]
        usage = {**self._message["usage"], "output_tokens": output_tokens}
        self._message = {**self._message, "stop_reason": stop_reason, "usage": usage}


def _whole_block(start: dict[str, Any], deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """A content block as a whole message has it: its start with its deltas applied."""
    block = dict(start)
    partial_json = ""
    for delta in deltas:
        match delta["type"]:
            case "text_delta":
                block["text"] += delta["text"]
            case "thinking_delta":
                block["thinking"] += delta["thinking"]
            case "signature_delta":
                block["signature"] = delta["signature"]
            case "input_json_delta":
                partial_json += delta["partial_json"]
    if block["type"] == "tool_use":
        block["input"] = json.loads(partial_json) if partial_json else {}
    return block


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {compact(data)}\n\n".encode()
