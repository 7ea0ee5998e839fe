"""One client connection: reads request lines, writes replies and events in order.

Everything a connection sends goes through one outbox drained by one writer task, so a
reply never overtakes an event queued before it. Replies are always accepted (the reader
stops reading while too much is queued); events are accepted only while the outbox holds
less than `max_queued_bytes`, which bounds the daemon's memory per slow client. A
connection holds at most one subscription (`capd.fanout`), whose replay and `lagged` frame
its writer task runs in order with the rest.

Requests are pipelined: the reader hands each buffered request to its handler without
waiting for the replies before it (up to MAX_IN_FLIGHT unanswered), so a burst of requests
to a pod reaches its actor in one wake-up and its writes share one commit. Replies still go
out in request order, each once every write made before it is committed
(capd.store.batch.after_writes). A handler that returns a coroutine is sequential: it starts
once every earlier reply is written, and the next request waits for it.
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import orjson

from capd import heap
from capd.fanout import Hub, Subscription, WriterJob
from capd.store.batch import after_writes, writes_pending
from protocol.errors import ProtocolError
from protocol.events import Error
from protocol.framing import check_bounds, decode, encode
from protocol.methods import RequestId, request_id

log = logging.getLogger(__name__)

OUTBOX_CHUNK_BYTES = 64 * 1024
MAX_ERROR_CHARS = 2000
"""An error's message is cut here: it names what was wrong, it does not echo the frame."""
MAX_IN_FLIGHT = 256
"""Requests of one connection handed on before their replies are written."""


class Answer:
    """A reply to come, settled by whoever handles the request (a pod's actor) as an
    asyncio future is: `set_result` with the ack's result, or `set_exception`. It is written
    in request order, once every write made before it settled is committed."""

    __slots__ = ("_conn", "_id", "frame", "sendable")

    def __init__(self, conn: "Connection", rid: RequestId | None) -> None:
        self._conn = conn
        self._id = rid
        self.frame: bytes | None = None
        self.sendable = False

    def done(self) -> bool:
        return self.frame is not None

    def set_result(self, result: dict[str, Any]) -> None:
        self.settle(
            orjson.dumps(
                {"event": "ack", "id": self._id, "result": result},
                option=orjson.OPT_APPEND_NEWLINE,
            )
        )

    def set_exception(self, exc: BaseException) -> None:
        self.settle(_failure(self._id, exc))

    def settle(self, frame: bytes) -> None:
        if self.frame is None:
            self.frame = frame
            after_writes(self._release)

    def _release(self) -> None:
        self.sendable = True
        self._conn._write_answers()


Reply = bytes | None | Answer | Coroutine[Any, Any, bytes | None]
"""What a handler returns: the reply now; None when it queued the reply itself; an `Answer`
(`Connection.answer`) it settles later; or a coroutine, run sequentially."""
Handler = Callable[[dict[str, Any], "Connection"], Reply]


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
        self._answers: deque[Answer] = deque()
        """Replies not written yet, in request order."""
        self._answered = asyncio.Event()
        """Set when `_answers` has room (or is empty, while a sequential request waits)."""
        self._room = MAX_IN_FLIGHT
        self._task = asyncio.create_task(self._write_loop())

    # -- replies ------------------------------------------------------------------------

    def answer(self, rid: RequestId | None) -> Answer:
        """The reply to the request being handled, to settle later (see `Answer`)."""
        answer = Answer(self, rid)
        self._answers.append(answer)
        return answer

    @property
    def unanswered(self) -> int:
        """Replies of earlier requests not written yet."""
        return len(self._answers)

    def reply(self, frame: bytes) -> None:
        """Write `frame`, the reply to the request being handled, in its turn."""
        if not self._answers and not writes_pending():
            self._push(frame)
        else:
            self.answer(None).settle(frame)

    def _write_answers(self) -> None:
        answers = self._answers
        coalesce = len(answers) > 1
        while answers and answers[0].sendable:
            frame = answers.popleft().frame
            assert frame is not None
            self._push(frame, coalesce=coalesce)
        if len(answers) < self._room:
            self._answered.set()
        if self._closing:
            self._wake.set()  # the writer waits for the replies of requests under way

    async def until_fewer_unanswered(self, count: int) -> None:
        """Wait until fewer than `count` replies of earlier requests are unwritten."""
        while len(self._answers) >= count:
            self._room = count
            self._answered.clear()
            await self._answered.wait()

    # -- producers ----------------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue a frame now, ahead of replies still waiting (hello, a sequential
        request's own ack): always accepted."""
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

    def _push(self, frame: bytes, coalesce: bool = False) -> None:
        writer = self._writer
        if writer.is_closing():
            return  # nothing more can reach this client
        if (
            self._idle
            and not coalesce
            and not self._outbox
            and not writer.transport.get_write_buffer_size()
        ):
            # Nothing queued and the socket took all it was given: write at once, without
            # a trip through the writer task (most replies and live events). Replies of a
            # burst (`coalesce`) are queued, for the writer task to write in one go.
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

    @property
    def over_bound(self) -> bool:
        """More is queued than the client may hold back (`backpressure` would wait)."""
        return not self._drained.is_set()

    async def backpressure(self) -> None:
        """Wait while the outbox is over its bound (the client is not reading)."""
        await self._drained.wait()

    # -- writer -------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        try:
            while not self._writer.is_closing():
                if not self._outbox:
                    if self._closing and not self._answers:
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

    @property
    def closing(self) -> bool:
        """capd is closing the connection (its endpoint shuts down): requests read now are
        not handled. (A client that closed its end still has what it sent handled.)"""
        return self._closing

    def abort_after_flush(self) -> None:
        """Close once what is queued is written, and the replies of the requests under way
        (`Endpoint.close` gives them a grace, then aborts), also ending the connection's
        reader."""
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
    conn.reply(hello)
    try:
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                message = (
                    f"frame longer than {max_frame_bytes} bytes (capd --max-frame-bytes); "
                    "closing the connection"
                )
                conn.reply(_error(None, "frame_too_large", message))
                await conn.until_fewer_unanswered(1)
                return
            if not line or conn.closing:
                # The client is done sending, maybe not reading, or capd closes the
                # connection (the lines still buffered are not handled): every request
                # handled gets its reply.
                await conn.until_fewer_unanswered(1)
                return
            if line.isspace():  # as `not line.strip()`, without a copy of each line
                continue
            reply = _dispatch(line, conn, handle)
            if isinstance(reply, bytes):
                conn.reply(reply)
            elif reply is not None and not isinstance(reply, Answer):
                await conn.until_fewer_unanswered(1)
                if (frame := await _finish(reply, line)) is not None:
                    conn.reply(frame)
            if conn.unanswered >= MAX_IN_FLIGHT:
                await conn.until_fewer_unanswered(MAX_IN_FLIGHT)
            if conn.over_bound:
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


def _dispatch(line: bytes, conn: Connection, handle: Handler) -> Reply:
    frame: dict[str, Any] | None = None
    try:
        frame = decode(line)
        check_bounds(frame, line)
        return handle(frame, conn)
    except Exception as exc:
        return _failed(line, request_id(frame) if frame else None, exc)


async def _finish(reply: Coroutine[Any, Any, bytes | None], line: bytes) -> bytes | None:
    """Run a sequential request's handler to its reply."""
    try:
        return await reply
    except Exception as exc:
        return _failed(line, _request_id_of(line), exc)


def _failed(line: bytes, rid: object, exc: Exception) -> bytes:
    """The reply to request `line` whose handler raised `exc`, logged unless expected."""
    if not isinstance(exc, ProtocolError):
        log.exception("internal error handling %r", line[:200])
    return _failure(rid, exc)


def _failure(rid: object, exc: BaseException) -> bytes:
    """The error frame for a request that failed with `exc`."""
    if isinstance(exc, ProtocolError):
        return _error(rid, exc.code, exc.message)
    return _internal(rid, exc)


def _request_id_of(line: bytes) -> object:
    with contextlib.suppress(Exception):
        return request_id(decode(line))
    return None


def _internal(rid: object, exc: BaseException) -> bytes:
    return _error(rid, "internal", f"internal error: {type(exc).__name__}: {exc}")


def _error(rid: object, code: str, message: str) -> bytes:
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 1] + "…"
    return encode(Error(id=rid, code=code, message=message))  # type: ignore[arg-type]
