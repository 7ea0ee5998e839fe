"""One client connection: reads request lines, writes replies and events in order.

Everything a connection sends goes through one outbox drained by one writer task, so a
reply never overtakes an event queued before it. Replies are always accepted (the reader
stops reading while too much is queued); events are accepted only while the outbox holds
less than `max_queued_bytes`, which bounds the daemon's memory per slow client. A
connection holds at most one subscription (`capd.fanout`), whose replay and `lagged` frame
its writer task runs in order with the rest.
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from capd import heap
from capd.fanout import Hub, Subscription, WriterJob
from protocol.errors import ProtocolError
from protocol.events import Error
from protocol.framing import check_bounds, decode, encode
from protocol.methods import request_id

log = logging.getLogger(__name__)

OUTBOX_CHUNK_BYTES = 64 * 1024
MAX_ERROR_CHARS = 2000
"""An error's message is cut here: it names what was wrong, it does not echo the frame."""
Handler = Callable[[dict[str, Any], "Connection"], Awaitable[bytes | None]]


class Connection:
    def __init__(self, writer: asyncio.StreamWriter, max_queued_bytes: int) -> None:
        self._writer = writer
        self._max_queued = max_queued_bytes
        self._outbox: deque[bytearray | WriterJob] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False
        self._idle = False
        """The writer waits for work: nothing is queued or being written."""
        self._subscription: Subscription | None = None
        self._task = asyncio.create_task(self._write_loop())

    # -- producers ----------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a reply or hello: always accepted."""
        self._push(frame)

    def offer_event(self, frame: bytes) -> bool:
        """Queue an event unless the outbox is full; False means the subscriber lags."""
        if self._queued_bytes + len(frame) > self._max_queued:
            return False
        self._push(frame)
        return True

    def run_in_order(self, job: WriterJob) -> None:
        """Run `job` in the writer task once everything queued before it is written."""
        self._outbox.append(job)
        self._wake.set()

    def _push(self, frame: bytes) -> None:
        writer = self._writer
        if writer.is_closing():
            return  # nothing more can reach this client
        if self._idle and not writer.transport.get_write_buffer_size():
            # Nothing queued and the socket took all it was given: write at once, without
            # a trip through the writer task (most replies and live events).
            writer.write(frame)
            return
        # Frames are copied into chunks rather than queued one by one: thousands of small
        # frames held by a slow reader would each pin an allocator pool, and the daemon
        # would keep many times the queued bytes (measured: 45 MiB for a 1 MiB queue).
        last = self._outbox[-1] if self._outbox else None
        if isinstance(last, bytearray) and len(last) < OUTBOX_CHUNK_BYTES:
            last += frame
        else:
            self._outbox.append(bytearray(frame))
        self._queued_bytes += len(frame)
        if self._queued_bytes > self._max_queued:
            self._drained.clear()
        self._wake.set()

    # -- subscription -------------------------------------------------------------------

    def subscribe(self, hub: Hub, after_seq: int | None, deltas: bool = True) -> None:
        """Subscribe to `hub`, replacing this connection's subscription."""
        self.unsubscribe()
        self._subscription = hub.subscribe(self, after_seq, deltas)

    def unsubscribe(self) -> None:
        if self._subscription is not None:
            self._subscription.end()
            self._subscription = None

    async def backpressure(self) -> None:
        """Wait while the outbox is over its bound (the client is not reading)."""
        await self._drained.wait()

    # -- writer -------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            while not self._writer.is_closing():
                if not self._outbox:
                    if self._closing:
                        return
                    self._wake.clear()
                    self._idle = True
                    try:
                        await self._wake.wait()
                    finally:
                        self._idle = False
                    continue
                batch: list[bytearray] = []
                while self._outbox and isinstance(self._outbox[0], bytearray):
                    chunk = self._outbox.popleft()
                    assert isinstance(chunk, bytearray)
                    batch.append(chunk)
                    self._queued_bytes -= len(chunk)
                if batch:
                    self._writer.write(b"".join(batch))
                    if self._queued_bytes <= self._max_queued:
                        self._drained.set()
                    await self._writer.drain()
                    continue
                job = self._outbox.popleft()
                assert not isinstance(job, bytearray)
                await job(self._writer)
        except ConnectionError:
            pass
        finally:
            self._drained.set()
            self._writer.close()

    async def close(self) -> None:
        """Flush what is queued, then close."""
        self._closing = True
        self._wake.set()
        with contextlib.suppress(Exception):
            await self._task

    def abort_after_flush(self) -> None:
        """Close once what is queued is written, also ending the connection's reader."""
        self._closing = True
        self._wake.set()

    def abort(self) -> None:
        """Close now, dropping what is queued: for a client that does not read it."""
        self._outbox.clear()
        self._queued_bytes = 0
        self.abort_after_flush()
        self._writer.transport.abort()


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    hello: bytes,
    handle: Handler,
    *,
    max_queued_bytes: int,
    max_frame_bytes: int,
    on_open: Callable[[Connection], None],
    on_close: Callable[[Connection], None],
) -> None:
    """Read request lines until EOF; each gets exactly one reply, in order."""
    conn = Connection(writer, max_queued_bytes)
    on_open(conn)
    conn.send(hello)
    try:
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                message = (
                    f"frame longer than {max_frame_bytes} bytes (capd --max-frame-bytes); "
                    "closing the connection"
                )
                conn.send(_error(None, "frame_too_large", message))
                return
            if not line:
                return
            if not line.strip():
                continue
            reply = await _reply(line, conn, handle)
            if reply is not None:
                conn.send(reply)
            await conn.backpressure()
    except ConnectionError:
        pass
    finally:
        on_close(conn)
        await conn.close()
        _drop_traceback(reader.exception())
        heap.connection_closed()


def _drop_traceback(exc: BaseException | None) -> None:
    """The reader keeps the error that ended its connection, and that error's traceback
    holds the frames that raised it, which hold the reader and its buffer (up to a whole
    frame): a cycle only a full collection frees, rare after `gc.freeze()`. Cut it so the
    buffer goes when the connection does."""
    if exc is not None:
        exc.__traceback__ = None


async def _reply(line: bytes, conn: Connection, handle: Handler) -> bytes | None:
    frame: dict[str, Any] | None = None
    try:
        frame = decode(line)
        check_bounds(frame, line)
        return await handle(frame, conn)
    except ProtocolError as exc:
        return _error(request_id(frame) if frame else None, exc.code, exc.message)
    except Exception as exc:
        log.exception("internal error handling %r", line[:200])
        rid = request_id(frame) if frame else None
        return _error(rid, "internal", f"internal error: {type(exc).__name__}: {exc}")


def _error(rid: object, code: str, message: str) -> bytes:
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 1] + "…"
    return encode(Error(id=rid, code=code, message=message))  # type: ignore[arg-type]
