"""Fan-out of a pod's (or the daemon's) events to subscribed connections.

Publishing never blocks: each subscription offers the frame to its connection's bounded
queue. A subscription that falls behind is cut off with `lagged {missed, resume_from}`,
and the client re-subscribes from the store. A subscription with `after_seq` first replays
durable events from the store, page by page, and goes live only once it has caught up, so
replay and live meet with no gap and no duplicate.

A subscription's state and its replay and lag handling live here; the connection only runs
them in its writer task, in order with the frames queued before them (`Outlet`).
"""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from capd import metrics
from capd.store.batch import after_writes
from protocol.events import Lagged
from protocol.framing import encode

REPLAY_PAGE = 512

ReplayPage = Callable[[int, int], list[tuple[int, bytes]]]
"""(after_seq, limit) -> [(seq, json)]: durable events from the store."""

WriterJob = Callable[[asyncio.StreamWriter], Awaitable[None]]
"""Work that writes to a connection's stream itself, run by its writer task."""


class Outlet(Protocol):
    """What a subscription needs of its connection (`capd.connection.Connection`)."""

    def offer_event(self, frame: bytes) -> bool:
        """Queue an event unless the outbox is full; False means the subscriber lags."""
        ...

    def run_in_order(self, job: WriterJob) -> None:
        """Run `job` in the writer task once everything queued before it is written."""
        ...


class SubscriptionState(Enum):
    REPLAYING = "replaying"
    """Replay from the store is queued or under way; published events are not offered."""
    LIVE = "live"
    """Published events are offered to the connection."""
    LAGGED = "lagged"
    """The outbox was full: events are counted as missed until `lagged` is written."""
    CLOSED = "closed"
    """Ended: unsubscribed, lagged, the connection or the source closed."""


# Module names for the states the publishing path compares against: on Python 3.11 reading
# a global is several times faster than reading an Enum member from its class.
REPLAYING = SubscriptionState.REPLAYING
LIVE = SubscriptionState.LIVE
LAGGED = SubscriptionState.LAGGED
CLOSED = SubscriptionState.CLOSED


@dataclass(eq=False, slots=True)
class Subscription:
    """One connection's subscription: replaying → live → lagged → closed, each step
    optional but the last (`Hub.subscribe` starts it live when there is nothing to replay;
    it may be closed in any state)."""

    hub: "Hub"
    outlet: Outlet
    state: SubscriptionState
    last_durable: int
    """The last durable seq sent to the subscriber (while replaying, where replay starts)."""
    deltas: bool = True
    """False: text, thinking and tool-call deltas are not offered (`subscribe {deltas}`)."""
    missed: int = 0

    def offer(self, frame: bytes, seq: int | None) -> None:
        state = self.state
        if state is LIVE:
            if self.outlet.offer_event(frame):
                if seq is not None:
                    self.last_durable = seq
                return
            self.state = LAGGED
            self.missed = 1
            metrics.subscription_lagged()
            self.outlet.run_in_order(self._end_lagged)
        elif state is LAGGED:
            self.missed += 1

    def end(self) -> None:
        self.state = CLOSED
        self.hub.remove(self)

    async def _replay(self, writer: asyncio.StreamWriter) -> None:
        hub = self.hub
        assert hub.page is not None
        cursor = self.last_durable
        while self.state is REPLAYING and not writer.is_closing():
            rows = hub.page(cursor, REPLAY_PAGE)
            if rows:
                writer.write(b"".join(data + b"\n" for _, data in rows))
                cursor = rows[-1][0]
                await writer.drain()
            if self.state is REPLAYING and cursor >= hub.last_seq():
                # No await between this check and going live: nothing can slip between.
                self.last_durable = cursor
                self.state = LIVE
                return

    async def _end_lagged(self, writer: asyncio.StreamWriter) -> None:
        self.end()
        frame = encode(Lagged(pod=self.hub.pod, missed=self.missed, resume_from=self.last_durable))
        writer.write(frame)
        await writer.drain()


@dataclass(eq=False)
class Hub:
    """The subscribers of one event source; `last_seq` and `page` describe its durable log
    (committed events only)."""

    pod: str
    last_seq: Callable[[], int]
    page: ReplayPage | None = None
    subscriptions: set[Subscription] = field(default_factory=set)
    waits_for_writes: bool = True
    """Publish only once every write made before is committed (the daemon's events: a
    `pod_spawned` whose pod a crash would take back must not be heard). A pod's journal
    publishes from its commit callbacks and says False."""

    def publish(self, frame: bytes, seq: int | None = None, delta: bool = False) -> None:
        """Offer `frame` to every subscription; a `delta` only to those that take deltas."""
        if self.waits_for_writes:
            after_writes(lambda: self._offer(frame, seq, delta))
        else:
            self._offer(frame, seq, delta)

    def _offer(self, frame: bytes, seq: int | None, delta: bool) -> None:
        for sub in tuple(self.subscriptions):
            if delta and not sub.deltas:
                continue
            sub.offer(frame, seq)

    def subscribe(self, outlet: Outlet, after_seq: int | None, deltas: bool = True) -> Subscription:
        """Register `outlet`; live at once without `after_seq`, else after a replay."""
        last = self.last_seq()
        if after_seq is None or after_seq >= last:
            sub = Subscription(self, outlet, LIVE, last, deltas)
        else:
            sub = Subscription(self, outlet, REPLAYING, after_seq, deltas)
            outlet.run_in_order(sub._replay)
        self.subscriptions.add(sub)
        return sub

    def remove(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)

    def close_all(self) -> None:
        for sub in tuple(self.subscriptions):
            sub.end()
