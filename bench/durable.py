"""Durable writes: events per second committed to capd's store.

`store commits`: capd's own `Store.append`, one event per call, outside an event loop,
where each commits at once (its own SQLite transaction), with events encoded as capd
encodes them. Baseline: rows of the same size inserted straight into SQLite with the same settings
(WAL, synchronous=NORMAL), the floor of a transaction per event from Python. The two run
in alternating blocks of BLOCK events.

`pod_event → ack`: the same, end to end. A client pipelines `pod_event` requests to a paused
pod (up to IN_FLIGHT unacked, the window refilled in one write once half of it is acked),
which stores each as a `pod_event_received` event and acks it once its group commit
(capd.store.batch: one transaction per turn of the event loop) is done; the figure is acks
per second, request parsing and the pod's actor included. Targets (issue 22): 20,000/s, and
0.7x the baseline, a transaction per event straight from Python.
"""

import sqlite3
import tempfile
import time
from pathlib import Path

from bench import servers
from bench.report import Figure
from bench.sizes import Size
from bench.wire import LineClient
from capd.store import SqliteStore
from protocol.events import PodEventReceived
from protocol.framing import encode

IN_FLIGHT = 256
"""Requests sent ahead of their acks."""
BLOCK = 1000


def _report(i: int) -> dict[str, object]:
    return {
        "event": "turn_ended",
        "pod": "worker",
        "event_id": f"bench-{i}",
        "turn_id": f"t{i}",
        "output": "the tests pass; 3 files changed",
    }


def _request(i: int) -> dict[str, object]:
    return {"id": i, "method": "pod_event", "event": _report(i)}


def _event_row(seq: int) -> tuple[int, float, str, bytes]:
    event = PodEventReceived(pod="inbox", seq=seq, ts=time.time(), payload=_report(seq))
    return seq, event.ts or 0.0, event.event, encode(event)[:-1]


def _store_rates(count: int) -> tuple[float, float]:
    """(capd's store, SQLite straight) in events per second."""
    with tempfile.TemporaryDirectory(prefix="capd-bench-store-") as tmp:
        store = SqliteStore(Path(tmp) / "capd.db")
        floor = sqlite3.connect(Path(tmp) / "floor.db", isolation_level=None)
        floor.execute("PRAGMA journal_mode=WAL")
        floor.execute("PRAGMA synchronous=NORMAL")
        floor.execute(
            "CREATE TABLE events (pod TEXT, seq INTEGER, ts REAL, kind TEXT, data BLOB, "
            "PRIMARY KEY (pod, seq)) WITHOUT ROWID"
        )
        store_s = floor_s = 0.0
        for first in range(1, count + 1, BLOCK):
            rows = [_event_row(seq) for seq in range(first, min(first + BLOCK, count + 1))]
            start = time.perf_counter()
            for row in rows:
                store.append("inbox", [row])
            store_s += time.perf_counter() - start
            start = time.perf_counter()
            for row in rows:
                floor.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", ("inbox", *row))
            floor_s += time.perf_counter() - start
        store.close()
        floor.close()
    return count / store_s, count / floor_s


def _acks_per_s(path: Path, count: int) -> float:
    with LineClient(path) as client:
        client.request({"id": "run", "method": "run", "text": "wait"})
        client.request({"id": "pause", "method": "pause"})
        start = time.perf_counter()
        sent = acked = 0
        while acked < count:
            if sent - acked <= IN_FLIGHT // 2 and sent < count:
                # Refill the window in one write once half of it is acked.
                more = range(sent, min(count, acked + IN_FLIGHT))
                client.send_all([_request(i) for i in more])
                sent += len(more)
            reply = client.read()
            if reply.get("event") == "error":
                raise RuntimeError(f"pod_event: {reply['code']}: {reply['message']}")
            acked += reply.get("event") == "ack"
        rate = count / (time.perf_counter() - start)
        last_seq = client.request({"id": "s", "method": "status"})["result"]["last_seq"]
        page = {"id": "h", "method": "history", "after_seq": last_seq - 1}
        last = client.request(page)["result"]["events"][-1]
    if last.get("payload", {}).get("event_id") != f"bench-{count - 1}":
        raise RuntimeError(f"the last durable event is not the last pod_event sent: {last}")
    return rate


def run(size: Size) -> list[Figure]:
    n = size.durable_events
    store_rate, floor_rate = _store_rates(n)
    step = {"text": "x" * 10_000, "chunk_chars": 1, "delay_ms": 10}
    with servers.capd() as capd:
        with LineClient(capd.socket) as daemon:
            pod = servers.spawn(daemon, "inbox", servers.scripted(step))
        ack_rate = _acks_per_s(pod, n)
    return [
        Figure("durable", "store commits", store_rate, "ev/s", "higher", floor_rate),
        # Issue 22's two targets for the end-to-end rate, one row each: ≥ 20,000/s, and
        # ≥ 0.7x raw SQLite inserts.
        Figure(
            "durable",
            "pod_event → committed + acked",
            ack_rate,
            "ev/s",
            "higher",
            floor_rate,
            20_000,
        ),
        Figure(
            "durable",
            "pod_event → committed + acked, against SQLite",
            ack_rate,
            "ev/s",
            "higher",
            floor_rate,
            0.7,
            target_is_ratio=True,
        ),
    ]
