"""`capd --metrics-listen HOST:PORT`: the metrics over HTTP/1.1 at `/metrics`.

`GET` and `HEAD /metrics` get 200 and the exposition (capd.metrics), another path 404,
another method 405. One request per connection: the reply says `Connection: close` and
the connection is closed after it. A client that sends more than REQUEST_LIMIT bytes of
request line and headers, or takes longer than READ_TIMEOUT_S to send them, is dropped.
"""

import asyncio
import contextlib
from collections.abc import Callable

from capd.metrics import CONTENT_TYPE

PATH = "/metrics"
REQUEST_LIMIT = 16 * 1024
READ_TIMEOUT_S = 10.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class MetricsHttp:
    """The listener; `render` makes the exposition, called once per GET or HEAD."""

    def __init__(self, render: Callable[[], str]) -> None:
        self._render = render
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen; returns the address bound, `host:port` (`[v6]:port`), with the port a
        0 got. A bind that fails raises OSError naming the flag and the address."""
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=REQUEST_LIMIT)
        except OSError as exc:
            raise OSError(
                f"--metrics-listen {host}:{port}: {exc.strerror or exc}; "
                "choose another address or port"
            ) from None
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        return f"[{bound_host}]:{bound_port}" if ":" in bound_host else f"{bound_host}:{bound_port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.write(self._reply(head))
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass  # a client not speaking HTTP, too slowly, or gone: no reply
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _reply(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "expected an HTTP/1.1 request line\n")
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target != PATH:
            return _response(404, f"not found: the metrics are at {PATH}\n")
        if method not in ("GET", "HEAD"):
            return _response(405, "only GET and HEAD\n", allow=True)
        return _response(200, self._render(), CONTENT_TYPE, with_body=method == "GET")


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
