"""Delivery of child reports to parent sockets: durable, at least once, in order per parent.

Reports wait in the store's `outbox` table until the parent acks them; the store commits
each one in the same transaction as the event that causes it. One worker task per parent
socket sends them oldest first as `pod_event` requests over a plain client connection
(the parent may live in another capd; its socket is just a path). While the socket is
absent or refusing, the worker backs off exponentially; `retry_now` cuts the wait short,
e.g. when a local parent pod comes back up. A report that reached the parent but whose ack
was lost is sent again with the same `event_id`, and the parent drops it.

In a fleet, a parent pod may run on another machine, or have moved since the report was
owed: a parent socket that cannot be reached here and that names a pod
(`…/pods/NAME.sock`) is delivered to pod NAME on whichever node of the fleet hosts it now,
over a node link (`deliver_in_fleet`), with the same acks and the same `event_id`s.

A report to a fleet parent that was deleted (on any node: its children are top-level from
then on) is dropped, as the delete dropped those owed then; a child on another node still
names the parent until it restarts.

A report the parent refuses as malformed (`invalid_request`, `unknown_method`,
`frame_too_large`) would be refused forever and block every later one, so it is logged in
full and dropped.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from capd.backoff import backoff_s
from capd.store import OutboxEntry, Store
from capd.store.batch import after_writes
from protocol.client import Client, ConnectionClosed
from protocol.errors import ProtocolError
from protocol.framing import decode

log = logging.getLogger(__name__)

BATCH = 100
REQUEST_TIMEOUT_S = 10.0
RETRY_BASE_S = 0.1
CLOSE_TIMEOUT_S = 5.0
PARENT_LINE_LIMIT = 64 * 1024
"""A parent answers a report with a hello and an ack; a socket that sends more is not
buffered (a client may name any socket as a parent)."""

REFUSED_FOR_GOOD = frozenset({"invalid_request", "unknown_method", "frame_too_large"})

FleetDelivery = Callable[[str, str, dict[str, Any]], Awaitable[None]]
"""Sends request `pod_event` to fleet pod NAME where it runs (a report of the child named
second); returns once it is acked. Raises ParentGone when NAME was deleted."""


class ParentGone(Exception):
    """The report's parent pod was deleted: its child is top-level now."""


class Outbox:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._closing = False
        self._fleet: FleetDelivery | None = None

    def deliver_in_fleet(self, deliver: FleetDelivery) -> None:
        """Deliver reports to parents this machine cannot reach through `deliver` when
        their socket names a pod of the fleet."""
        self._fleet = deliver

    def start(self) -> None:
        """Resume delivery of every report a previous run left undelivered."""
        for target in self._store.report_targets():
            self.poke(target)

    def poke(self, target: str) -> None:
        """A report to `target` was written: deliver it once it is committed (the store
        shows the outbox only committed reports), starting a worker if needed."""
        after_writes(lambda: self._wake_worker(target))

    def _wake_worker(self, target: str) -> None:
        if self._closing:
            return
        if target in self._workers:
            self.retry_now(target)
            return
        self._wake[target] = asyncio.Event()
        task = asyncio.create_task(self._deliver(target), name=f"reports to {target}")
        self._workers[target] = task
        task.add_done_callback(lambda _: self._forget_worker(target, task))

    def retry_now(self, target: str) -> None:
        """End a worker's back-off wait: `target` has just come up."""
        if target in self._wake:
            self._wake[target].set()

    async def close(self) -> None:
        """Stop delivering; what is undelivered stays in the store for the next start."""
        self._closing = True
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        if workers:
            await asyncio.wait(workers, timeout=CLOSE_TIMEOUT_S)

    def _forget_worker(self, target: str, task: "asyncio.Task[None]") -> None:
        if self._workers.get(target) is task:
            del self._workers[target]
            del self._wake[target]
        if not task.cancelled() and task.exception() is not None:
            log.error("report delivery to %s failed", target, exc_info=task.exception())

    async def _deliver(self, target: str) -> None:
        failures = 0
        while not self._closing and (batch := self._store.reports_for(target, BATCH)):
            try:
                await self._send(target, batch)
                failures = 0
            except (OSError, ConnectionClosed, TimeoutError, ProtocolError, ValueError) as exc:
                task = asyncio.current_task()
                if self._closing or (task is not None and task.cancelling()):
                    raise asyncio.CancelledError from exc
                failures += 1
                await self._back_off(target, failures, exc)
        # Gone from the workers before another callback runs: a report committed after the
        # last read is poked into a new worker, not into this one, which is ending.
        if self._workers.get(target) is asyncio.current_task():
            del self._workers[target]
            del self._wake[target]

    async def _send(self, target: str, batch: list[OutboxEntry]) -> None:
        try:
            parent = await Client.connect(target, REQUEST_TIMEOUT_S, PARENT_LINE_LIMIT)
        except OSError:
            if self._fleet is None or (pod := _pod_of(target)) is None:
                raise
            fleet = self._fleet
            await self._send_each(
                target, batch, lambda entry, request: fleet(pod, entry.pod, request)
            )
            return
        async with parent:
            await self._send_each(target, batch, lambda _, request: parent.request(request))

    async def _send_each(
        self,
        target: str,
        batch: list[OutboxEntry],
        send: Callable[[OutboxEntry, dict[str, Any]], Awaitable[Any]],
    ) -> None:
        for entry in batch:
            try:
                await send(entry, {"method": "pod_event", "event": decode(entry.payload)})
            except ParentGone as exc:  # dropped: delivered as far as the outbox goes
                log.warning("dropping a report of pod %s to %s: %s", entry.pod, target, exc)
            except ProtocolError as exc:
                if exc.code not in REFUSED_FOR_GOOD:
                    raise
                self._drop(target, entry, exc)
                if exc.code == "frame_too_large":
                    return  # the parent closed the connection; reconnect for the rest
                continue
            self._store.report_delivered(entry.id)

    def _drop(self, target: str, entry: OutboxEntry, exc: ProtocolError) -> None:
        log.error(
            "parent at %s refused a report of pod %s for good (%s: %s); dropping it: %s",
            target,
            entry.pod,
            exc.code,
            exc.message,
            entry.payload.decode(errors="replace"),
        )
        self._store.report_delivered(entry.id)

    async def _back_off(self, target: str, failures: int, exc: Exception) -> None:
        wait_s = backoff_s(failures, RETRY_BASE_S)
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


def _pod_of(target: str) -> str | None:
    """The pod a parent socket path names (`…/pods/NAME.sock`), else None."""
    path = Path(target)
    return path.stem if path.parent.name == "pods" and path.suffix == ".sock" else None
