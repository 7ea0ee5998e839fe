"""A local OpenAI-compatible chat completions server for tests: real HTTP/1.1, real SSE.

    async with OpenAITestServer() as server:
        server.enqueue(TextReply(["Hel", "lo"]), ToolCallsReply([FunctionCall("bash", {...})]))
        ...  # point a provider, or a capd subprocess, at server.base_url

Each POST /v1/chat/completions takes the next queued reply (see `tests/fakes/sse_server.py` for
queues per model, held replies and framing); with none queued, a streamed text reply says
"(no scripted reply)". `OpenAITestServer(flavor)` shapes every answer like one of the
servers people run (`tests/fakes/openai_flavors.py`): llama-cpp-python, llama-server, vLLM,
Ollama, LM Studio, OpenRouter; the default is api.openai.com.
"""

import itertools
import json
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.openai_flavors import DONE, OPENAI, Flavor, Overflow, sse
from tests.fakes.sse_server import ErrorResponse, SseStream, SseTestServer, compact

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
    finish_reason: str = "stop"
    """"length": the reply was cut off by max_tokens."""


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
    (The flavor may send them otherwise: see ToolCallStyle.)
    """

    calls: Sequence[FunctionCall]
    text: Sequence[str] = ()
    """Content pieces streamed before the calls."""
    fragment_chars: int = 8
    interleave: bool = False
    delay_ms: float = 0
    prompt_tokens: int = 10
    completion_tokens: int = 5
    finish_reason: str = "tool_calls"
    """"length": cut off by max_tokens (give the last call incomplete JSON as a `str`)."""


@dataclass(frozen=True)
class ErrorReply:
    """A non-streamed error: `status` with the flavor's error body, for OpenAI
    `{"error": {"message", "type", "param", "code"}}`."""

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
    """Streams `text` pieces, then fails the way the flavor fails mid-stream (for OpenAI a
    chunk carrying an `error` object, then the end of the body)."""

    message: str
    type: str = "server_error"
    code: str | int | None = None
    text: Sequence[str] = ()


@dataclass(frozen=True)
class RawStreamReply:
    """A 200 event stream whose `events` are written verbatim, one HTTP chunk each."""

    events: Sequence[str]
    delay_ms: float = 0


@dataclass(frozen=True)
class OverflowReply(Overflow):
    """What the flavor answers to a request longer than the model's context window."""


StreamedReply = TextReply | ToolCallsReply | DropReply | StreamErrorReply | RawStreamReply
Reply = StreamedReply | ErrorReply | OverflowReply


class OpenAITestServer(SseTestServer[Reply]):
    """Serves queued replies to POST /v1/chat/completions on 127.0.0.1 (a free port),
    shaped like the server `flavor` names (default: api.openai.com)."""

    PATH = CHAT_PATH
    BASE_PATH = "/v1"

    def __init__(self, flavor: Flavor = OPENAI) -> None:
        super().__init__()
        self.flavor = flavor

    def refuse(self, body: dict[str, Any], headers: dict[str, str]) -> ErrorResponse | None:
        if self.flavor.rejects_null_content:
            return _null_content_refusal(body)
        return None

    def answer_request(
        self, reply: Reply, model: str, body: dict[str, Any]
    ) -> SseStream | ErrorResponse:
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))
        return _Renderer(self.flavor, model, include_usage).answer(reply)

    def answer(self, reply: Reply, model: str) -> SseStream | ErrorResponse:
        return _Renderer(self.flavor, model, include_usage=True).answer(reply)

    def fallback(self) -> Reply:
        return TextReply(FALLBACK_TEXT)

    def error_body(self, message: str) -> bytes:
        return self.flavor.error_body(400, message, "invalid_request_error", None)


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
        '  File "/opt/llama/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, '
        "in create_chat_completion\n    POST /v1/chat/completions"
    )


def _internal_error(message: str) -> bytes:
    error = {"message": message, "type": "internal_server_error", "param": None, "code": None}
    return compact({"error": error}).encode()


class _Renderer:
    """One answer of one flavor: `chat.completion.chunk` events sharing a completion id."""

    def __init__(self, flavor: Flavor, model: str, include_usage: bool) -> None:
        self._flavor = flavor
        self._dumps = json.dumps if flavor.spaced_json else compact
        self._usage_due = flavor.usage == "always" or (
            flavor.usage == "requested" and include_usage
        )
        self._common = {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            **flavor.chunk_fields,
        }

    def answer(self, reply: Reply) -> SseStream | ErrorResponse:
        flavor = self._flavor
        match reply:
            case ErrorReply():
                body = flavor.error_body(reply.status, reply.message, reply.type, reply.code)
                headers = {"Retry-After": reply.retry_after} if reply.retry_after else {}
                return ErrorResponse(reply.status, body, headers)
            case OverflowReply():
                assert flavor.overflow is not None, f"{flavor} never refuses a long prompt"
                return flavor.overflow(reply)
            case TextReply():
                return SseStream(self._text_events(reply), reply.delay_ms)
            case ToolCallsReply():
                return SseStream(self._tool_events(reply), reply.delay_ms)
            case DropReply():
                events = [self.chunk(flavor.role_delta)]
                events += [self.chunk(self._content(piece)) for piece in reply.text]
                return SseStream(events, drop=True)
            case StreamErrorReply():
                events = [self.chunk(self._content(piece)) for piece in reply.text]
                failure = flavor.stream_error(reply.message, reply.type, reply.code)
                return SseStream(events + failure.events, drop=failure.drop, close=failure.close)
            case RawStreamReply():
                return SseStream([event.encode() for event in reply.events], reply.delay_ms)

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, **self._flavor.choice_fields}
        choice["finish_reason"] = finish_reason
        chunk: dict[str, Any] = {**self._common, "choices": [choice]}
        if self._usage_due and self._flavor.null_usage:
            chunk["usage"] = None
        return sse(self._dumps({**chunk, **extra}))

    def _text_events(self, reply: TextReply) -> list[bytes]:
        pieces = [reply.text] if isinstance(reply.text, str) else list(reply.text)
        reasoning = self._flavor.reasoning_field
        return [
            *self._opening(self._flavor.role_delta),
            *(self.chunk(self._with_role({reasoning: piece})) for piece in reply.reasoning),
            *(self.chunk(self._content(piece)) for piece in pieces),
            *self._ending(self._flavor.finish_delta, reply),
        ]

    def _tool_events(self, reply: ToolCallsReply) -> list[bytes]:
        flavor = self._flavor
        return [
            *self._opening(flavor.tool_role_delta or flavor.role_delta),
            *(self.chunk(self._content(piece)) for piece in reply.text),
            *(self.chunk(delta) for delta in self._tool_deltas(reply)),
            *self._ending(flavor.tool_finish_delta or flavor.finish_delta, reply),
        ]

    def _opening(self, delta: Any) -> list[bytes]:
        keepalive = [f"{self._flavor.keepalive}\n\n".encode()] if self._flavor.keepalive else []
        return [*keepalive, self.chunk(dict(delta))]

    def _content(self, piece: str) -> dict[str, Any]:
        if self._flavor.role_in_every_delta:
            return {"role": "assistant", "content": piece}
        return {"content": piece}

    def _ending(self, delta: Mapping[str, Any], reply: TextReply | ToolCallsReply) -> list[bytes]:
        prompt_tokens, completion_tokens = reply.prompt_tokens, reply.completion_tokens
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        timings = {"timings": {"predicted_n": completion_tokens}} if self._flavor.timings else {}
        # llama-server puts its timings on the stream's last chunk: the usage chunk when one
        # follows, else the chunk that carries finish_reason.
        extra: dict[str, Any] = {} if self._usage_due else dict(timings)
        if self._flavor.usage == "in_finish_chunk":
            extra["usage"] = usage
        events = [self.chunk(dict(delta), reply.finish_reason, **extra)]
        if self._usage_due:
            last = {**self._common, "choices": [], "usage": usage, **timings}
            events.append(sse(self._dumps(last)))
        return [*events, DONE]

    def _tool_deltas(self, reply: ToolCallsReply) -> Iterator[dict[str, Any]]:
        style = self._flavor.tool_calls
        id_format = self._flavor.tool_call_id
        calls = [_Call.of(index, call, id_format) for index, call in enumerate(reply.calls)]
        if style == "all_in_one":
            yield self._with_role({"tool_calls": [self._head(c, c.arguments) for c in calls]})
            return
        if style == "one_chunk_each":
            for call in calls:
                yield self._with_role({"tool_calls": [self._head(call, call.arguments)]})
            return
        per_call = [list(self._fragments(call, reply.fragment_chars)) for call in calls]
        if reply.interleave:
            rounds = itertools.zip_longest(*per_call)
            yield from (fragment for fragments in rounds for fragment in fragments if fragment)
        else:
            yield from (fragment for fragments in per_call for fragment in fragments)

    def _fragments(self, call: "_Call", size: int) -> Iterator[dict[str, Any]]:
        pieces = [call.arguments[i : i + size] for i in range(0, len(call.arguments), size)]
        if self._flavor.tool_calls == "repeated":
            # llama-cpp-python: each piece repeats the whole head, and `function_call` too
            for piece in pieces or [""]:
                yield {
                    "role": None,
                    "content": None,
                    "function_call": {"name": call.name, "arguments": piece},
                    "tool_calls": [self._head(call, piece)],
                }
            return
        head = self._head(call, "")
        if self._flavor.tool_calls == "name_first":
            del head["function"]["arguments"]
        yield self._with_role({"tool_calls": [head]})
        for piece in pieces:
            fragment = self._indexed(call.index, {"function": {"arguments": piece}})
            yield self._with_role({"tool_calls": [fragment]})

    def _head(self, call: "_Call", arguments: str) -> dict[str, Any]:
        function = {"name": call.name, "arguments": arguments}
        return self._indexed(call.index, {"id": call.id, "type": "function", "function": function})

    def _indexed(self, index: int, fragment: dict[str, Any]) -> dict[str, Any]:
        return {"index": index, **fragment} if self._flavor.tool_call_index else fragment

    def _with_role(self, delta: dict[str, Any]) -> dict[str, Any]:
        return self._content("") | delta if self._flavor.role_in_every_delta else delta


@dataclass(frozen=True)
class _Call:
    index: int
    id: str
    name: str
    arguments: str

    @classmethod
    def of(cls, index: int, call: FunctionCall, id_format: str) -> "_Call":
        arguments = call.arguments if isinstance(call.arguments, str) else compact(call.arguments)
        fresh = id_format.format(index=index, name=call.name, hex=secrets.token_hex(12))
        return cls(index, call.id or fresh, call.name, arguments)
