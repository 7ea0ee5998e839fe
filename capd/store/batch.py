"""Group commit: the writes of one turn of the event loop commit together.

A store's write method calls `GroupCommit.write()` first. The first write of a turn opens a
batch (the backend's `begin`) and schedules its commit with `loop.call_soon`, which runs
after every task already ready in this turn (asyncio and uvloop alike), so all the writes
those tasks make join the one transaction. The commit (the backend's `commit`) may finish at
once (SQLite) or return an awaitable finished elsewhere (PostgreSQL, on its own thread); one
commit is in flight at a time, and writes made meanwhile gather in the next batch, which
commits as soon as the one in flight has. `after_commit` callbacks run once their batch is
committed, in the order given, batch after batch: what a client is sent (acks, broadcasts,
outbox pokes) goes there, so no client hears of a write a crash could take back.

A failed commit leaves capd's memory ahead of its store (seqs assigned, state derived), and
nothing of the batch has been sent to anyone: capd stops at once (`on_failure`, by default
one critical log line and exit status `EXIT_STORE_FAILED`), and a restart restores what
committed. Outside a running loop (start-up code, a unit test without a loop) there is no
turn to end: `write()` says so and the backend commits the write at once.
"""

import asyncio
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)

_PENDING: list["GroupCommit"] = []
"""The stores of this process with a write waiting for its commit (a daemon has one)."""
_FAILED: list["GroupCommit"] = []
"""The stores of this process whose commit failed: nothing waits on writes any more."""

EXIT_STORE_FAILED = 75
"""capd's exit status when a commit failed (EX_TEMPFAIL: a restart may well succeed)."""


class BatchBroken(Exception):
    """The backend lost the open batch's writes (e.g. SQLite rolled it back on a full
    disk): as fatal as a failed commit."""


class StoreFailed(Exception):
    """A commit failed: the store takes no more writes and capd is stopping."""


class Backend(Protocol):
    """The transaction primitives a store gives its `GroupCommit`."""

    def begin(self) -> None:
        """Open a transaction; the writes that follow join it until `commit`."""
        ...

    def commit(self) -> Awaitable[None] | None:
        """Commit the open transaction: None when it is committed on return, else an
        awaitable that completes (or raises) once it is. Never called while an earlier
        commit's awaitable is pending."""
        ...


def writes_pending() -> bool:
    """Whether a write of this process waits for its commit."""
    return bool(_PENDING)


def after_writes(callback: Callable[[], None]) -> None:
    """Run `callback` once every write made so far, by any store of this process, is
    committed: how a reply, or a daemon event, waits for the writes made before it without
    knowing the store. At once when no write waits."""
    if _FAILED:
        return  # what waited may depend on lost writes: it never runs
    if not _PENDING:
        callback()
    elif len(_PENDING) == 1:
        _PENDING[0].after_commit(callback)
    else:
        _after_each(list(_PENDING), callback)


def _after_each(stores: list["GroupCommit"], callback: Callable[[], None]) -> None:
    if not stores:
        callback()
    else:
        stores[0].after_commit(lambda: _after_each(stores[1:], callback))


def stop_capd(exc: BaseException) -> None:
    """The default `on_failure`: say why, flush the log and exit at once. A graceful
    shutdown would write (stops, status events) and send (queued replies) on top of a store
    that lost writes; a process exit is the crash capd already recovers from."""
    log.critical("store commit failed, capd stops (restart restores what committed): %r", exc)
    logging.shutdown()
    os._exit(EXIT_STORE_FAILED)


class GroupCommit:
    def __init__(
        self, backend: Backend, on_failure: Callable[[BaseException], None] = stop_capd
    ) -> None:
        self._backend = backend
        self._on_failure = on_failure
        self._open: list[Callable[[], None]] | None = None
        """The callbacks of the open batch; None while no batch is open."""
        self._in_flight: list[Callable[[], None]] | None = None
        """The callbacks of the batch being committed; None while no commit is in flight."""
        self._running: deque[Callable[[], None]] = deque()
        """Callbacks of the committed batch not run yet (one may add to them)."""
        self._scheduled = False
        self._flushing: list[asyncio.Future[None]] = []
        """What `flush` calls wait on: failed too, should the commit fail."""
        self.failed: BaseException | None = None
        self.commits = 0
        """Batches committed so far (tests and benchmarks count them)."""

    @property
    def pending(self) -> bool:
        """Whether a write waits for its commit (a batch open or in flight)."""
        return self._open is not None or self._in_flight is not None

    def write(self) -> bool:
        """Call before each write: True when the write joins a batch (open now if none
        is), False when no loop runs, so the backend must commit the write itself."""
        if self.failed is not None:
            raise StoreFailed("the store failed a commit; capd is stopping") from self.failed
        if self._open is not None:
            return True
        loop = asyncio._get_running_loop()
        if loop is None:
            return False
        self._backend.begin()
        self._open = []
        if self not in _PENDING:
            _PENDING.append(self)
        if self._in_flight is None:
            self._schedule(loop)
        return True

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once every write made so far is committed: at once when none
        waits, else after its batch commits, in the order callbacks were given. Never
        once a commit failed."""
        if self.failed is not None:
            return
        if self._open is not None:
            self._open.append(callback)
        elif self._in_flight is not None:
            self._in_flight.append(callback)
        elif self._running:
            self._running.append(callback)
        else:
            callback()

    async def flush(self) -> None:
        """Commit the open batch now; return once it and every batch before it are
        committed and their callbacks have run."""
        if self.failed is not None:
            raise StoreFailed("the store failed a commit") from self.failed
        if not self.pending:
            return
        done = asyncio.get_running_loop().create_future()
        self._flushing.append(done)
        self.after_commit(lambda: done.done() or done.set_result(None))
        if self._in_flight is None:
            self._commit_open()
        try:
            await done
        finally:
            self._flushing.remove(done)

    def commit_now(self) -> None:
        """Commit the open batch without a loop (closing the store after the loop ended);
        the backend's commit must then finish on return."""
        if self._open is not None and self._in_flight is None:
            self._commit_open()

    def close(self) -> None:
        """The store closes: commit what is open (unless a commit failed, or the backend
        could not), and leave the process's stores (a test goes on after a failed one)."""
        if self.failed is None:
            self.commit_now()
        for stores in (_PENDING, _FAILED):
            if self in stores:
                stores.remove(self)

    def broken(self, exc: BaseException) -> None:
        """The backend lost the open batch: stop as for a failed commit."""
        self._fail(exc)

    # -- the commit ---------------------------------------------------------------------

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._scheduled = False
        if self._in_flight is None:
            self._commit_open()

    def _commit_open(self) -> None:
        batch = self._open
        if batch is None:
            return
        self._open = None
        self._in_flight = batch
        try:
            pending = self._backend.commit()
        except BaseException as exc:
            self._fail(exc)
            return
        if pending is None:
            self._committed()
        else:
            asyncio.ensure_future(pending).add_done_callback(self._commit_done)

    def _commit_done(self, fut: "asyncio.Future[None]") -> None:
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is not None:
            self._fail(exc)
        else:
            self._committed()

    def _committed(self) -> None:
        self.commits += 1
        batch, self._in_flight = self._in_flight, None
        assert batch is not None
        running = self._running
        nested = bool(running)
        running.extend(batch)
        if nested:
            return  # the loop below, further up the stack, runs them
        while running:
            callback = running.popleft()
            try:
                callback()
            except Exception:
                log.exception("a callback after a commit failed")
        if self.failed is not None:
            return  # a callback's write or read broke the next batch: `_fail` cleaned up
        if self._open is None:
            _PENDING.remove(self)
        elif self._in_flight is None:
            # Writes made while the commit was in flight, or by the callbacks.
            loop = asyncio._get_running_loop()
            if loop is None:
                self._commit_open()
            else:
                self._schedule(loop)

    def _fail(self, exc: BaseException) -> None:
        self.failed = exc
        _FAILED.append(self)
        self._open = self._in_flight = None
        self._running.clear()
        if self in _PENDING:
            _PENDING.remove(self)
        for waiter in self._flushing:
            if not waiter.done():
                waiter.set_exception(StoreFailed("the store failed a commit"))
        self._on_failure(exc)
