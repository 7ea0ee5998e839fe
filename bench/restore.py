"""Restore after a compaction: a restart reads a pod's events from its latest compaction's
`restore_from` on, so its cost follows the context, not the history.

Three pods, each the only pod of its own capd, hold histories written with capd's own
`Store` (as capd writes turns, a few thousand events to a transaction): `compacted` has
`restore_events` durable events with one `context_compacted` near the end, then a few
turns; `window only` holds just what `compacted` restores from (its summary and the turns
after it, so the same context) and is the baseline; `never compacted` is `compacted`
without its compaction, whose restore reads the whole history, as every restore did
before. Each pod is stopped, then started with the daemon's `start` method, whose ack
comes once the pod is restored: the figure is that round trip, the median of
`restore_rounds` stops and starts, and capd's RSS after the pod's first restore.
"""

import statistics
import time

from bench import servers
from bench.report import Figure
from bench.sizes import Size
from bench.wire import LineClient
from capd.store import SqliteStore, Store, StoredEvent
from protocol.events import (
    AssistantMessage,
    ContextCompacted,
    DurableEvent,
    StatusChanged,
    TurnEnd,
    TurnStart,
    Usage,
    UserMessage,
)
from protocol.framing import encode

TEXT = "r" * 1000
"""Each prompt and each answer."""
KEPT_TURNS = 10
"""Turns after the compaction."""
BATCH = 5000
"""Events to a transaction while writing a history."""
STEP_USAGE = Usage(input_tokens=1000, output_tokens=250)


def _turn(turn_id: str, compaction: ContextCompacted | None = None) -> list[DurableEvent]:
    """A finished turn's events, `compaction` (if any) committed before its model call."""
    events: list[DurableEvent] = [
        StatusChanged(status="running", turn_id=turn_id),
        TurnStart(turn_id=turn_id, invoke="run"),
        UserMessage(turn_id=turn_id, text=TEXT),
    ]
    if compaction is not None:
        events.append(compaction)
    events += [
        AssistantMessage(turn_id=turn_id, text=TEXT, usage=STEP_USAGE),
        TurnEnd(turn_id=turn_id, result="finished", output=TEXT),
        StatusChanged(status="idle", turn_id=None),
    ]
    return events


def _write(store: Store, pod: str, old_turns: int, compacted: bool) -> int:
    """Append `old_turns` turns, then one whose model call a compaction of all of them
    precedes (left out unless `compacted`), then KEPT_TURNS more; the pod's last seq."""
    seq = len(store.events_after(pod, 0, 1_000_000))
    ts = time.time()
    rows: list[StoredEvent] = []

    def add(events: list[DurableEvent]) -> None:
        nonlocal seq
        for event in events:
            seq += 1
            event.pod, event.seq, event.ts = pod, seq, ts
            rows.append((seq, ts, event.event, encode(event)[:-1]))
        if len(rows) >= BATCH:
            store.append(pod, rows)
            rows.clear()

    for turn in range(old_turns):
        add(_turn(f"old-{turn}"))
    compaction = ContextCompacted(
        turn_id="compacting",
        trigger="auto",
        summary="The user sent long prompts; each was answered. " * 20,
        through_seq=seq,
        tokens_before=old_turns * 500,
        tokens_after=1000,
        restore_from=seq + 1,
        usage=Usage(
            input_tokens=old_turns * STEP_USAGE.input_tokens,
            output_tokens=old_turns * STEP_USAGE.output_tokens,
        ),
    )
    add(_turn("compacting", compaction if compacted else None))
    for turn in range(KEPT_TURNS):
        add(_turn(f"kept-{turn}"))
    store.append(pod, rows)
    return seq


class _Pod:
    """A pod alone in its own capd, its history written while it is stopped."""

    def __init__(self, capd: servers.Server, old_turns: int, compacted: bool) -> None:
        self.capd = capd
        self.daemon = LineClient(capd.socket)
        self.socket = servers.spawn(self.daemon, "p", servers.scripted())
        self.daemon.request({"id": "stop", "method": "stop", "name": "p"})
        store = SqliteStore(capd.workdir / "state" / "capd.db")
        try:
            self.last_seq = _write(store, "p", old_turns, compacted)
        finally:
            store.close()
        self.times: list[float] = []
        self.rss = 0

    def restore(self) -> None:
        start = time.perf_counter()
        self.daemon.request({"id": "start", "method": "start", "name": "p"})
        self.times.append(time.perf_counter() - start)
        if not self.rss:
            self.rss = self.capd.rss_bytes()
            self._check()
        self.daemon.request({"id": "stop", "method": "stop", "name": "p"})

    def _check(self) -> None:
        with LineClient(self.socket) as pod:
            status = pod.request({"id": "s", "method": "status"})["result"]
        if (status["status"], status["last_seq"]) != ("idle", self.last_seq):
            raise RuntimeError(f"restored pod is {status['status']} at {status['last_seq']}")

    def median_ms(self) -> float:
        return statistics.median(self.times) * 1000


def run(size: Size) -> list[Figure]:
    n = size.restore_events
    old_turns = -(-(n - 7 - 6 * KEPT_TURNS) // 6)
    with (
        servers.capd() as capd_a,
        servers.capd() as capd_b,
        servers.capd() as capd_c,
    ):
        compacted = _Pod(capd_a, old_turns, compacted=True)
        window = _Pod(capd_b, 0, compacted=True)
        whole = _Pod(capd_c, old_turns, compacted=False)
        for _ in range(size.restore_rounds):
            compacted.restore()
            window.restore()
        whole.restore()
        for pod in (compacted, window, whole):
            pod.daemon.close()
    events = f"{compacted.last_seq:,} events"
    mb = 1 / 2**20
    return [
        Figure(
            "restore",
            f"restore, {events}, compacted",
            compacted.median_ms(),
            "ms",
            "lower",
            window.median_ms(),
            1.5,
            target_is_ratio=True,
        ),
        Figure(
            "restore",
            f"capd RSS after it, {events}, compacted",
            compacted.rss * mb,
            "MB",
            "lower",
            window.rss * mb,
            1.1,
            target_is_ratio=True,
        ),
        Figure(
            "restore",
            f"restore, {whole.last_seq:,} events, never compacted",
            whole.median_ms(),
            "ms",
            "lower",
            window.median_ms(),
        ),
        Figure(
            "restore",
            f"capd RSS after it, {whole.last_seq:,} events, never compacted",
            whole.rss * mb,
            "MB",
            "lower",
            window.rss * mb,
        ),
    ]
