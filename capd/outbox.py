"""Delivery of child reports to parent sockets: durable, at least once, in order per parent.

Reports wait in the store's `outbox` table until the parent acks them. One worker task per
parent socket sends them oldest first as `pod_event` requests over a plain client
connection (the parent may live in another capd; its socket is just a path). While the
socket is absent or refusing, the worker backs off exponentially; `poke` cuts the wait
short, e.g. when a local parent pod comes back up. A report that reached the parent but
whose ack was lost is sent again with the same `event_id`, and the parent drops it.
"""

import asyncio
import contextlib
import logging
import random

from capd.store import Store
from protocol.client import Client, ConnectionClosed
from protocol.errors import ProtocolError
from protocol.framing import decode

log = logging.getLogger(__name__)

BATCH = 100
REQUEST_TIMEOUT_S = 10.0
RETRY_BASE_S = 0.1
RETRY_CAP_S = 30.0

_DELIVERY_ERRORS = (OSError, ConnectionClosed, TimeoutError, ProtocolError, ValueError)


class Outbox:
    def __init__(self, store: Store, retry_cap_s: float = RETRY_CAP_S) -> None:
        self._store = store
        self._retry_cap_s = retry_cap_s
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}

    def start(self) -> None:
        """Resume delivery of every report a previous run left undelivered."""
        for target in self._store.report_targets():
            self.poke(target)

    def add(self, pod: str, target: str, payload: bytes) -> None:
        self._store.add_report(pod, target, payload)
        self.poke(target)

    def poke(self, target: str) -> None:
        """Deliver to `target` now: start its worker, or end its back-off wait."""
        if target in self._workers:
            self.wake(target)
            return
        self._wake[target] = asyncio.Event()
        self._workers[target] = asyncio.create_task(
            self._deliver(target), name=f"reports to {target}"
        )

    def wake(self, target: str) -> None:
        """Retry `target` now if reports to it are waiting out a back-off (it came up)."""
        if target in self._wake:
            self._wake[target].set()

    def forget(self, target: str) -> None:
        """Drop every report owed to `target`: its pod was deleted for good."""
        dropped = self._store.drop_reports_to(target)
        if dropped:
            log.info("dropped %d undelivered reports to deleted pod at %s", dropped, target)

    async def close(self) -> None:
        """Stop delivering; what is undelivered stays in the store for the next start."""
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    async def _deliver(self, target: str) -> None:
        failures = 0
        try:
            while batch := self._store.reports_for(target, BATCH):
                try:
                    async with await Client.connect(target, REQUEST_TIMEOUT_S) as parent:
                        for entry in batch:
                            request = {"method": "pod_event", "event": decode(entry.payload)}
                            await parent.request(request, REQUEST_TIMEOUT_S)
                            self._store.report_delivered(entry.id)
                    failures = 0
                except _DELIVERY_ERRORS as exc:
                    failures += 1
                    await self._back_off(target, failures, exc)
        finally:
            del self._workers[target]
            del self._wake[target]

    async def _back_off(self, target: str, failures: int, exc: Exception) -> None:
        wait_s = min(self._retry_cap_s, RETRY_BASE_S * 2 ** (failures - 1))
        wait_s *= random.uniform(1, 1.25)
        level = logging.WARNING if failures == 1 or failures % 10 == 0 else logging.DEBUG
        log.log(
            level,
            "cannot deliver reports to %s (%s: %s); attempt %d, retrying in %.1f s",
            target,
            type(exc).__name__,
            exc,
            failures,
            wait_s,
        )
        wake = self._wake[target]
        wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await wake.wait()
