"""The pod controller: one actor per pod that owns the state machine of docs/protocol.md.

Methods arrive in a mailbox and are handled one at a time. A turn runs as a separate task
(its engine's `drive_turn`) whose completion is posted back into the same mailbox, so the actor
waits on the turn and on new methods at once: pause, cancel and notify act mid-turn.
After each message `_kick` fires what is pending (a queued run, buffered notifications)
when the pod is idle — the one place a turn starts on its own.

Every turn ends in `_record_turn_end` (turn_end, the parent's report, idle). A task that
returned gets there through `_end_done_turn`; a `run` over a busy pod, `cancel` and a
stop through `_cancel_turn`. `_stop_turn_task` only stops the task: a pause leaves the
turn open. Durable events, and the state derived from them, are the `Journal`'s.
"""

import asyncio
import contextlib
import contextvars
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias

import orjson

from capd import metrics, tracing
from capd.activity import WATCHED_EPHEMERAL, Activity
from capd.budgets import Ledger
from capd.checkpoints import CheckpointError, CheckpointStore, Taken
from capd.context import INTERRUPTED_TOOL_OUTPUT, Context
from capd.engines import model_label
from capd.engines.base import (
    BudgetSpent,
    CompactOrder,
    Engine,
    PendingNote,
    Turn,
    TurnOutcome,
    cannot_compact,
)
from capd.fanout import Hub
from capd.journal import Journal, QueuedRun, new_event_id, report_note
from capd.outbox import Outbox
from capd.permissions import Grants
from capd.prices import add_usage
from capd.proc.sandbox import status as sandbox_status
from capd.reconfigure import Parts
from capd.store import Store
from capd.store.batch import StoreFailed
from capd.tools.toolbox import Toolbox
from capd.window import context_window
from protocol.errors import ProtocolError
from protocol.events import (
    AssistantMessage,
    BudgetExhausted,
    CheckpointSkipped,
    CheckpointTaken,
    ChildSpawned,
    CompactionSkipped,
    ContextCompacted,
    DurableEvent,
    Notification,
    PodEventBase,
    PodEventReceived,
    PodStatusName,
    Reconfigured,
    Rewound,
    StatusChanged,
    ToolResult,
    TurnEnd,
    TurnResult,
    TurnStart,
    UserMessage,
)
from protocol.manifest import Budget, Manifest
from protocol.methods import (
    Cancel,
    Compact,
    Notify,
    Pause,
    Permission,
    PodEvent,
    Reconfigure,
    Request,
    Resume,
    Rewind,
    Run,
    SetBudget,
)
from protocol.reports import Errored, Report, TurnEnded, clip
from protocol.results import ReconfigureResult, RunResult

log = logging.getLogger(__name__)

StopMode = Literal["cancel", "pause"]
"""How a stopping pod leaves its turn: `cancel` (the pod is stopped) or `pause` (the
daemon is shutting down, so the turn resumes after a restart)."""


@dataclass(frozen=True, slots=True)
class _TurnDone:
    task: "asyncio.Task[TurnOutcome]"


@dataclass(frozen=True, slots=True)
class _CompactionDone:
    task: "asyncio.Task[None]"


@dataclass(frozen=True, slots=True)
class _BudgetPause:
    """An external engine's step spent the budget: pause the turn as `pause` does, if
    the budget is still spent when the actor gets to it."""

    task: "asyncio.Task[TurnOutcome]"


@dataclass(frozen=True, slots=True)
class _Reap:
    """Stop the engine's process if the pod is idle: the idle timer of `epoch` fired
    (stale when the epoch moved on), or capd.engines.slots asks, for `answer`."""

    reason: Literal["idle", "limit"]
    epoch: int | None = None
    answer: "asyncio.Future[bool] | None" = None


@dataclass(frozen=True, slots=True)
class _Stop:
    mode: StopMode


@dataclass(frozen=True, slots=True)
class _Adopt:
    """Record a new child (`child_spawned`), made by `turn_id` if a spawn_pod call made it."""

    name: str
    socket: str
    turn_id: str | None


@dataclass(frozen=True, slots=True)
class _FromParent:
    """A message from the parent's send_to_pod; see `PodController.deliver`."""

    text: str
    source: str
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class _TakeManifest:
    """`apply`'s new manifest: taken now when the pod is idle or paused (`reconfigure`),
    kept in `pending_manifest` while a turn or a compaction runs."""

    manifest: Manifest


_Call = Request | _Stop | _Adopt | _FromParent | _TakeManifest


class _Reply(Protocol):
    """Where a method's outcome goes: an asyncio future, or a connection's `Answer`."""

    def done(self) -> bool: ...

    def set_result(self, result: dict[str, Any], /) -> None: ...

    def set_exception(self, exc: BaseException, /) -> None: ...


_Message = tuple[_Call, _Reply] | _TurnDone | _CompactionDone | _BudgetPause | _Reap


Reconfigurer: TypeAlias = "Callable[[PodController, Manifest], Awaitable[list[str]]]"
"""Gives the pod a new manifest, returning the fields it changed (`Supervisor.reconfigure`)."""


_NO_MESSAGES: deque[Any] = deque(maxlen=0)
"""Every new Mailbox's items: shared, and it stays empty (maxlen 0)."""


class Mailbox:
    """The actor's messages, oldest first: a deque and, while the actor waits on an empty
    one, a future to wake it. What an asyncio.Queue does for one consumer, in a fraction of
    its memory (an idle pod keeps one) and time (a burst of requests goes through it). The
    deque is made by the first message: a pod never sent one (most of 10,000 idle pods)
    saves its 760 bytes."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[_Message] = _NO_MESSAGES
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, msg: _Message) -> None:
        if self._items is _NO_MESSAGES:
            self._items = deque()
        self._items.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> _Message:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def popleft(self) -> _Message:
        return self._items.popleft()

    def take_reports(self) -> list[tuple[PodEvent, _Reply]]:
        """The `pod_event` methods at the head, taken: a burst of reports is served as one."""
        items = self._items
        taken: list[tuple[PodEvent, _Reply]] = []
        while items and isinstance(head := items[0], tuple) and isinstance(head[0], PodEvent):
            taken.append((head[0], head[1]))
            items.popleft()
        return taken

    def empty(self) -> bool:
        return not self._items


def new_turn_id() -> str:
    return f"t-{secrets.token_hex(6)}"


class PodController:
    """One pod's actor: its turns, its queue and its journal. Slotted: 10,000 idle pods keep
    one each, and an attribute dict would cost about 1.5 KB of each."""

    __slots__ = (
        "_checkpoints",
        "_compaction",
        "_compaction_waiters",
        "_fixed_status",
        "_ledger",
        "_mailbox",
        "_make_dirs",
        "_model_label",
        "_on_status",
        "_queue",
        "_reap_epoch",
        "_reap_reason",
        "_reap_timer",
        "_reaped",
        "_reconfigure_with",
        "_running_in_tree",
        "_span",
        "_status_json",
        "_stopped",
        "_store",
        "_task",
        "_unfinished",
        "_workspace",
        "activity",
        "compact_wanted",
        "draining",
        "engine",
        "journal",
        "manifest",
        "name",
        "notes",
        "parent",
        "pending_manifest",
        "socket_path",
        "status",
        "take_pending",
        "team",
        "toolbox",
        "turn",
    )

    def __init__(
        self,
        manifest: Manifest,
        *,
        engine: Engine,
        toolbox: Toolbox,
        parent: str | None,
        socket_path: Path,
        store: Store,
        outbox: Outbox,
        ledger: Ledger,
        on_status: Callable[[str, PodStatusName], None],
        reconfigure: "Reconfigurer",
        checkpoints: CheckpointStore | None = None,
        running_in_tree: Callable[[], list[str]] = list,
        make_dirs: Callable[[str, Path], None] = lambda name, cwd: None,
        workspace: Callable[[], dict[str, Any] | None] = lambda: None,
        team: str | None = None,
    ) -> None:
        self.name = manifest.name
        self.team = team
        self.manifest = manifest
        self.parent = parent
        self.socket_path = socket_path
        self.status: PodStatusName = "idle"
        self.turn: Turn | None = None
        self.notes: list[PendingNote] = []
        self.engine = engine
        self.toolbox = toolbox
        self.journal = Journal(self.name, parent, store, outbox)
        self.activity = Activity(self.name, external=manifest.engine.kind != "builtin")
        self._model_label = model_label(manifest)
        self._fixed_status: tuple[Manifest, Toolbox, dict[str, Any]] | None = None
        self._status_json: tuple[tuple[object, ...], bytes] | None = None
        self._store = store
        self._make_dirs = make_dirs
        """Makes the pod's state dir and own work dir (made when first needed) if gone."""
        self._ledger = ledger
        self._on_status = on_status
        self._checkpoints = checkpoints
        self._running_in_tree = running_in_tree
        """The other pods with a turn running in, inside or around its cwd: they may be
        writing in it."""
        self._reconfigure_with = reconfigure
        self._workspace = workspace
        """`status.workspace`: the pod's work tree, if it has one (capd/pod_worktrees.py)."""
        self._queue: list[QueuedRun] = []
        """Runs waiting for the pod to be idle: a few at most, and an empty list is an eighth of
        an empty deque's memory."""
        self._task: asyncio.Task[TurnOutcome] | None = None
        self._mailbox = Mailbox()
        self._stopped = False
        self._unfinished: TurnOutcome | None = None
        """A finished turn whose turn_end has not committed yet."""
        self.compact_wanted: CompactOrder | None = None
        self._compaction: asyncio.Task[None] | None = None
        """A compaction between turns or while paused; a turn waits for it to launch."""
        self._compaction_waiters: list[_Reply] = []
        """The `compact` requests answered when it ends."""
        self._span: Any = None
        """The turn's `invoke_agent` span of its running (or last) segment; tracing only."""
        self.draining = False
        """Its team is going down (`down`): no turn starts on its own; a `run` is queued when
        it asks to be, else refused."""
        self.pending_manifest: Manifest | None = None
        """A manifest `apply` gave while a turn ran, taken when the pod is idle again."""
        self.take_pending: Reconfigurer | None = None
        """Takes `pending_manifest` (capd.teams); never raises."""
        self._reap_timer: asyncio.TimerHandle | None = None
        """The idle timer of the engine's process (`_arm_reap`)."""
        self._reap_epoch = 0
        """Bumped whenever the timer is armed or disarmed: an older timer's `_Reap` is stale."""
        self._reap_reason: Literal["idle", "limit"] = "idle"
        """What the armed timer is for: `limit` fires at once."""
        self._reaped = 0
        """Times the engine's process was stopped, idle or for the process limit
        (`status.engine.reaped`)."""

    # -- the journal, as the engines and endpoints see it -------------------------------

    @property
    def context(self) -> Context:
        return self.journal.context

    @property
    def last_seq(self) -> int:
        return self.journal.last_seq

    @property
    def hub(self) -> Hub:
        return self.journal.hub

    @property
    def grants(self) -> Grants:
        return self.journal.grants

    def emit(
        self, event: DurableEvent, *, report: Report | None = None, consumed: Sequence[int] = ()
    ) -> None:
        """Commit a durable event of the current turn (see `Journal.emit`), counting the
        usage it records in the ledger."""
        before = self.journal.usage  # replaced, never changed, by an event that counts
        self.journal.emit(event, self.turn, report=report, consumed=consumed)
        self.activity.see(event)
        if self.journal.usage is not before:
            self._ledger.spend(self.name, before, self.journal.usage)
        if isinstance(event, AssistantMessage) and not self.engine.checks_budget:
            self._pause_if_spent()

    def check_budget(self) -> None:
        self._ledger.check(self.name)

    def _pause_if_spent(self) -> None:
        """After an external engine's step: once a budget is spent, ask the actor to pause
        the turn (this runs in the turn task, which must not change the actor's state)."""
        task = self._task
        if self.status != "running" or task is None or task.done():
            return
        try:
            self._ledger.check(self.name)
        except BudgetSpent:
            self._mailbox.put_nowait(_BudgetPause(task))

    def emit_ephemeral(self, event: PodEventBase) -> None:
        if type(event) in WATCHED_EPHEMERAL:  # a text delta costs this `if` alone
            self.activity.see(event)
        self.journal.emit_ephemeral(event)

    def inject_notes(self, turn_id: str) -> None:
        """Move the buffered notes into the context, oldest first, each committed as a
        `notification` event of the turn with the deletion of its pending row."""
        while self.notes:
            note = self.notes.pop(0)
            self.emit(
                Notification(
                    turn_id=turn_id,
                    source=note.source,
                    text=note.text,
                    pod_event_seq=note.pod_event_seq,
                ),
                consumed=[note.pending_id] if note.pending_id is not None else [],
            )

    def commit_compaction(self, event: ContextCompacted) -> None:
        """Commit a compaction, its `usage` (the summary calls') made the pod's totals and
        `restore_from` set to the first seq a restart must read: the first message kept,
        the open turn's start, a report the model has not read, the engine's session."""
        starts = [event.through_seq + 1]
        if self.turn is not None:
            starts.append(self.turn.started_seq)
        starts += [n.pod_event_seq for n in self.notes if n.pod_event_seq is not None]
        if self.context.engine_session_seq:
            starts.append(self.context.engine_session_seq)
        event.restore_from = min(starts)
        event.usage = add_usage(event.usage, self.journal.usage)
        self.emit(event)

    def _set_status(self, status: PodStatusName) -> None:
        if status == "paused" and self._span is not None:
            self._end_span(None, None)
        self.emit(StatusChanged(status=status, turn_id=self.turn.turn_id if self.turn else None))
        self.status = status
        self._on_status(self.name, status)

    # -- restore ------------------------------------------------------------------------

    def restore(self, stored: Iterable[bytes]) -> None:
        """Rebuild state from stored events; a turn still open comes back paused."""
        found = self.journal.restore(stored)
        self.status, self.turn = found.status, found.turn
        self._queue.extend(found.queue)
        self.notes = found.notes
        wanted: PodStatusName = "paused" if self.turn else "idle"
        if self.status != wanted:
            self._set_status(wanted)

    # -- the actor ----------------------------------------------------------------------

    async def call(self, request: _Call) -> dict[str, Any]:
        """Hand a method to the actor and wait for its result."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.submit(request, fut)
        return await fut

    def submit(self, request: _Call, reply: _Reply) -> None:
        """Hand a method to the actor, behind those handed before; its outcome goes to
        `reply` (a connection's answer, so the connection need not wait for it)."""
        if self._stopped:
            raise ProtocolError("shutting_down", f"pod {self.name} is stopping")
        self._mailbox.put_nowait((request, reply))

    async def adopt(self, name: str, socket: str, turn_id: str | None) -> None:
        """Record a child spawned with this pod as its parent (`child_spawned`)."""
        await self.call(_Adopt(name, socket, turn_id))

    async def deliver(
        self, text: str, source: str, traceparent: str | None = None
    ) -> dict[str, Any]:
        """A parent's message, decided inside the actor so the status cannot change under
        it: a paused pod buffers it as a notification (a `run` would cancel the paused turn);
        otherwise it is a `run` queued behind any current turn, so the parent gets a report."""
        return await self.call(_FromParent(text, source, traceparent))

    async def stop(self, mode: StopMode) -> None:
        """End the actor after the messages already queued; see StopMode."""
        if self._stopped:
            return
        self._stopped = True
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._mailbox.put_nowait((_Stop(mode), fut))
        await fut

    async def run(self) -> None:
        """Serve the mailbox until stopped. A method that fails unexpectedly fails alone (its
        caller gets `internal`, the log the traceback) and the actor goes on; if the actor
        ends anyway, what waits in its mailbox is refused rather than left hanging."""
        try:
            await self._take_pending()
            self._guarded(self._kick)
            while True:
                msg = await self._mailbox.get()
                if isinstance(msg, tuple):  # a method, the most common message
                    request, fut = msg
                    if isinstance(request, PodEvent):  # reports come in bursts
                        self._serve_reports([(request, fut), *self._mailbox.take_reports()])
                    elif await self._serve(request, fut):
                        return
                elif isinstance(msg, _TurnDone):
                    self._guarded(self._end_done_turn, msg.task)
                elif isinstance(msg, _CompactionDone):
                    self._guarded(self._end_compaction, msg.task)
                elif isinstance(msg, _BudgetPause):
                    try:
                        await self._pause_for_budget(msg)
                    except Exception:
                        log.exception("pod %s: pausing on a spent budget failed", self.name)
                else:
                    await self._reap(msg)
                await self._take_pending()
                self._guarded(self._kick)
                if self._mailbox.empty():  # the timer is for the pod at rest
                    self._guarded(self._arm_reap)
        finally:
            self._stopped = True
            self._refuse_pending()

    async def _serve(self, request: _Call, fut: _Reply) -> bool:
        """Handle one method and settle its future; True once the actor is to end."""
        if isinstance(request, _Stop):
            self._guarded(self._end_turn_if_done)
            try:
                await self._wind_down(request.mode)
            except Exception:
                log.exception("pod %s: stopping it failed; it is stopped anyway", self.name)
            _settle(fut, {})
            return True
        try:
            self._end_turn_if_done()
            if isinstance(request, Compact):
                self._compact(request, fut)
                return False
            result = await self._handle(request)
        except ProtocolError as exc:
            _settle(fut, exc)
        except (Exception, asyncio.CancelledError) as exc:
            if _being_cancelled():  # the supervisor gave up waiting for this pod to stop
                _settle(fut, ProtocolError("shutting_down", f"pod {self.name} stopped"))
                raise
            log.exception("pod %s: %s failed", self.name, type(request).__name__)
            _settle(fut, _internal(self.name, exc))
        else:
            _settle(fut, result)
        return False

    def _serve_reports(self, calls: list[tuple[PodEvent, _Reply]]) -> None:
        """`pod_event` methods in a row, served as one (`_pod_events`), each answered as
        if served alone. When that fails before anything was stored, each is served alone
        then, so what failed fails alone."""
        stored = self.last_seq
        try:
            self._end_turn_if_done()
            stored = self.last_seq
            results = self._pod_events([request.event for request, _ in calls])
        except Exception as exc:
            if len(calls) > 1 and self.last_seq == stored:
                for call in calls:
                    self._serve_reports([call])
                return
            log.exception("pod %s: PodEvent failed", self.name)
            for _, fut in calls:
                _settle(fut, _internal(self.name, exc))
            return
        for (_, fut), result in zip(calls, results, strict=True):
            _settle(fut, result)

    async def reap_engine(self, reason: Literal["idle", "limit"]) -> bool:
        """Ask the actor to stop the engine's process if the pod is idle (see `_reap`)."""
        if self._stopped:
            return False
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._mailbox.put_nowait(_Reap(reason, answer=answer))
        return await answer

    def _idle(self) -> bool:
        """Idle with nothing about to start: no queued run, no buffered note, no
        compaction, no open question."""
        return (
            self.status == "idle"
            and self._task is None
            and not self._queue
            and not self.notes
            and self._compaction is None
            and self.compact_wanted is None
            and not self.journal.asked
            and not self._stopped
        )

    def _arm_reap(self) -> None:
        """After each message: the idle timer runs while the pod is idle and its engine
        holds a process (at once when that process is one too many); else it is off."""
        reason: Literal["idle", "limit"] = "idle"
        delay = self.manifest.limits.engine_idle_s
        if self.engine.crowded():
            reason, delay = "limit", 0.0
        off = delay is None or not self._idle() or not self.engine.holds_process()
        # An idle timer gives way to the limit's: the process became one too many.
        if self._reap_timer is not None and (off or reason != self._reap_reason):
            self._reap_timer.cancel()
            self._reap_timer = None
            self._reap_epoch += 1
        if off or self._reap_timer is not None:
            return
        self._reap_epoch += 1
        self._reap_reason = reason
        message = _Reap(reason, self._reap_epoch)
        loop = asyncio.get_running_loop()
        self._reap_timer = loop.call_later(delay, self._mailbox.put_nowait, message)

    async def _reap(self, msg: _Reap) -> None:
        """Stop the engine's process if the pod is still idle: the timer's message when
        it is not stale (for the limit, while the process is still one too many), the
        slots' request while the asker still waits; the asker hears whether it did."""
        if msg.epoch is not None:
            if msg.epoch != self._reap_epoch:
                return
            self._reap_timer = None
        stopped = False
        wanted = msg.answer is None or not msg.answer.done()
        if msg.epoch is not None and msg.reason == "limit":
            wanted = self.engine.crowded()
        if wanted and self._idle() and self.engine.holds_process():
            try:
                stopped = await self.engine.release()
            except Exception:
                log.exception("pod %s: stopping its idle engine failed", self.name)
        if stopped:
            self._reaped += 1
            metrics.engine_stopped(msg.reason)
            self.activity.on_change(self.name)
            log.info("pod %s: engine process stopped (%s)", self.name, msg.reason)
        if msg.answer is not None and not msg.answer.done():
            msg.answer.set_result(stopped)

    def engine_status(self) -> dict[str, Any] | None:
        """`status.engine`: the engine's process, and how often `_reap` stopped it."""
        state = self.engine.engine_state()
        return None if state is None else {**state, "reaped": self._reaped}

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        """Run an actor step no caller waits on; an unexpected failure is logged, not fatal."""
        try:
            step(*args)
        except Exception:
            log.exception("pod %s: %s failed", self.name, step.__name__.lstrip("_"))

    async def _handle(self, request: _Call) -> dict[str, Any]:
        match request:
            case _Adopt(name=name, socket=socket, turn_id=turn_id):
                self.emit(ChildSpawned(name=name, socket=socket, turn_id=turn_id))
                return {}
            case _FromParent(text=text, source=source) if self.status == "paused":
                return self._notify(text, source)
            case _FromParent(text=text, traceparent=traceparent):
                return await self._run(Run(text=text, if_busy="queue", traceparent=traceparent))
            case Run():
                return await self._run(request)
            case Pause():
                return await self._pause()
            case Resume():
                return self._resume()
            case Cancel(all=clear_queue):
                return await self._cancel(clear_queue)
            case Notify(text=text, source=source):
                return self._notify(text, source or "notify")
            case Permission(request_id=request_id, option_id=option_id):
                self.engine.answer_permission(request_id, option_id)
                return {}
            case SetBudget():
                return self._set_budget(request)
            case Rewind():
                return await self._rewind(request)
            case Reconfigure(manifest=manifest):
                return await self._reconfigure(manifest)
            case _TakeManifest(manifest=manifest) if (
                self.status == "running" or self._compaction is not None
            ):
                self.pending_manifest = manifest
                return {"deferred": True}
            case _TakeManifest(manifest=manifest):
                self.pending_manifest = None
                return {"deferred": False, **await self._reconfigure(manifest)}
        raise ProtocolError("invalid_request", f"{request!r} is not a pod actor call")

    # -- methods ------------------------------------------------------------------------

    async def _run(self, req: Run) -> dict[str, Any]:
        if self.draining and req.if_busy != "queue":
            raise ProtocolError(
                "shutting_down",
                f"pod {self.name}'s team is going down (capctl down); send once it is "
                "started again, or queue it (if_busy 'queue')",
            )
        if self.status == "running" or self.draining:  # draining: queued, started later
            if req.if_busy == "reject":
                assert self.turn is not None
                raise ProtocolError(
                    "already_running",
                    f"pod {self.name} is running turn {self.turn.turn_id}; "
                    "send with if_busy 'queue' or 'interrupt'",
                )
            if req.if_busy == "queue":
                turn_id = new_turn_id()
                row = self._store.add_pending(
                    self.name, "run", req.text, turn_id=turn_id, source=req.traceparent
                )
                queued = QueuedRun(turn_id, req.text, row, req.traceparent)
                self._queue.append(queued)
                return RunResult(turn_id=queued.turn_id, queued=True).model_dump()
        if self.status != "idle":
            await self._cancel_turn()
        turn = Turn(new_turn_id(), "run", traceparent=req.traceparent)
        self._start(turn, req.text)
        return RunResult(turn_id=turn.turn_id).model_dump()

    async def _pause(self) -> dict[str, Any]:
        if self.status == "idle" and self._compaction is None:
            raise ProtocolError("not_running", f"pod {self.name} is idle; nothing to pause")
        await self._stop_compaction()
        if self.status == "running":
            await self._stop_turn_task()
            self._set_status("paused")
        return {}

    def _resume(self) -> dict[str, Any]:
        if self.status != "paused":
            raise ProtocolError("not_paused", f"pod {self.name} is {self.status}, not paused")
        assert self.turn is not None
        self._set_status("running")
        self._close_orphans()
        self._launch()
        return {}

    async def _cancel(self, clear_queue: bool) -> dict[str, Any]:
        if self.status == "idle" and self._compaction is None:
            raise ProtocolError("not_running", f"pod {self.name} is idle; nothing to cancel")
        await self._stop_compaction()
        if self.status == "idle":
            return {"cleared": 0}
        dropped = [queued.pending_id for queued in self._queue] if clear_queue else []
        if clear_queue:
            self._queue.clear()
        # The queued runs leave the store with the turn_end: a crash before it keeps them.
        await self._cancel_turn(consumed=dropped)
        return {"cleared": len(dropped)}

    def _compact(self, request: Compact, reply: _Reply) -> None:
        """Compact at the running turn's next step boundary (answered at once), or now in a
        task of its own, answered when it ends; a turn that starts meanwhile waits for it."""
        if not self.engine.can_compact:
            raise cannot_compact(self.manifest.engine.kind)
        order = CompactOrder("request", request.instructions)
        if self.status == "running" and self._compaction is None:
            self.compact_wanted = order
            _settle(reply, {})
            return
        self._compaction_waiters.append(reply)
        if self._compaction is None:
            self.compact_wanted = None  # this compaction is the one a running turn was asked for
            self._start_compaction(order)

    def _set_budget(self, request: SetBudget) -> dict[str, Any]:
        """Replace the fields the request names; null removes that limit."""
        given = request.model_dump(include={"tokens", "usd"} & request.model_fields_set)
        budget = (self.manifest.budget or Budget()).model_copy(update=given)
        self._ledger.set_budget(self.name, budget)
        self.manifest = self.manifest.model_copy(
            update={"budget": None if budget == Budget() else budget}
        )
        return {"budget": self._ledger.budget(self.name)}  # a SetBudgetResult

    async def _rewind(self, request: Rewind) -> dict[str, Any]:
        """Take the context (and with `files` the cwd) back to just before a turn started.
        What can refuse is checked first. Then a compaction between turns is stopped and
        the engine's session left behind (an external engine stops, so nothing it runs
        writes during the restore), the files are restored, a paused turn ends
        `cancelled` and `rewound` commits. A restore that fails changes nothing else: the
        session left behind only in memory is resumed by the next turn."""
        if self.status == "running":
            assert self.turn is not None
            raise ProtocolError(
                "already_running",
                f"pod {self.name} is running turn {self.turn.turn_id}; pause or cancel it "
                "before rewinding",
            )
        to_seq = self._store.turn_start_seq(self.name, request.turn_id)
        if to_seq is None:
            raise ProtocolError(
                "not_found",
                f"pod {self.name} has no turn {request.turn_id}; `capctl log {self.name}` "
                "shows its turns",
            )
        if request.files:
            self._check_files_restorable(request.turn_id)
        await self._stop_compaction()
        new_session = await self.engine.forget_session(self)
        if request.files:
            await self._restore_files(request.turn_id)
        if self.status == "paused":
            await self._cancel_turn()
        self.emit(
            Rewound(
                to_turn_id=request.turn_id,
                files_restored=request.files,
                to_seq=to_seq,
                new_session=new_session,
            )
        )
        return {}

    async def _reconfigure(self, manifest: Manifest) -> dict[str, Any]:
        """Take a new manifest when idle or paused (a paused turn resumes under it); not
        while a compaction runs, with the engine it would replace."""
        if self.status == "running" or self._compaction is not None:
            running = self.status == "running" and self.turn is not None
            doing = f"running turn {self.turn.turn_id}" if running else "compacting"
            raise ProtocolError(
                "already_running",
                f"pod {self.name} is {doing}; reconfigure it when idle or paused "
                f"(capctl pause {self.name})",
            )
        changed = await self._reconfigure_with(self, manifest)
        return ReconfigureResult(changed=changed).model_dump()

    async def take_manifest(self, manifest: Manifest) -> dict[str, Any]:
        """`apply`'s change: a ReconfigureResult with `deferred: false`, or `deferred:
        true` when a turn runs (taken when it ends, before a queued run starts)."""
        return await self.call(_TakeManifest(manifest))

    async def _take_pending(self) -> None:
        """Take the manifest deferred while a turn ran, once the pod is idle."""
        manifest = self.pending_manifest
        if manifest is None or self.status != "idle" or self._compaction is not None:
            return
        self.pending_manifest = None
        if self.take_pending is not None and not self._stopped:
            await self.take_pending(self, manifest)

    def commit_manifest(self, manifest: Manifest, changed: list[str]) -> None:
        """Commit the pod's new manifest with its `reconfigured` event (a `permissions`
        change drops the `allow_always` grants, which name rules by index). A change
        `apply` deferred is dropped, as the commit drops it from the store: this is newer."""
        self.journal.emit_all(
            [Reconfigured(changed=changed)], self.turn, manifest=manifest.model_dump_json()
        )
        self.pending_manifest = None

    def use_parts(self, manifest: Manifest, parts: Parts) -> Parts:
        """Run under `manifest` with `parts` from now on; returns the parts let go of, for
        the caller to close. The system prompt, the limits and all else read from the
        manifest apply from the next model call."""
        old = Parts(self.engine, self.toolbox, self._checkpoints)
        self.manifest = manifest
        self.engine = parts.engine
        self.toolbox = parts.toolbox
        self._checkpoints = parts.checkpoints
        self._model_label = model_label(manifest)
        self._fixed_status = self._status_json = None  # they hold the old parts
        return old

    async def _restore_files(self, turn_id: str) -> None:
        """Restore the cwd from the turn's checkpoint. Shielded: a stop that gives up on
        the pod meanwhile leaves the restore to finish rather than half done."""
        assert self._checkpoints is not None
        restoring = asyncio.ensure_future(self._checkpoints.restore(turn_id))
        try:
            await asyncio.shield(restoring)
        except CheckpointError as exc:
            raise ProtocolError(
                "internal", f"pod {self.name}: restoring the files failed: {exc}"
            ) from None

    def _check_files_restorable(self, turn_id: str) -> None:
        if self._checkpoints is None:
            raise ProtocolError(
                "invalid_request",
                f"pod {self.name} keeps no checkpoints of its files (workspace.checkpoints "
                "is off, or none of its tools can change files); rewind without --files",
            )
        if not self._checkpoints.has(turn_id):
            raise ProtocolError(
                "invalid_request",
                f"turn {turn_id} of pod {self.name} has no checkpoint of its files (its "
                "checkpoint_skipped event in `capctl log` says why); rewind without --files",
            )
        if busy := self._running_in_tree():
            pods = f"pods {', '.join(busy)} are" if len(busy) > 1 else f"pod {busy[0]} is"
            raise ProtocolError(
                "invalid_request",
                f"{pods} running in the files of pod {self.name} (the same cwd, inside or "
                "around it); pause before rewinding its files",
            )

    def _notify(self, text: str, source: str) -> dict[str, Any]:
        row = self._store.add_pending(self.name, "notify", text, source=source)
        return self._buffer(PendingNote("notify", source, text, pending_id=row))

    def _buffer(self, note: PendingNote) -> dict[str, Any]:
        self.notes.append(note)
        turn_id = self.turn.turn_id if self.turn else None
        # A `NotifyResult` as a plain dict: each pod_event in a burst is answered so.
        return {"buffered": len(self.notes), "turn_id": turn_id}

    def _pod_events(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Reports received: each new one a `pod_event_received`, all of them committed
        together, and a note buffered for the model; one whose `event_id` came before,
        earlier among them too, is a duplicate and changes nothing."""
        journal, ids = self.journal, set()
        each: list[PodEventReceived | None] = []
        for payload in payloads:
            event_id = payload.get("event_id")
            if isinstance(event_id, str):
                if event_id in ids or journal.is_duplicate(event_id):
                    each.append(None)
                    continue
                ids.add(event_id)
            each.append(PodEventReceived(payload=payload))
        received: list[DurableEvent] = [event for event in each if event is not None]
        if received:
            journal.emit_all(received, self.turn)
            self.activity.see(received[0])
        return [
            {"duplicate": True} if event is None else self._buffer(report_note(event))
            for event in each
        ]

    # -- turns --------------------------------------------------------------------------

    def _kick(self) -> None:
        """Finish a turn whose turn_end could not be committed before; then, when idle,
        start what is pending: a compaction asked for while the turn ran and not made at
        a step boundary, a queued run, buffered notes."""
        if self._stopped:
            return
        if self._unfinished is not None and self.status == "running" and self._task is None:
            self._record_turn_end(self._unfinished.result, self._unfinished.error)
        if self.status != "idle" or self.draining:
            return
        if self.compact_wanted is not None and self._compaction is None:
            order, self.compact_wanted = self.compact_wanted, None
            self._start_compaction(order)
        if self._queue:
            queued = self._queue[0]
            turn = Turn(queued.turn_id, "run", traceparent=queued.traceparent)
            self._start(turn, queued.text, queued.pending_id)
        elif self.notes:
            self._start(Turn(new_turn_id(), self.notes[0].kind), None)

    def _start(self, turn: Turn, text: str | None, pending_id: int | None = None) -> None:
        """Start a turn from idle. Its status, turn_start and user_message commit together
        with the deletion of its queued-run row, so a crash never leaves a started turn
        without its prompt, nor a queued run that both started and is still queued."""
        start = TurnStart(turn_id=turn.turn_id, invoke=turn.invoke, traceparent=turn.traceparent)
        events: list[DurableEvent] = [StatusChanged(status="running", turn_id=turn.turn_id), start]
        if text is not None:
            events.append(UserMessage(turn_id=turn.turn_id, text=text))
        self.journal.emit_all(events, turn, consumed=[pending_id] if pending_id is not None else [])
        for event in events:
            self.activity.see(event)
        if pending_id is not None:
            self._queue.pop(0)  # the queued run _kick started, used up with the commit
        turn.started_seq = start.seq
        self.turn = turn
        self.status = "running"
        self._on_status(self.name, "running")
        self._launch()

    def _launch(self) -> None:
        """Start the turn task, unless a compaction runs: its end launches the turn."""
        assert self.turn is not None
        if self._compaction is not None:
            return
        ctx = None if tracing.TRACER is None else self._start_span()
        task = asyncio.create_task(self._drive(self.turn), name=f"turn {self.name}", context=ctx)
        task.add_done_callback(lambda t: self._mailbox.put_nowait(_TurnDone(t)))
        self._task = task

    def _start_span(self) -> contextvars.Context:
        """Open the `invoke_agent` span of the turn's running segment, linked to the
        segment before it; the turn task runs in the context it returns."""
        assert tracing.TRACER is not None
        assert self.turn is not None
        self._span, ctx = tracing.TRACER.start_turn(self.manifest, self.turn, self._span)
        return ctx

    def _end_span(self, result: TurnResult | None, error: str | None) -> None:
        """End the running segment's span: with the turn's result, or (None) paused."""
        if tracing.TRACER is not None:
            assert self.turn is not None
            tracing.TRACER.end_turn(self.manifest, self.turn, self._span, result, error)
        if result is not None:
            self._span = None

    async def _drive(self, turn: Turn) -> TurnOutcome:
        """The turn task: the pod's directories made if they are not there yet, the cwd's
        checkpoint (once per turn; one a pause cut short is taken when the turn resumes),
        then the engine's turn."""
        try:
            self._make_dirs(self.name, self.toolbox.context.cwd)
        except OSError as exc:
            self.inject_notes(turn.turn_id)  # read, as a failed engine start reads them
            error = f"cannot make the directories of pod {self.name}: {exc}"
            return TurnOutcome("errored", turn.output, error)
        if self._checkpoints is not None and not turn.checkpointed:
            taken = await self._checkpoints.take(turn.turn_id)
            if isinstance(taken, Taken):
                self.emit(
                    CheckpointTaken(
                        turn_id=turn.turn_id,
                        changed=taken.changed,
                        duration_ms=taken.duration_ms,
                        left_out=taken.left_out,
                    )
                )
            else:
                self.emit(CheckpointSkipped(turn_id=turn.turn_id, reason=taken.reason))
        return await self.engine.drive_turn(self, turn)

    def _end_turn_if_done(self) -> None:
        """A turn whose task ended while its _TurnDone waits in the mailbox ends now, so
        the method being handled sees the pod as it really is."""
        if self._task is not None and self._task.done():
            self._end_done_turn(self._task)

    def _end_done_turn(self, task: "asyncio.Task[TurnOutcome]") -> None:
        """End the turn whose task returned by itself, with the outcome it returned (a
        task that raised ends it `errored`). A task already collected or stopped is old
        news and ignored."""
        if task is not self._task:
            return
        self._task = None
        output = self.turn.output if self.turn else ""
        if task.cancelled():
            log.error("the turn task of pod %s was cancelled from outside", self.name)
            outcome = TurnOutcome("errored", output, "internal error: the turn was cancelled")
        elif isinstance(spent := task.exception(), BudgetSpent):
            self._record_budget_pause(spent)
            return
        elif exc := task.exception():
            log.error("turn of pod %s failed", self.name, exc_info=exc)
            outcome = TurnOutcome("errored", output, f"internal error: {type(exc).__name__}: {exc}")
        else:
            outcome = task.result()
        # Kept until its turn_end commits: a failed commit is tried again at the next _kick.
        self._unfinished = outcome
        self._record_turn_end(outcome.result, outcome.error)

    async def _pause_for_budget(self, pause: _BudgetPause) -> None:
        """Pause the external engine's turn whose step spent the budget, unless the turn
        has moved on (paused, cancelled, ended) since, or a `set_budget` served meanwhile
        made room again."""
        if pause.task is not self._task or pause.task.done() or self.status != "running":
            return
        try:
            self._ledger.check(self.name)
        except BudgetSpent as spent:
            await self._stop_turn_task()
            self._record_budget_pause(spent)

    def _record_budget_pause(self, spent: BudgetSpent) -> None:
        """The turn stops at a step boundary with its budget spent: `budget_exhausted`,
        then paused; the turn stays open for `set_budget` and `resume`."""
        assert self.turn is not None
        self.emit(
            BudgetExhausted(
                turn_id=self.turn.turn_id, scope=spent.scope, used=spent.used, budget=spent.budget
            )
        )
        self._set_status("paused")

    def _start_compaction(self, order: CompactOrder) -> None:
        # An external engine compacts in its process, in the cwd; when the directories
        # cannot be made, that process fails to start and says so.
        with contextlib.suppress(OSError):
            self._make_dirs(self.name, self.toolbox.context.cwd)
        task = asyncio.create_task(self.engine.compact(self, order), name=f"compact {self.name}")
        task.add_done_callback(lambda t: self._mailbox.put_nowait(_CompactionDone(t)))
        self._compaction = task

    def _end_compaction(self, task: "asyncio.Task[None]") -> None:
        """Answer the `compact` requests waiting on the compaction that ended, and launch
        the turn that waited for it. One already stopped was answered then."""
        if task is not self._compaction:
            return
        self._compaction = None
        cancelled = f"the compaction of pod {self.name} was cancelled from outside"
        self._answer_compaction(self._outcome(task, ProtocolError("internal", cancelled)))
        if self.status == "running" and self._task is None and self.turn is not None:
            self._launch()

    async def _stop_compaction(self) -> None:
        """Stop a compaction in its task (a pause, cancel or stop): the context stays as
        it was, and the requests waiting on it hear why."""
        task, self._compaction = self._compaction, None
        if task is None:
            return
        stopped = ProtocolError(
            "invalid_request",
            f"pod {self.name}: the compaction was stopped by a pause, cancel or stop; "
            "the context is as it was",
        )
        try:
            await _cancel_and_wait(task)
        finally:
            # Also when this actor is cancelled meanwhile. One that ended by itself before
            # the cancel reached it was made (or failed), and answers so.
            self._answer_compaction(self._outcome(task, stopped))

    def _outcome(
        self, task: "asyncio.Task[None]", cancelled: ProtocolError
    ) -> dict[str, Any] | Exception:
        """What a finished compaction task answers its `compact` requests."""
        if not task.done() or task.cancelled():
            return cancelled
        exc = task.exception()
        if exc is None:
            return {}
        if isinstance(exc, ProtocolError):
            return exc
        log.error("compaction of pod %s failed", self.name, exc_info=exc)
        return _internal(self.name, exc)

    def _answer_compaction(self, outcome: dict[str, Any] | Exception) -> None:
        """Answer the `compact` requests waiting; a compaction not made is also told to
        the subscribers, for a request that came while a turn ran and waits for no ack."""
        waiters, self._compaction_waiters = self._compaction_waiters, []
        for reply in waiters:
            _settle(reply, outcome)
        if isinstance(outcome, Exception):
            self.emit_ephemeral(CompactionSkipped(trigger="request", reason=str(outcome)))

    async def _stop_turn_task(self) -> None:
        """Cancel the running turn task and wait until it has let go of what it held. The
        turn stays open: the caller pauses it or records its end."""
        task, self._task = self._task, None
        if task is not None:
            await _cancel_and_wait(task)

    async def _cancel_turn(self, consumed: Sequence[int] = ()) -> None:
        """Stop the turn's task if it runs, and end the turn `cancelled`, with the
        compaction asked for while it ran."""
        await self._stop_turn_task()
        if self.compact_wanted is not None:
            self.compact_wanted = None
            turn_id = self.turn.turn_id if self.turn else None
            reason = "the turn was cancelled before it compacted"
            self.emit_ephemeral(
                CompactionSkipped(turn_id=turn_id, trigger="request", reason=reason)
            )
        self._record_turn_end("cancelled", None, consumed)

    def _record_turn_end(
        self, result: TurnResult, error: str | None, consumed: Sequence[int] = ()
    ) -> None:
        """Commit the turn's turn_end (with the parent's report) and go idle; its task is
        gone already. Every turn ends here."""
        turn = self.turn
        assert turn is not None
        self._close_orphans()
        self._end_span(result, error)
        self.emit(
            TurnEnd(turn_id=turn.turn_id, result=result, output=turn.output, error=error),
            report=self._turn_report(turn, result, error),
            consumed=consumed,
        )
        metrics.turn_ended(self.name, result)
        self._unfinished = None
        self.turn = None
        self._set_status("idle")

    def _turn_report(self, turn: Turn, result: TurnResult, error: str | None) -> Report | None:
        """The parent hears about turns a `run` started, not those its own reports kicked."""
        if self.parent is None or turn.invoke != "run":
            return None
        event_id = new_event_id(self.name)
        if result == "errored":
            message, _ = clip(error or "the turn errored")
            return Errored(pod=self.name, event_id=event_id, turn_id=turn.turn_id, message=message)
        output, truncated = clip(turn.output)
        return TurnEnded(
            pod=self.name,
            event_id=event_id,
            turn_id=turn.turn_id,
            result=result,
            output=output,
            truncated=truncated,
        )

    def _close_orphans(self) -> None:
        assert self.turn is not None
        for call in self.context.orphaned_calls():
            self.emit(
                ToolResult(
                    turn_id=self.turn.turn_id,
                    call_id=call.id,
                    name=call.name,
                    output=INTERRUPTED_TOOL_OUTPUT,
                    is_error=True,
                )
            )

    async def _wind_down(self, mode: StopMode) -> None:
        """The actor's last step: leave the turn as `mode` says, end the subscriptions,
        close the engine and the tools."""
        try:
            if self.status == "running" and mode == "pause":
                await self._stop_turn_task()
                self._set_status("paused")
            elif self.status != "idle" and mode == "cancel":
                await self._cancel_turn()
        finally:
            # Also when stopping the turn failed, or took so long the supervisor cancelled it.
            await self.abandon()

    async def abandon(self) -> None:
        """Let go of what the pod holds: its subscriptions, its engine and its tools. Also
        after its actor was cancelled mid-method, when it would not stop."""
        if self._reap_timer is not None:
            self._reap_timer.cancel()
            self._reap_timer = None
        await self._stop_compaction()
        with contextlib.suppress(StoreFailed):
            await self._store.flush()  # the stop's last events reach the subscribers
        self.hub.close_all()
        await self.engine.aclose()
        await self.toolbox.aclose()

    def _refuse_pending(self) -> None:
        while not self._mailbox.empty():
            msg = self._mailbox.popleft()
            if isinstance(msg, _Reap):
                if msg.answer is not None and not msg.answer.done():
                    msg.answer.set_result(False)
                continue
            if isinstance(msg, _TurnDone | _CompactionDone | _BudgetPause):
                continue
            request, fut = msg
            stopped = ProtocolError("shutting_down", f"pod {self.name} stopped")
            _settle(fut, {} if isinstance(request, _Stop) else stopped)

    # -- queries ------------------------------------------------------------------------

    def _context_window(self) -> int | None:
        """The manifest's window, the one an overflow named, or a known model's; an
        external engine's model is its own business, so only an overflow tells it."""
        model = self.manifest.model
        configured, name = (model.context_window, model.name) if model else (None, "")
        return context_window(configured, self.context.learned_window, name)

    def status_json(self, children: list[str], node: str) -> bytes:
        """`status_result`, with `node`, as JSON: made again only once something it shows
        may have changed (`_status_key`), as `status` is what clients poll."""
        key = self._status_key(children, node)
        cached = self._status_json
        if cached is None or cached[0] != key:
            result = self.status_result(children)
            result["node"] = node
            cached = self._status_json = (key, orjson.dumps(result))
        return cached[1]

    def _status_key(self, children: list[str], node: str) -> tuple[object, ...]:
        """What `status_result` is made of, each part as cheaply as it can be read: the
        journal's last seq for all the journal derives (usage, context, questions, the
        status and the turn, each change an event); the manifest and the pod's parts by
        identity (replaced, never changed in place); the ledger by its version; by value
        what changes outside the actor (a work tree's sync, an engine's process, MCP
        servers and the tools they list, when the pod has any)."""
        engine, toolbox = self.engine, self.toolbox
        servers = toolbox.has_mcp_servers  # else both of theirs are fixed
        return (
            self.journal.last_seq,
            self.status,
            self.turn.turn_id if self.turn else None,
            len(self._queue),
            self.parent,
            self.team,
            self.manifest,
            toolbox,
            engine,
            self._reaped,
            children,
            self._ledger.version,
            self._workspace(),
            engine.engine_state(),
            engine.mcp_status(),
            servers and toolbox.mcp_status(),
            servers and toolbox.spec_tokens,
            node,
        )

    def status_result(self, children: list[str]) -> dict[str, Any]:
        """The `status` ack's result, a `protocol.results.PodStatus` built as a plain dict:
        `status` is the request a client polls, and the model cost half its time. What
        only the manifest and the pod's parts decide is made once for them (`_fixed`)."""
        fixed = self._fixed()
        return {
            "name": self.name,
            "status": self.status,
            "turn_id": self.turn.turn_id if self.turn else None,
            "queued": len(self._queue),
            "last_seq": self.last_seq,
            "parent": self.parent,
            "children": children,
            "model": self._model_label,
            "cwd": fixed["cwd"],
            "workspace": self._workspace(),
            "tools": fixed["tools"],
            "usage": {
                "input_tokens": self.journal.usage.input_tokens,
                "output_tokens": self.journal.usage.output_tokens,
                "cost_usd": self.journal.usage.cost_usd,
            },
            "context": {
                "tokens": self.context.tokens(
                    self.manifest.system_prompt, self.toolbox.spec_tokens
                ),
                "window": self._context_window(),
            },
            "socket": fixed["socket"],
            "engine": self.engine_status(),
            "permissions": [
                {
                    "request_id": asked.request_id,
                    "turn_id": asked.turn_id,
                    "tool_call": asked.tool_call,
                    "options": asked.options,
                }
                for asked in self.journal.asked.values()
            ],
            "budget": self._ledger.budget(self.name),
            "spent": self._ledger.spent(self.name),
            "mcp": self.toolbox.mcp_status() + self.engine.mcp_status(),
            "sandbox": fixed["sandbox"],
            "team": self.team,
        }

    def _fixed(self) -> dict[str, Any]:
        """The parts of `status` the manifest and the pod's parts decide, made again once
        either is replaced (`use_parts`, a budget set): neither changes in place."""
        cached = self._fixed_status
        if cached is not None and cached[0] is self.manifest and cached[1] is self.toolbox:
            return cached[2]
        context = self.toolbox.context
        fixed = {
            "cwd": str(context.cwd),
            "tools": list(self.manifest.tools),
            "socket": str(self.socket_path),
            "sandbox": {
                **sandbox_status(self.manifest.sandbox, context.sandbox),
                "limits": context.limits.kind if context.limits else "none",
            },
        }
        self._fixed_status = (self.manifest, self.toolbox, fixed)
        return fixed


async def _cancel_and_wait(task: "asyncio.Task[Any]") -> None:
    """Cancel `task` and wait until it has let go of what it held; what it raised
    instead of stopping is the caller's to ignore."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (not just an awaited thing)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _settle(fut: _Reply, outcome: dict[str, Any] | Exception) -> None:
    if fut.done():
        return
    if isinstance(outcome, Exception):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


def _internal(pod: str, exc: Exception) -> ProtocolError:
    return ProtocolError(
        "internal",
        f"pod {pod} failed on this request ({type(exc).__name__}: {exc}); "
        "it goes on serving, capd's log has the details",
    )
