"""A fan-out `Outlet` without a socket: what a `Connection` does for its subscription,
with the writer task replaced by `flush`, which the test calls when it wants the queue
written."""

import asyncio
from collections import deque
from collections.abc import Callable
from typing import cast

import orjson

from capd.fanout import WriterJob
from tests.fakes.engine import WAIT_S


class _Writer:
    """The little of asyncio.StreamWriter a subscription's writer jobs use."""

    def __init__(self, outlet: "FakeOutlet") -> None:
        self._outlet = outlet

    def write(self, data: bytes) -> None:
        self._outlet.written += data

    async def drain(self) -> None:
        self._outlet.on_drain()
        await asyncio.sleep(0)  # a suspension point, as a real drain may be

    def is_closing(self) -> bool:
        return self._outlet.closing


class FakeOutlet:
    def __init__(self, room: int = 1 << 20) -> None:
        self.room = room
        """Bytes of events that may wait to be written, like --max-queued-bytes."""
        self.written = b""
        self.closing = False
        self.on_drain: Callable[[], None] = lambda: None
        """Called at each drain of a writer job: a test's chance to act mid-replay."""
        self.on_offer: Callable[[], None] = lambda: None
        """Called as each live event is offered."""
        self._queue: deque[bytes | WriterJob] = deque()
        self._queued_bytes = 0

    def offer_event(self, frame: bytes) -> bool:
        self.on_offer()
        if self._queued_bytes + len(frame) > self.room:
            return False
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        return True

    def run_in_order(self, job: WriterJob) -> None:
        self._queue.append(job)

    async def flush(self) -> None:
        """Write what is queued, in order, running the writer jobs among it."""
        writer = _Writer(self)
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, bytes):
                self._queued_bytes -= len(item)
                self.written += item
            else:
                await item(cast(asyncio.StreamWriter, writer))

    def frames(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.written.splitlines()]

    def seqs(self) -> list[object]:
        return [frame.get("seq") for frame in self.frames()]


async def flushed(outlet: FakeOutlet) -> FakeOutlet:
    async with asyncio.timeout(WAIT_S):
        await outlet.flush()
    return outlet
