"""A local OpenAI-compatible chat completions server for tests: real HTTP/1.1, real SSE.

    async with OpenAITestServer() as server:
        server.enqueue(TextReply(["Hel", "lo"]), ToolCallsReply([FunctionCall("bash", {...})]))
        ...  # point a provider, or a capd subprocess, at server.base_url

Each POST /v1/chat/completions takes the next reply queued for its `model`, else the next
reply queued for any model (a streamed text reply saying "(no scripted reply)" when both
queues are empty, so nothing hangs). Per-model queues let pods that run at the same time,
such as a parent and its child, each get their own replies. Streamed replies are
framed with `Transfer-Encoding: chunked` and connections are kept alive between requests.
The server runs on the event loop that started it, so a test driving a capd subprocess
must await (asyncio subprocesses, `asyncio.wait_for`) rather than block that loop.
"""

import asyncio
import itertools
import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

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


@dataclass(frozen=True)
class HeldReply:
    """`reply`, sent only once the test sets `release`: orders what concurrent pods see."""

    reply: StreamedReply
    release: asyncio.Event


Reply = StreamedReply | ErrorReply | HeldReply


@dataclass(frozen=True)
class _Stream:
    """The SSE events of one streamed reply, and whether to drop the connection after them."""

    events: list[bytes]
    delay_ms: float = 0
    drop: bool = False


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class OpenAITestServer:
    """Serves queued replies to POST /v1/chat/completions on 127.0.0.1 (a free port)."""

    def __init__(self) -> None:
        self.base_url = ""
        self.requests: list[dict[str, Any]] = []
        """JSON bodies received, in order."""
        self.headers: list[dict[str, str]] = []
        """Headers of each request in `requests` (names lower-cased)."""
        self.connections = 0
        """TCP connections accepted (clients that keep connections alive reuse them)."""
        self.disconnects = 0
        """Streamed replies the client abandoned before they were complete."""
        self._replies: dict[str | None, deque[Reply]] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> "OpenAITestServer":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def enqueue(self, *replies: Reply, model: str | None = None) -> None:
        """Queue replies for requests naming `model`, or for any request when None."""
        self._replies.setdefault(model, deque()).extend(replies)

    def requests_for(self, model: str) -> list[dict[str, Any]]:
        return [body for body in self.requests if body.get("model") == model]

    async def wait_requests(
        self, count: int, timeout: float = 5.0, model: str | None = None
    ) -> None:
        """Returns once `count` requests (naming `model`, if given) have arrived in total."""

        def arrived() -> int:
            return len(self.requests if model is None else self.requests_for(model))

        await self._wait_until(lambda: arrived() >= count, timeout)

    async def wait_disconnects(self, count: int = 1, timeout: float = 5.0) -> None:
        """Returns once clients have abandoned `count` streamed replies in total."""
        await self._wait_until(lambda: self.disconnects >= count, timeout)

    async def _wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.connections += 1
        connection = _Connection(reader, writer)
        try:
            while (request := await connection.read_request()) is not None:
                if not await self._respond(connection, request):
                    break
        except (ConnectionError, asyncio.CancelledError):
            # Cancelled by stop(); ending normally spares Python 3.11's start_server callback,
            # which calls exception() on the finished task and logs an error if it was cancelled.
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _respond(self, connection: "_Connection", request: _Request) -> bool:
        """Answers one request; returns whether the connection stays open."""
        if (request.method, request.path) != ("POST", CHAT_PATH):
            await connection.send(404, _error_body(f"no route {request.method} {request.path}"))
            return True
        try:
            body = json.loads(request.body)
        except ValueError:
            await connection.send(400, _error_body("request body is not JSON"))
            return True
        self.requests.append(body)
        self.headers.append(request.headers)
        self._changed.set()
        reply = self._next_reply(str(body.get("model", "")))
        if isinstance(reply, HeldReply):
            await reply.release.wait()
            reply = reply.reply
        if isinstance(reply, ErrorReply):
            extra = {"Retry-After": reply.retry_after} if reply.retry_after is not None else {}
            payload = _error_body(reply.message, reply.type, reply.code)
            await connection.send(reply.status, payload, extra)
            return True
        stream = _stream_for(reply, str(body.get("model", "")))
        if await connection.stream(stream):
            return not stream.drop
        self.disconnects += 1
        self._changed.set()
        return False

    def _next_reply(self, model: str) -> Reply:
        for queue in (self._replies.get(model), self._replies.get(None)):
            if queue:
                return queue.popleft()
        return TextReply(FALLBACK_TEXT)


class _Connection:
    """One client connection: HTTP/1.1 request parsing and response writing."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()

    async def read_request(self) -> _Request | None:
        """The next request, or None when the client closed the connection between requests."""
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            if not await self._fill():
                if self._buffer:
                    raise ConnectionError("client closed mid-request")
                return None
        head = self._buffer[:end].decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        method, path, _version = head[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self._buffer) < length:
            if not await self._fill():
                raise ConnectionError("client closed mid-body")
        body = bytes(self._buffer[:length])
        del self._buffer[:length]
        return _Request(method, path, headers, body)

    async def send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._writer.write(
            _head(status, {"Content-Type": "application/json", **(headers or {})}, len(body)) + body
        )
        await self._writer.drain()

    async def stream(self, stream: _Stream) -> bool:
        """Writes an event stream while watching the client; False if it left before the end."""
        writing = asyncio.ensure_future(self._write_stream(stream))
        watching = asyncio.ensure_future(self._wait_for_eof())
        try:
            await asyncio.wait({writing, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            writing.cancel()
            watching.cancel()
            await asyncio.gather(writing, watching, return_exceptions=True)
        return not writing.cancelled() and writing.exception() is None

    async def _write_stream(self, stream: _Stream) -> None:
        frames = [b"%x\r\n%s\r\n" % (len(event), event) for event in stream.events]
        if not stream.drop:
            # The end of the body goes out with the last event, so a client that hangs up
            # right after that event is not counted as a disconnect.
            frames.append((frames.pop() if frames else b"") + b"0\r\n\r\n")
        self._writer.write(_head(200, {"Content-Type": "text/event-stream"}))
        for position, frame in enumerate(frames):
            if position and stream.delay_ms:
                await asyncio.sleep(stream.delay_ms / 1000)
            self._writer.write(frame)
            await self._writer.drain()
        if stream.drop:
            self._writer.close()

    async def _wait_for_eof(self) -> None:
        """Returns when the client closes; anything it sends meanwhile stays buffered."""
        try:
            while await self._fill():
                pass
        except ConnectionError:
            return

    async def _fill(self) -> bool:
        data = await self._reader.read(65536)
        self._buffer += data
        return bool(data)


def _stream_for(reply: StreamedReply, model: str) -> _Stream:
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
            return _Stream(events, reply.delay_ms)
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
            return _Stream(events, reply.delay_ms)
        case DropReply():
            events = [chunks.delta({"role": "assistant", "content": ""})]
            events += [chunks.delta({"content": piece}) for piece in reply.text]
            return _Stream(events, drop=True)
        case StreamErrorReply():
            events = [chunks.delta({"content": piece}) for piece in reply.text]
            error = {"message": reply.message, "type": reply.type, "code": reply.code}
            events.append(_sse(_compact({"error": error})))
            return _Stream(events)
        case RawStreamReply():
            return _Stream([event.encode() for event in reply.events], reply.delay_ms)


def _tool_call_fragments(reply: ToolCallsReply) -> list[dict[str, Any]]:
    per_call: list[list[dict[str, Any]]] = []
    for index, call in enumerate(reply.calls):
        arguments = call.arguments if isinstance(call.arguments, str) else _compact(call.arguments)
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
        return _sse(_compact({**self._common, "choices": [choice], "usage": None}))

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return _sse(_compact({**self._common, "choices": [], "usage": usage}))


def _compact(value: object) -> str:
    """JSON without spaces, as the real API sends it."""
    return json.dumps(value, separators=(",", ":"))


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def _error_body(
    message: str, type_: str = "invalid_request_error", code: str | None = None
) -> bytes:
    error = {"message": message, "type": type_, "param": None, "code": code}
    return _compact({"error": error}).encode()


def _head(status: int, headers: dict[str, str], content_length: int | None = None) -> bytes:
    """A response head; without a content length the body is chunked."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    framing = (
        {"Content-Length": str(content_length)}
        if content_length is not None
        else {"Transfer-Encoding": "chunked", "Cache-Control": "no-cache"}
    )
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in {**headers, **framing}.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
