"""Fan-out: text_delta events per second delivered to N subscribers of one pod.

capd streams a scripted reply of `fanout_deltas` pieces (no delay between them) to
`fanout_subscribers` connections; the baseline fan-out server writes frames of the same
shape to as many connections. The figure is deltas received by all subscribers together,
per second, from the `run` request until every subscriber has its `turn_end`.
"""

import asyncio
import time
from pathlib import Path

import uvloop

from bench import servers
from bench.report import Figure
from bench.sizes import Size
from bench.wire import LineClient

CHUNK_CHARS = 16
TIMEOUT_S = 120.0


class _Counter(asyncio.Protocol):
    """Counts the text_delta frames on one connection until its turn_end."""

    def __init__(self) -> None:
        self.deltas = 0
        self.lagged = False
        loop = asyncio.get_running_loop()
        self.subscribed: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._tail = b""

    def data_received(self, data: bytes) -> None:
        data = self._tail + data
        cut = data.rfind(b"\n") + 1
        whole, self._tail = data[:cut], data[cut:]
        self.deltas += whole.count(b'"text_delta"')
        self.lagged = self.lagged or b'"lagged"' in whole
        if b'"ack"' in whole and not self.subscribed.done():
            self.subscribed.set_result(None)
        if b'"turn_end"' in whole and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in (self.subscribed, self.done):
            if not waiter.done():
                waiter.set_exception(ConnectionError("the server closed a subscriber"))


async def _deliver(path: Path, subscribers: int, run: dict[str, object]) -> tuple[float, int]:
    """(deltas delivered per second, subscribers that lagged)."""
    loop = asyncio.get_running_loop()
    counters = []
    for i in range(subscribers):
        transport, counter = await loop.create_unix_connection(_Counter, str(path))
        transport.write(b'{"id":"s%d","method":"subscribe"}\n' % i)
        counters.append(counter)
    async with asyncio.timeout(TIMEOUT_S):
        await asyncio.gather(*(counter.subscribed for counter in counters))
    with LineClient(path) as control:
        start = time.perf_counter()
        control.request({"id": "go", "method": "run", **run})
        async with asyncio.timeout(TIMEOUT_S):
            await asyncio.gather(*(counter.done for counter in counters))
        elapsed = time.perf_counter() - start
    for counter in counters:
        counter.done.result()
    return (
        sum(counter.deltas for counter in counters) / elapsed,
        sum(counter.lagged for counter in counters),
    )


def run(size: Size) -> list[Figure]:
    text = "x" * (CHUNK_CHARS * size.fanout_deltas)
    n = size.fanout_subscribers
    with servers.baseline("fanout") as baseline:
        base_rate, _ = uvloop.run(
            _deliver(baseline.socket, n, {"text": text, "chunk_chars": CHUNK_CHARS})
        )
    with servers.capd() as capd:
        with LineClient(capd.socket) as daemon:
            step = {"text": text, "chunk_chars": CHUNK_CHARS}
            pod = servers.spawn(daemon, "fan", servers.scripted(step))
        capd_rate, lagged = uvloop.run(_deliver(pod, n, {"text": "go"}))
    if lagged:
        raise RuntimeError(f"{lagged} of {n} subscribers lagged: the figure would not count")
    return [
        Figure(
            "fanout",
            f"text_delta to {n} subscribers",
            capd_rate,
            "ev/s",
            "higher",
            base_rate,
            0.5,
            target_is_ratio=True,
        )
    ]
