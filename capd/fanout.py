"""Fan-out of a pod's (or the daemon's) events to subscribed connections.

Publishing never blocks: each subscription offers the frame to its connection's bounded
queue. A subscription that falls behind is cut off with `lagged {missed, resume_from}`,
and the client re-subscribes from the store. A subscription with `after_seq` first replays
durable events from the store, page by page, and goes live only once it has caught up, so
replay and live meet with no gap and no duplicate.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from capd.connection import Connection

ReplayPage = Callable[[int, int], list[tuple[int, bytes]]]
"""(after_seq, limit) -> [(seq, json)]: durable events from the store."""


@dataclass(eq=False, slots=True)
class Subscription:
    hub: "Hub"
    conn: "Connection"
    live: bool = False
    last_durable: int = 0
    lagging: bool = False
    missed: int = 0
    closed: bool = False

    def offer(self, frame: bytes, seq: int | None) -> None:
        if self.lagging:
            self.missed += 1
            return
        if self.conn.offer_event(frame):
            if seq is not None:
                self.last_durable = seq
            return
        self.lagging = True
        self.missed = 1
        self.conn.push_lagged(self)

    def end(self) -> None:
        self.closed = True
        self.hub.remove(self)


@dataclass(eq=False)
class Hub:
    """The subscribers of one event source; `last_seq` and `page` describe its durable log."""

    pod: str
    last_seq: Callable[[], int]
    page: ReplayPage | None = None
    subscriptions: set[Subscription] = field(default_factory=set)

    def publish(self, frame: bytes, seq: int | None = None) -> None:
        for sub in tuple(self.subscriptions):
            if sub.live:
                sub.offer(frame, seq)

    def subscribe(self, conn: "Connection", after_seq: int | None) -> Subscription:
        """Register `conn`; live at once without `after_seq`, else after a replay."""
        sub = Subscription(self, conn, last_durable=self.last_seq())
        self.subscriptions.add(sub)
        if after_seq is None or after_seq >= sub.last_durable:
            sub.live = True
        else:
            sub.last_durable = after_seq
            conn.push_replay(sub)
        return sub

    def remove(self, sub: Subscription) -> None:
        self.subscriptions.discard(sub)

    def close_all(self) -> None:
        for sub in tuple(self.subscriptions):
            sub.end()
