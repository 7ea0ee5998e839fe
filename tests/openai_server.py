"""A local OpenAI-compatible chat completions server for tests: real HTTP/1.1, real SSE.

    async with OpenAITestServer() as server:
        server.enqueue(TextReply(["Hel", "lo"]), ToolCallsReply([FunctionCall("bash", {...})]))
        ...  # point a provider, or a capd subprocess, at server.base_url

Each POST /v1/chat/completions takes the next queued reply (see `tests/sse_server.py` for
queues per model, held replies and framing); with none queued, a streamed text reply says
"(no scripted reply)".
"""

import itertools
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.sse_server import ErrorResponse, SseStream, SseTestServer, compact

CHAT_PATH = "/v1/chat/completions"
FALLBACK_TEXT = "(no scripted reply)"


@dataclass(frozen=True)
class TextReply:
    """A streamed assistant message: `text` (one piece, or pieces sent as separate chunks)."""

    text: str | Sequence[str] = "Hello!"
    reasoning: Sequence[str] = ()
    """Pieces sent as `delta.reasoning_content` before the text."""
    delay_ms: float = 0
    """Pause between chunks."""
    prompt_tokens: int = 10
    completion_tokens: int = 5


@dataclass(frozen=True)
class FunctionCall:
    """One tool call of a ToolCallsReply; a `str` for `arguments` is sent verbatim."""

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str = ""
    """Empty: a fresh `call_...` id."""


@dataclass(frozen=True)
class ToolCallsReply:
    """A streamed message with tool calls, arguments split as the real API splits them.

    Each call's first `tool_calls` fragment has `index`, `id`, `type` and the name with
    empty arguments; the arguments follow in pieces of `fragment_chars` characters that
    carry only `index`. Calls follow each other, or alternate when `interleave` is set.
    """

    calls: Sequence[FunctionCall]
    text: Sequence[str] = ()
    """Content pieces streamed before the calls."""
    fragment_chars: int = 8
    interleave: bool = False
    delay_ms: float = 0
    prompt_tokens: int = 10
    completion_tokens: int = 5


@dataclass(frozen=True)
class ErrorReply:
    """A non-streamed error: `status` with `{"error": {"message", "type", "param", "code"}}`."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    retry_after: str | None = None
    """Value of a Retry-After header, sent when set."""


@dataclass(frozen=True)
class DropReply:
    """Streams `text` pieces, then closes the connection without ending the body."""

    text: Sequence[str] = ("partial",)


@dataclass(frozen=True)
class StreamErrorReply:
    """Streams `text` pieces, then a chunk carrying an `error` object, then ends the body."""

    message: str
    type: str = "server_error"
    code: str | int | None = None
    text: Sequence[str] = ()


@dataclass(frozen=True)
class RawStreamReply:
    """A 200 event stream whose `events` are written verbatim, one HTTP chunk each."""

    events: Sequence[str]
    delay_ms: float = 0


StreamedReply = TextReply | ToolCallsReply | DropReply | StreamErrorReply | RawStreamReply
Reply = StreamedReply | ErrorReply


class OpenAITestServer(SseTestServer[Reply]):
    """Serves queued replies to POST /v1/chat/completions on 127.0.0.1 (a free port),
    shaped like the server `flavor` names (default: api.openai.com)."""

    PATH = CHAT_PATH
    BASE_PATH = "/v1"

    def __init__(self, flavor: "Flavor | None" = None) -> None:
        super().__init__()
        self.flavor = flavor or OPENAI

    def refuse(self, body: dict[str, Any], headers: dict[str, str]) -> ErrorResponse | None:
        if self.flavor.rejects_null_content:
            return _null_content_refusal(body)
        return None

    def answer(self, reply: Reply, model: str) -> SseStream | ErrorResponse:
        if isinstance(reply, ErrorReply):
            headers = {"Retry-After": reply.retry_after} if reply.retry_after is not None else {}
            body = _error_body(reply.message, reply.type, reply.code)
            return ErrorResponse(reply.status, body, headers)
        return _stream_for(reply, model)

    def fallback(self) -> Reply:
        return TextReply(FALLBACK_TEXT)

    def error_body(self, message: str) -> bytes:
        return _error_body(message)


@dataclass(frozen=True)
class Flavor:
    """How one OpenAI-compatible server differs from api.openai.com on the wire."""

    name: str
    rejects_null_content: bool = False
    """An assistant message with `"content": null` is a 500 validation error (llama-cpp-python)."""


OPENAI = Flavor("openai")
LLAMA_CPP_PYTHON = Flavor("llama-cpp-python", rejects_null_content=True)
"""llama-cpp-python 0.3's server (llama_cpp/server/app.py): its request model types an
assistant message's content as `NotRequired[str]` (llama_cpp/llama_types.py), and its route
class (llama_cpp/server/errors.py) answers any exception, FastAPI's validation error too,
with HTTP 500 `{"error": {"message": str(exc), "type": "internal_server_error", ...}}`."""


def _null_content_refusal(body: dict[str, Any]) -> ErrorResponse | None:
    """llama-cpp-python's answer to an assistant message whose content is null: FastAPI's
    RequestValidationError as text, one error per member of its union of message types."""
    messages = body.get("messages") or []
    for index, message in enumerate(messages):
        if (
            message.get("role") == "assistant"
            and "content" in message
            and message["content"] is None
        ):
            return ErrorResponse(500, _internal_error(validation_errors(index, message)))
    return None


def validation_errors(index: int, message: dict[str, Any]) -> str:
    """The text of FastAPI's validation error for `messages[index]`, an assistant message
    with null content, as llama-cpp-python's server sends it (seven errors, ~1900 chars)."""
    where = ("body", "messages", index)

    def literal(kind: str, role: str) -> dict[str, Any]:
        return {
            "type": "literal_error",
            "loc": (*where, kind, "role"),
            "msg": f"Input should be '{role}'",
            "input": "assistant",
            "ctx": {"expected": f"'{role}'"},
        }

    def missing(kind: str, field_name: str) -> dict[str, Any]:
        return {
            "type": "missing",
            "loc": (*where, kind, field_name),
            "msg": "Field required",
            "input": message,
        }

    errors = [
        literal("ChatCompletionRequestSystemMessage", "system"),
        literal("ChatCompletionRequestUserMessage", "user"),
        {
            "type": "string_type",
            "loc": (*where, "ChatCompletionRequestAssistantMessage", "content"),
            "msg": "Input should be a valid string",
            "input": None,
        },
        literal("ChatCompletionRequestToolMessage", "tool"),
        missing("ChatCompletionRequestToolMessage", "tool_call_id"),
        literal("ChatCompletionRequestFunctionMessage", "function"),
        missing("ChatCompletionRequestFunctionMessage", "name"),
    ]
    lines = "".join(f"  {error}\n" for error in errors)
    return (
        f"{len(errors)} validation errors:\n{lines}\n"
        '  File "/usr/lib/python3/site-packages/llama_cpp/server/app.py", line 408, '
        "in create_chat_completion\n    POST /v1/chat/completions"
    )


def _internal_error(message: str) -> bytes:
    error = {"message": message, "type": "internal_server_error", "param": None, "code": None}
    return compact({"error": error}).encode()


def _stream_for(reply: StreamedReply, model: str) -> SseStream:
    chunks = _ChunkMaker(model)
    match reply:
        case TextReply():
            pieces = [reply.text] if isinstance(reply.text, str) else list(reply.text)
            events = [
                chunks.delta({"role": "assistant", "content": "", "refusal": None}),
                *(chunks.delta({"reasoning_content": piece}) for piece in reply.reasoning),
                *(chunks.delta({"content": piece}) for piece in pieces),
                chunks.delta({}, finish_reason="stop"),
                chunks.usage(reply.prompt_tokens, reply.completion_tokens),
                _sse("[DONE]"),
            ]
            return SseStream(events, reply.delay_ms)
        case ToolCallsReply():
            events = [
                chunks.delta({"role": "assistant", "content": None}),
                *(chunks.delta({"content": piece}) for piece in reply.text),
                *(
                    chunks.delta({"tool_calls": [fragment]})
                    for fragment in _tool_call_fragments(reply)
                ),
                chunks.delta({}, finish_reason="tool_calls"),
                chunks.usage(reply.prompt_tokens, reply.completion_tokens),
                _sse("[DONE]"),
            ]
            return SseStream(events, reply.delay_ms)
        case DropReply():
            events = [chunks.delta({"role": "assistant", "content": ""})]
            events += [chunks.delta({"content": piece}) for piece in reply.text]
            return SseStream(events, drop=True)
        case StreamErrorReply():
            events = [chunks.delta({"content": piece}) for piece in reply.text]
            error = {"message": reply.message, "type": reply.type, "code": reply.code}
            events.append(_sse(compact({"error": error})))
            return SseStream(events)
        case RawStreamReply():
            return SseStream([event.encode() for event in reply.events], reply.delay_ms)


def _tool_call_fragments(reply: ToolCallsReply) -> list[dict[str, Any]]:
    per_call: list[list[dict[str, Any]]] = []
    for index, call in enumerate(reply.calls):
        arguments = call.arguments if isinstance(call.arguments, str) else compact(call.arguments)
        first = {
            "index": index,
            "id": call.id or f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        step = reply.fragment_chars
        rest = [
            {"index": index, "function": {"arguments": arguments[start : start + step]}}
            for start in range(0, len(arguments), step)
        ]
        per_call.append([first, *rest])
    if reply.interleave:
        rounds = itertools.zip_longest(*per_call)
        return [fragment for fragments in rounds for fragment in fragments if fragment]
    return [fragment for fragments in per_call for fragment in fragments]


class _ChunkMaker:
    """Builds `chat.completion.chunk` events that share one completion id, as the API does."""

    def __init__(self, model: str) -> None:
        self._common = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_test",
        }

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse(compact({**self._common, "choices": [choice], "usage": None}))

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return _sse(compact({**self._common, "choices": [], "usage": usage}))


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def _error_body(
    message: str, type_: str = "invalid_request_error", code: str | None = None
) -> bytes:
    error = {"message": message, "type": type_, "param": None, "code": code}
    return compact({"error": error}).encode()
