"""`capd --metrics-listen HOST:PORT`: the metrics over HTTP/1.1 at `/metrics`.

`GET` and `HEAD /metrics` get 200 and the exposition (capd.metrics), another path 404,
another method 405, a render that fails 500. One request per connection: the reply says
`Connection: close` and the connection is closed after it. Lines may end in CRLF or LF.

The port is TCP, so any local user can reach it: the text is rendered at most once per
CACHE_S (`Cached`), at most MAX_CONNECTIONS are served at once (more are answered 503 and
closed), and a client that does not send its request within HEAD_TIMEOUT_S (idle
connections would hold the places of scrapes), does not read the reply within TIMEOUT_S
in all, or sends more than REQUEST_LIMIT bytes of request line and headers, is dropped.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from capd.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

PATH = "/metrics"
REQUEST_LIMIT = 16 * 1024
TIMEOUT_S = 10.0
HEAD_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 16
CACHE_S = 1.0
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class Cached:
    """A render kept for CACHE_S: scrapes in a loop cost one render per second at most.
    `fresh` renders now (and keeps it), for the daemon socket's `metrics` method."""

    def __init__(self, render: Callable[[], str], max_age_s: float = CACHE_S) -> None:
        self._render = render
        self._max_age_s = max_age_s
        self._text = ""
        self._at = float("-inf")

    def get(self) -> str:
        if time.monotonic() - self._at >= self._max_age_s:
            return self.fresh()
        return self._text

    def fresh(self) -> str:
        self._text = self._render()
        self._at = time.monotonic()
        return self._text


class MetricsHttp:
    """The listener; `render` makes the exposition, called for each GET or HEAD (give it
    `Cached.get`)."""

    def __init__(
        self,
        render: Callable[[], str],
        timeout_s: float = TIMEOUT_S,
        head_timeout_s: float = HEAD_TIMEOUT_S,
    ) -> None:
        self._render = render
        self._timeout_s = timeout_s
        self._head_timeout_s = head_timeout_s
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._failing = False

    async def bind(self, host: str, port: int) -> str:
        """Bind, not serving yet (`serve`); returns the address bound, `host:port`
        (`[v6]:port`), with the port a 0 got. A bind that fails raises OSError naming the
        flag and the address."""
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=REQUEST_LIMIT, start_serving=False
            )
        except OSError as exc:
            raise OSError(
                f"--metrics-listen {host}:{port}: {exc.strerror or exc}; "
                "choose another address or port"
            ) from None
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        return f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"

    async def serve(self) -> None:
        assert self._server is not None
        await self._server.start_serving()

    async def close(self) -> None:
        """Stop listening and end the exchanges under way (cancelled and awaited)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._handlers) >= MAX_CONNECTIONS:
            writer.write(_response(503, "too many connections; try again later\n"))
            writer.close()  # a few bytes: the kernel takes them, read or not
            return
        self._handlers.add(task)
        done = False
        try:
            async with asyncio.timeout(self._timeout_s):
                async with asyncio.timeout(self._head_timeout_s):
                    head = await _read_head(reader)
                writer.write(self._reply(head))
                await writer.drain()
                writer.close()
                await writer.wait_closed()
                done = True
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            asyncio.CancelledError,  # by close(); asyncio logs a task of a server cancelled
        ):
            pass  # a client not speaking HTTP, too slowly, or gone: no reply
        finally:
            self._handlers.discard(task)
            if not done:
                writer.transport.abort()  # what is left unsent is dropped, not flushed

    def _reply(self, head: bytes) -> bytes:
        parts = head.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "expected an HTTP/1.1 request line\n")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target != PATH:
            return _response(404, f"not found: the metrics are at {PATH}\n")
        if method not in ("GET", "HEAD"):
            return _response(405, "only GET and HEAD\n", allow=True)
        try:
            text = self._render()
        except Exception:
            if not self._failing:  # once until a render works again, not once per scrape
                log.exception("rendering the metrics failed")
            self._failing = True
            return _response(500, "rendering the metrics failed; see capd's log\n")
        self._failing = False
        return _response(200, text, CONTENT_TYPE, with_body=method == "GET")


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line, after reading the headers up to the empty line (CRLF or LF)."""
    first = (await reader.readuntil(b"\n")).rstrip(b"\r\n")
    size = len(first)
    while line := (await reader.readuntil(b"\n")).rstrip(b"\r\n"):
        size += len(line)
        if size > REQUEST_LIMIT:
            raise asyncio.LimitOverrunError("request head too long", size)
    return first


def _response(
    status: int,
    body: str,
    content_type: str = "text/plain; charset=utf-8",
    *,
    with_body: bool = True,
    allow: bool = False,
) -> bytes:
    data = body.encode()
    head = [
        f"HTTP/1.1 {status} {REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        "Connection: close",
    ]
    if allow:
        head.append("Allow: GET, HEAD")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (data if with_body else b"")
