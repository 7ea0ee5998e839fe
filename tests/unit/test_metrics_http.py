"""`--metrics-listen`'s server against clients that misbehave: one that never reads its
reply, too many at once, one that sends nothing while capd stops, LF-only line ends, a
render that fails; and the render cache."""

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from capd.metrics_http import MAX_CONNECTIONS, Cached, MetricsHttp

BIG = "x 1\n" * 2_000_000
"""8 MB: far more than the socket buffers take."""
WAIT_S = 5.0


@pytest.fixture
async def errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the loop's exception handler (asyncio's "Exception in callback")."""
    loop = asyncio.get_running_loop()
    found: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: found.append(context))
    yield found
    loop.set_exception_handler(None)


async def serving(render: Callable[[], str], **kwargs: Any) -> tuple[MetricsHttp, str, int]:
    server = MetricsHttp(render, **kwargs)
    address = await server.bind("127.0.0.1", 0)
    await server.serve()
    host, port = address.rsplit(":", 1)
    return server, host, int(port)


async def exchange(host: str, port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    async with asyncio.timeout(WAIT_S):
        reply = await reader.read()
    writer.close()
    return reply


async def test_a_client_that_never_reads_is_dropped_after_the_timeout() -> None:
    server, host, port = await serving(lambda: BIG, timeout_s=0.2)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect((host, port))
    stuck.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
    try:
        # It is answered meanwhile: the server is not held up by it.
        assert (await exchange(host, port, b"HEAD /metrics HTTP/1.1\r\n\r\n")).startswith(
            b"HTTP/1.1 200 OK\r\n"
        )
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*server._handlers)  # ended by the timeout, not by close()
    finally:
        stuck.close()
        await server.close()


async def test_connections_that_send_no_request_give_their_places_back_soon() -> None:
    server, host, port = await serving(lambda: "x 1\n", head_timeout_s=0.2)
    idle = [await asyncio.open_connection(host, port) for _ in range(MAX_CONNECTIONS)]
    try:
        async with asyncio.timeout(WAIT_S):  # well before the 10 s an exchange may take
            while len(server._handlers) < MAX_CONNECTIONS:  # accepted on this loop
                await asyncio.sleep(0)
            await asyncio.gather(*server._handlers)
        reply = await exchange(host, port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        for _, writer in idle:
            writer.close()
        await server.close()


async def test_connections_beyond_the_cap_get_503_at_once() -> None:
    server, host, port = await serving(lambda: "x 1\n")
    idle = [await asyncio.open_connection(host, port) for _ in range(MAX_CONNECTIONS)]
    async with asyncio.timeout(WAIT_S):
        while len(server._handlers) < MAX_CONNECTIONS:  # accepted on this loop
            await asyncio.sleep(0)
    try:
        reply = await exchange(host, port, b"")
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    finally:
        for _, writer in idle:
            writer.close()
        await server.close()


async def test_close_ends_the_exchanges_under_way(errors: list[dict[str, Any]]) -> None:
    server, host, port = await serving(lambda: "x 1\n")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /metrics HTTP/1.1\r\n")  # half a request
    await writer.drain()
    async with asyncio.timeout(WAIT_S):
        while not server._handlers:
            await asyncio.sleep(0)
        await server.close()
        with contextlib.suppress(ConnectionResetError):  # or reset: nothing is sent
            assert await reader.read() == b""  # closed by close(), with no reply
    writer.close()
    await asyncio.sleep(0)  # the server task's done callbacks
    assert errors == []


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"], ids=["crlf", "lf"])
async def test_lines_may_end_in_lf(ending: bytes) -> None:
    server, host, port = await serving(lambda: "x 1\n")
    try:
        request = ending.join([b"GET /metrics HTTP/1.0", b"Host: x", b"", b""])
        reply = await exchange(host, port, request)
    finally:
        await server.close()
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert reply.endswith(b"\r\n\r\nx 1\n")


async def test_a_render_that_fails_is_500_and_logged_once(
    caplog: pytest.LogCaptureFixture, errors: list[dict[str, Any]]
) -> None:
    def render() -> str:
        raise RuntimeError("database is locked")

    server, host, port = await serving(render)
    try:
        with caplog.at_level(logging.ERROR, logger="capd.metrics_http"):
            for _ in range(2):
                reply = await exchange(host, port, b"GET /metrics HTTP/1.1\r\n\r\n")
                assert reply.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    finally:
        await server.close()
    assert [r.getMessage() for r in caplog.records] == ["rendering the metrics failed"]
    assert "database is locked" in caplog.text
    assert errors == []


async def test_an_ipv6_address_is_bracketed() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = MetricsHttp(lambda: "x 1\n")
    try:
        address = await server.bind("::1", 0)
    except OSError:
        pytest.skip("no ::1")
    await server.close()
    assert address.startswith("[::1]:")


def test_the_cache_renders_once_per_max_age() -> None:
    renders: list[int] = []

    def render() -> str:
        renders.append(1)
        return f"n {len(renders)}\n"

    cached = Cached(render, max_age_s=3600)
    assert [cached.get(), cached.get()] == ["n 1\n", "n 1\n"]
    assert cached.fresh() == "n 2\n"  # the daemon socket's `metrics`
    assert cached.get() == "n 2\n"
    assert len(renders) == 2
    assert Cached(render, max_age_s=0).get() == "n 3\n"
