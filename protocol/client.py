"""An asyncio client for capd sockets: requests with ordered replies, and a stream of events.

Used by capctl, the tests, the benchmarks, and capd itself when a pod reports to its parent.
"""

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel

from protocol.errors import ProtocolError
from protocol.events import Ack, Error, Hello
from protocol.framing import decode, encode

_CLOSED = object()


LINE_LIMIT = 1 << 30
"""capd's frames have no size limit (a `history` page of large events runs to many MiB):
the client reads any line it can hold."""


class ConnectionClosed(Exception):
    """The server closed the connection."""


class Client:
    """One connection. `request()` returns the ack's result or raises ProtocolError;
    events (anything but hello/ack/error) are read with `next_event()` or `events()`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self.hello: Hello | None = None
        self._read_task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls, path: str | Path, timeout: float = 5.0, line_limit: int = LINE_LIMIT
    ) -> Self:
        """Connect and read the hello. `line_limit` bounds what one frame may hold: capd's
        own outbox, talking to a socket a client named, asks for less."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that lands as the inner call fails, and the caller would never stop.
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=line_limit)
        client = cls(reader, writer)
        try:
            async with asyncio.timeout(timeout):
                first = decode(await reader.readline())
        except BaseException:
            writer.close()
            raise
        client.hello = Hello.model_validate(first)
        client._read_task = asyncio.create_task(client._read_loop())
        return client

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._read_task:
            self._read_task.cancel()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def send_raw(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def request(
        self, req: BaseModel | dict[str, Any], timeout: float | None = 30.0
    ) -> dict[str, Any]:
        if isinstance(req, BaseModel):
            req = req.model_dump(mode="json", exclude_none=True)
        frame = req
        rid = frame.get("id")
        if rid is None:
            rid = f"c{next(self._ids)}"
            frame = {**frame, "id": rid}
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send_raw(encode(frame))
            async with asyncio.timeout(timeout):
                reply = await fut
        finally:
            self._pending.pop(rid, None)
        if reply["event"] == "error":
            err = Error.model_validate(reply)
            raise ProtocolError(err.code, err.message)
        return Ack.model_validate(reply).result

    async def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            item = await self._events.get()
        if item is _CLOSED:
            self._events.put_nowait(_CLOSED)
            raise ConnectionClosed("capd closed the connection")
        return item

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            try:
                yield await self.next_event()
            except ConnectionClosed:
                return

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                frame = decode(line)
                kind = frame.get("event")
                if kind in ("ack", "error") and frame.get("id") in self._pending:
                    fut = self._pending[frame["id"]]
                    if not fut.done():
                        fut.set_result(frame)
                else:
                    self._events.put_nowait(frame)
        except (ConnectionError, ProtocolError, ValueError):
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionClosed("capd closed the connection"))
            self._events.put_nowait(_CLOSED)
