"""What the tests' local model API servers share: real HTTP/1.1 on 127.0.0.1, chunked SSE.

A subclass names its `PATH` and turns each queued reply into an event stream or an error
response; it may refuse a request the real API would refuse. Each POST to `PATH` takes
the next reply queued for its `model`, else the next reply queued for any model, else the
subclass's fallback reply, so nothing hangs. Per-model queues let pods that run at the
same time, such as a parent and its child, each get their own replies. Streamed replies
are framed with `Transfer-Encoding: chunked` and connections are kept alive between
requests. The server runs on the event loop that started it, so a test driving a capd
subprocess must await (asyncio subprocesses, `asyncio.wait_for`) rather than block that
loop.
"""

import asyncio
import json
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, ClassVar, Generic, Self, TypeVar

ReplyT = TypeVar("ReplyT")


@dataclass(frozen=True)
class HeldReply(Generic[ReplyT]):
    """`reply`, sent only once the test sets `release`: orders what concurrent pods see."""

    reply: ReplyT
    release: asyncio.Event


@dataclass(frozen=True)
class SseStream:
    """The SSE events of one streamed reply, and whether to drop the connection after them."""

    events: list[bytes]
    delay_ms: float = 0
    drop: bool = False
    close: bool = False
    """End the body properly, then stop serving the connection, as a server whose handler
    failed: it is closed, with no answer, when the client sends its next request on it
    (the worst case of the race a real server leaves when its close comes late)."""


@dataclass(frozen=True)
class ErrorResponse:
    """A non-streamed JSON answer: an error, or the answer on another route (`route`)."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class SseTestServer(ABC, Generic[ReplyT]):
    """Serves queued replies to POST `PATH` on 127.0.0.1 (a free port)."""

    PATH: ClassVar[str]
    BASE_PATH: ClassVar[str] = ""
    """What `base_url` ends with, as the API's clients expect it."""

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
        self._replies: dict[str | None, deque[ReplyT | HeldReply[ReplyT]]] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    @abstractmethod
    def answer(self, reply: ReplyT, model: str) -> SseStream | ErrorResponse:
        """What to send for `reply` to a request naming `model`."""

    @abstractmethod
    def fallback(self) -> ReplyT:
        """The reply when nothing is queued."""

    @abstractmethod
    def error_body(self, message: str) -> bytes:
        """The API's error body, for requests it would refuse (unknown path, not JSON)."""

    def refuse(self, body: dict[str, Any], headers: dict[str, str]) -> ErrorResponse | None:
        """The error the API would answer this request with, if any; no reply is taken."""
        return None

    def answer_whole(self, reply: ReplyT, model: str) -> ErrorResponse | None:
        """The answer to a request that does not ask to stream; None: stream it anyway."""
        return None

    def route(self, method: str, path: str, body: bytes) -> ErrorResponse | None:
        """The answer to a request for another path than `PATH`; None: 404."""
        return None

    def answer_request(
        self, reply: ReplyT, model: str, body: dict[str, Any]
    ) -> SseStream | ErrorResponse:
        """`answer`, for a server whose answer depends on more of the request than `model`."""
        return self.answer(reply, model)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}{self.BASE_PATH}"

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def enqueue(self, *replies: ReplyT | HeldReply[ReplyT], model: str | None = None) -> None:
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
        path = request.path.partition("?")[0]  # Claude Code asks for `/v1/messages?beta=true`
        if (request.method, path) != ("POST", self.PATH):
            message = f"no route {request.method} {request.path}"
            answer = self.route(request.method, path, request.body)
            await connection.send(answer or ErrorResponse(404, self.error_body(message)))
            return True
        try:
            body = json.loads(request.body)
        except ValueError:
            await connection.send(ErrorResponse(400, self.error_body("request body is not JSON")))
            return True
        self.requests.append(body)
        self.headers.append(request.headers)
        self._changed.set()
        if (refusal := self.refuse(body, request.headers)) is not None:
            await connection.send(refusal)
            return True
        model = str(body.get("model", ""))
        reply = self._next_reply(model)
        if isinstance(reply, HeldReply):
            await reply.release.wait()
            reply = reply.reply
        whole = None if body.get("stream") else self.answer_whole(reply, model)
        answer = whole or self.answer_request(reply, model, body)
        if isinstance(answer, ErrorResponse):
            await connection.send(answer)
            return True
        if await connection.stream(answer):
            if answer.close:
                await connection.read_request()
            return not (answer.drop or answer.close)
        self.disconnects += 1
        self._changed.set()
        return False

    def _next_reply(self, model: str) -> ReplyT | HeldReply[ReplyT]:
        for queue in (self._replies.get(model), self._replies.get(None)):
            if queue:
                return queue.popleft()
        return self.fallback()


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

    async def send(self, response: ErrorResponse) -> None:
        headers = {"Content-Type": "application/json", **response.headers}
        self._writer.write(_head(response.status, headers, len(response.body)) + response.body)
        await self._writer.drain()

    async def stream(self, stream: SseStream) -> bool:
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

    async def _write_stream(self, stream: SseStream) -> None:
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


def compact(value: object) -> str:
    """JSON without spaces, as the real APIs send it."""
    return json.dumps(value, separators=(",", ":"))


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
