"""This node's lease: its incarnation (kept in the state dir, so a restart takes its pods
back at once), the heartbeat that renews the lease when no batch did lately, and the
watchdog that stops capd before the lease can have run out.

Every batch the store commits runs `capd_fence`, which renews the lease; the store notes
when the last such COMMIT was sent (`renewed_at`, monotonic clock). The database set the
new expiry by its own clock when the fence ran, later in real time than `renewed_at`, so
the lease cannot expire before `renewed_at + ttl` by this process's monotonic clock,
whatever the wall clocks say; the margin covers clock rate differences (fleet22 §4.2).
"""

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Protocol

from capd.proc.leftovers import kill_own_groups
from capd.store.batch import EXIT_STORE_FAILED

log = logging.getLogger(__name__)

INCARNATION_FILE = "node-incarnation"


class FleetRefused(Exception):
    """This capd cannot join the fleet (its node name is another live capd's)."""


class LeasedStore(Protocol):
    renewed_at: float | None

    def renew_lease(self) -> None: ...

    async def flush(self) -> None: ...


def heartbeat_s(ttl_s: float) -> float:
    return ttl_s / 3


def margin_s(ttl_s: float) -> float:
    """How long before its lease can expire a node that could not renew stops."""
    return max(min(1.0, ttl_s / 4), ttl_s / 10)


def previous_incarnation(state_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((state_dir / INCARNATION_FILE).read_text())
    return None


def save_incarnation(state_dir: Path, incarnation: int) -> None:
    path = state_dir / INCARNATION_FILE
    written = path.with_suffix(".new")
    written.write_text(f"{incarnation}\n")
    os.chmod(written, 0o600)
    written.replace(path)


class NodeLease:
    def __init__(self, store: LeasedStore, node: str, incarnation: int, ttl_s: float) -> None:
        self._store = store
        self.node = node
        self.incarnation = incarnation
        self.ttl_s = ttl_s
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._heartbeat(), name="lease heartbeat"),
            asyncio.create_task(self._watchdog(), name="lease watchdog"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def _renewed(self) -> float:
        renewed = self._store.renewed_at
        assert renewed is not None
        return renewed

    async def _heartbeat(self) -> None:
        """Renew when no batch has for a heartbeat: an empty fenced batch, on the store's
        own connection and thread, so it waits behind (and fails with) real batches."""
        every = heartbeat_s(self.ttl_s)
        while True:
            await asyncio.sleep(max(0.0, self._renewed() + every - time.monotonic()))
            if time.monotonic() - self._renewed() >= every * 0.95:
                self._store.renew_lease()
                await self._store.flush()

    async def _watchdog(self) -> None:
        limit = self.ttl_s - margin_s(self.ttl_s)
        while True:
            left = self._renewed() + limit - time.monotonic()
            if left <= 0:
                self._stop_capd(time.monotonic() - self._renewed())
            await asyncio.sleep(left)

    def _stop_capd(self, since: float) -> None:
        stop_node(
            f"node {self.node} could not renew its lease for {since:.1f} s (database "
            "unreachable?): stopping before another node takes its pods"
        )


def store_failed(exc: BaseException) -> None:
    """A fleet node's store commit failed (its lease lost, or the database gone): stop
    as any capd does, and take the pods' processes down with it, since another node may
    be about to run those pods."""
    stop_node(f"store commit failed, capd stops (restart restores what committed): {exc}")


def stop_node(why: str) -> None:
    """Fail-stop without a database write (it may be unreachable, or the lease gone):
    kill the pods' processes and exit; systemd or Kubernetes restarts capd, which joins
    again and takes back whatever is still its own."""
    log.critical("%s (exit %d)", why, EXIT_STORE_FAILED)
    kill_own_groups()
    logging.shutdown()
    os._exit(EXIT_STORE_FAILED)
