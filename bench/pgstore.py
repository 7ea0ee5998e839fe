"""PostgreSQL as capd's store: events per second committed through `PostgresStore`, against
rows inserted straight with the same driver (psycopg 3) into the same server, in the same run.

A server of its own (tests/pg.py: initdb into a temporary directory, Unix socket only) with
PostgreSQL's default durability: fsync on, `synchronous_commit=on`. For each batch size (1,
50, 500 events) capd's store appends one event per call inside a running event loop, as
the journal does, and the batch is one group commit (`flush`); the baseline inserts the same
rows with one `executemany` and one COMMIT per batch. The two run in alternating blocks.
Skipped (no figures) when the server binaries are missing.
"""

import asyncio
import time

import psycopg

from bench.durable import _event_row
from bench.report import Figure
from bench.sizes import Size
from capd.store.postgres import INSERT_EVENT, PostgresStore
from tests import pg

BATCHES = (1, 50, 500)
BLOCKS = 4
"""Alternating blocks per batch size, store then baseline."""


async def _store_s(
    store: PostgresStore, pod: str, rows: list[tuple[int, float, str, bytes]], batch: int
) -> float:
    start = time.perf_counter()
    for first in range(0, len(rows), batch):
        for row in rows[first : first + batch]:
            store.append(pod, [row])
        await store.flush()
    return time.perf_counter() - start


def _direct_s(
    db: psycopg.Connection, pod: str, rows: list[tuple[int, float, str, bytes]], batch: int
) -> float:
    start = time.perf_counter()
    with db.cursor() as cursor:
        for first in range(0, len(rows), batch):
            with db.transaction():
                cursor.executemany(
                    INSERT_EVENT, [(pod, *row) for row in rows[first : first + batch]]
                )
    return time.perf_counter() - start


async def _rates(url: str, events: int, batch: int) -> tuple[float, float]:
    """(capd's store, psycopg straight) in events per second."""
    store = PostgresStore(url)
    try:
        with psycopg.connect(url) as db:
            store_s = direct_s = 0.0
            per_block = max(batch, events // BLOCKS // batch * batch)
            for block in range(BLOCKS):
                rows = [
                    _event_row(seq)
                    for seq in range(block * per_block + 1, (block + 1) * per_block + 1)
                ]
                store_s += await _store_s(store, f"store-{batch}", rows, batch)
                direct_s += _direct_s(db, f"direct-{batch}", rows, batch)
    finally:
        store.close()
    total = per_block * BLOCKS
    return total / store_s, total / direct_s


def run(size: Size) -> list[Figure]:
    bin = pg.bindir()
    if bin is None:
        return []
    server = pg.start(bin, fsync=True)
    try:
        server.sql("CREATE DATABASE bench")
        url = server.url("bench")
        figures = []
        for batch in BATCHES:
            events = size.durable_events // 50 if batch == 1 else size.durable_events
            store_rate, direct_rate = asyncio.run(_rates(url, events, batch))
            figures.append(
                Figure(
                    "pgstore",
                    f"store commits, {batch} per commit",
                    store_rate,
                    "ev/s",
                    "higher",
                    direct_rate,
                )
            )
        return figures
    finally:
        server.stop()
