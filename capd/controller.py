"""The pod controller: one actor per pod that owns the state machine of docs/protocol.md.

Methods arrive in a mailbox and are handled one at a time. A turn runs as a separate task
(its engine's `drive_turn`) whose completion is posted back into the same mailbox, so the actor
waits on the turn and on new methods at once: pause, cancel and notify act mid-turn.
After each message `_kick` fires what is pending (a queued run, buffered notifications)
when the pod is idle — the one place a turn starts on its own.
"""

import asyncio
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from capd.context import INTERRUPTED_TOOL_OUTPUT, Context, describe_pod_event
from capd.engines import make_engine, model_label
from capd.engines.base import PendingNote, Turn, TurnOutcome
from capd.fanout import Hub
from capd.outbox import Outbox
from capd.store import OwedReport, Store
from capd.tools.base import ToolContext
from capd.tools.toolbox import Toolbox
from protocol.errors import ProtocolError
from protocol.events import (
    AssistantMessage,
    ChildSpawned,
    DurableEvent,
    Notification,
    PermissionRequest,
    PermissionResolved,
    PodEventBase,
    PodEventReceived,
    PodStatusName,
    StatusChanged,
    ToolResult,
    TurnEnd,
    TurnResult,
    TurnStart,
    Usage,
    UserMessage,
    parse_event,
)
from protocol.framing import encode
from protocol.manifest import Manifest
from protocol.methods import Cancel, Notify, Pause, Permission, PodEvent, Request, Resume, Run
from protocol.reports import Errored, Report, ShutDown, TurnEnded, clip
from protocol.results import HistoryResult, NotifyResult, RunResult

log = logging.getLogger(__name__)

StopMode = Literal["cancel", "pause"]
"""How a stopping pod leaves its turn: `cancel` (the pod is stopped) or `pause` (the
daemon is shutting down, so the turn resumes after a restart)."""


@dataclass(frozen=True, slots=True)
class _QueuedRun:
    turn_id: str
    text: str
    pending_id: int
    """Its row in the store's `pending` table, deleted as the run's user_message commits."""


@dataclass(frozen=True, slots=True)
class _TurnDone:
    task: "asyncio.Task[TurnOutcome]"


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


_Call = Request | _Stop | _Adopt | _FromParent
_Message = tuple[_Call, "asyncio.Future[dict[str, Any]]"] | _TurnDone


def new_turn_id() -> str:
    return f"t-{secrets.token_hex(6)}"


def new_event_id(pod: str) -> str:
    return f"{pod}/{secrets.token_hex(8)}"


class PodController:
    def __init__(
        self,
        manifest: Manifest,
        *,
        parent: str | None,
        socket_path: Path,
        store: Store,
        outbox: Outbox,
        on_status: Callable[[str, PodStatusName], None],
    ) -> None:
        assert manifest.cwd is not None
        self.name = manifest.name
        self.manifest = manifest
        self.parent = parent
        self.socket_path = socket_path
        self.status: PodStatusName = "idle"
        self.turn: Turn | None = None
        self.last_seq = 0
        self.context = Context()
        self.usage = Usage()
        self.asked: dict[str, PermissionRequest] = {}
        """The engine's permission questions still waiting for an answer, by request id."""
        self.notes: list[PendingNote] = []
        self.engine = make_engine(manifest)
        self._model_label = model_label(manifest)
        self.toolbox = Toolbox.builtin(manifest.tools, ToolContext(Path(manifest.cwd), self.name))
        self.hub = Hub(self.name, lambda: self.last_seq, self._page)
        self._store = store
        self._outbox = outbox
        self._on_status = on_status
        self._seen_event_ids: set[str] = set()
        self._queue: deque[_QueuedRun] = deque()
        self._task: asyncio.Task[TurnOutcome] | None = None
        self._mailbox: asyncio.Queue[_Message] = asyncio.Queue()
        self._stopped = False
        self._unfinished: TurnOutcome | None = None
        """A finished turn whose turn_end has not committed yet."""

    # -- events -------------------------------------------------------------------------

    def emit(
        self, event: DurableEvent, *, report: Report | None = None, consumed: Sequence[int] = ()
    ) -> None:
        """Commit a durable event to the store, then apply it and broadcast it. A `report`
        for the parent is committed with it and handed to the outbox; `consumed` names the
        pending rows (queued runs, buffered notifies) the event uses up."""
        self._emit_all([event], report=report, consumed=consumed)

    def _emit_all(
        self,
        events: list[DurableEvent],
        *,
        report: Report | None = None,
        consumed: Sequence[int] = (),
    ) -> None:
        """`emit` for events that must be committed together or not at all."""
        ts = time.time()
        frames = []
        for seq, event in enumerate(events, self.last_seq + 1):
            event.pod, event.seq, event.ts = self.name, seq, ts
            frames.append(encode(event))
        owed = self._owed(report)
        stored = [(e.seq, e.ts, e.event, f[:-1]) for e, f in zip(events, frames, strict=True)]
        self._store.append(self.name, stored, owed, consumed)
        # Only a committed event takes a seq: one that cannot be encoded or stored leaves
        # no gap for subscribers to wait on.
        self.last_seq += len(events)
        if owed is not None:
            self._outbox.poke(owed.target)
        for event, frame in zip(events, frames, strict=True):
            self._track(event)
            self.hub.publish(frame, event.seq)

    def _owed(self, report: Report | None) -> OwedReport | None:
        if report is None or self.parent is None:
            return None
        return OwedReport(self.parent, encode(report)[:-1])

    def shut_down_report(self) -> OwedReport | None:
        """What a stop owes the parent; the daemon commits it as it marks the pod stopped."""
        return self._owed(ShutDown(pod=self.name, event_id=new_event_id(self.name)))

    def emit_ephemeral(self, event: PodEventBase) -> None:
        if self.hub.subscriptions:
            event.pod = self.name
            self.hub.publish(encode(event))

    def _track(self, event: DurableEvent) -> None:
        """Derived state shared by live emission and restore."""
        self.context.apply(event)
        match event:
            case AssistantMessage(text=text, interrupted=True) if self.turn:
                self.turn.partial += text
            case AssistantMessage(text=text, usage=usage):
                self.usage.input_tokens += usage.input_tokens
                self.usage.output_tokens += usage.output_tokens
                # One that says nothing (an ACP prompt's usage, reported after its last
                # step) is no step and keeps the turn's output.
                if self.turn and (text or event.tool_calls or event.thinking):
                    self.turn.steps += 1
                    self.turn.output = self.turn.partial + text
                    # A reply max_tokens cut off goes on in the next step's text.
                    self.turn.partial = self.turn.output if event.runs_on else ""
            case PodEventReceived(payload=payload) if isinstance(payload.get("event_id"), str):
                self._seen_event_ids.add(payload["event_id"])
            case PermissionRequest(request_id=request_id):
                self.asked[request_id] = event
            case PermissionResolved(request_id=request_id):
                self.asked.pop(request_id, None)
            case TurnEnd():
                self.asked.clear()

    def _page(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        return self._store.events_after(self.name, after_seq, limit)

    def _set_status(self, status: PodStatusName) -> None:
        self.emit(StatusChanged(status=status, turn_id=self.turn.turn_id if self.turn else None))
        self.status = status
        self._on_status(self.name, status)

    # -- restore ------------------------------------------------------------------------

    def restore(self, stored: Iterable[bytes]) -> None:
        """Rebuild state from stored events; a turn still open comes back paused. Queued
        runs, buffered notifications and received reports the model has not seen yet are
        pending again."""
        unseen: dict[int, PodEventReceived] = {}
        started: set[str] = set()
        for data in stored:
            event = parse_event(orjson.loads(data))
            if not isinstance(event, DurableEvent):
                continue
            self.last_seq = event.seq
            self._track(event)
            match event:
                case StatusChanged(status=status):
                    self.status = status
                case TurnStart(turn_id=turn_id, invoke=invoke):
                    self.turn = Turn(turn_id, invoke, first_message=len(self.context.messages))
                    started.add(turn_id)
                case TurnEnd():
                    self.turn = None
                case PodEventReceived(seq=seq):
                    unseen[seq] = event
                case Notification(pod_event_seq=int(seq)):
                    unseen.pop(seq, None)
        notes = [(event.ts, _report_note(event)) for event in unseen.values()]
        for row in self._store.pending(self.name):
            if row.kind == "notify":
                assert row.source is not None
                note = PendingNote("notify", row.source, row.text, pending_id=row.id)
                notes.append((row.created, note))
                continue
            assert row.turn_id is not None
            if row.turn_id in started:
                # Its turn_start commits with the row's deletion, so this is a damaged store.
                log.warning("pod %s: queued run %s already started; dropped", self.name, row.id)
                self._store.drop_pending([row.id])
            else:
                self._queue.append(_QueuedRun(row.turn_id, row.text, row.id))
        self.notes = [note for _, note in sorted(notes, key=lambda pair: pair[0])]
        for asked in list(self.asked.values()):
            # The engine that asked is gone with the capd that died; its question too.
            self.emit(PermissionResolved(turn_id=asked.turn_id, request_id=asked.request_id))
        wanted: PodStatusName = "paused" if self.turn else "idle"
        if self.status != wanted:
            self._set_status(wanted)

    # -- the actor ----------------------------------------------------------------------

    async def call(self, request: _Call) -> dict[str, Any]:
        """Hand a method to the actor and wait for its result."""
        if self._stopped:
            raise ProtocolError("shutting_down", f"pod {self.name} is stopping")
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._mailbox.put_nowait((request, fut))
        return await fut

    async def adopt(self, name: str, socket: str, turn_id: str | None) -> None:
        """Record a child spawned with this pod as its parent (`child_spawned`)."""
        await self.call(_Adopt(name, socket, turn_id))

    async def deliver(self, text: str, source: str) -> dict[str, Any]:
        """A parent's message, decided inside the actor so the status cannot change under
        it: a paused pod buffers it as a notification (a `run` would cancel the paused turn);
        otherwise it is a `run` queued behind any current turn, so the parent gets a report."""
        return await self.call(_FromParent(text, source))

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
            self._guarded(self._kick)
            while True:
                msg = await self._mailbox.get()
                if isinstance(msg, _TurnDone):
                    self._guarded(self._complete, msg.task)
                elif await self._serve(*msg):
                    return
                self._guarded(self._kick)
        finally:
            self._stopped = True
            self._refuse_pending()

    async def _serve(self, request: _Call, fut: "asyncio.Future[dict[str, Any]]") -> bool:
        """Handle one method and settle its future; True once the actor is to end."""
        if isinstance(request, _Stop):
            self._guarded(self._collect_finished_turn)
            try:
                await self._halt(request.mode)
            except Exception:
                log.exception("pod %s: stopping it failed; it is stopped anyway", self.name)
            _settle(fut, {})
            return True
        try:
            self._collect_finished_turn()
            result = await self._handle(request)
        except ProtocolError as exc:
            _settle(fut, exc)
        except (Exception, asyncio.CancelledError) as exc:
            if _being_cancelled():  # the daemon gave up waiting for this pod to stop
                _settle(fut, ProtocolError("shutting_down", f"pod {self.name} stopped"))
                raise
            log.exception("pod %s: %s failed", self.name, type(request).__name__)
            _settle(fut, _internal(self.name, exc))
        else:
            _settle(fut, result)
        return False

    def _guarded(self, step: Callable[..., None], *args: Any) -> None:
        """Run an actor step no caller waits on; an unexpected failure is logged, not fatal."""
        try:
            step(*args)
        except (Exception, asyncio.CancelledError):
            if _being_cancelled():
                raise
            log.exception("pod %s: %s failed", self.name, step.__name__.lstrip("_"))

    async def _handle(self, request: _Call) -> dict[str, Any]:
        match request:
            case _Adopt(name=name, socket=socket, turn_id=turn_id):
                self.emit(ChildSpawned(name=name, socket=socket, turn_id=turn_id))
                return {}
            case _FromParent(text=text, source=source) if self.status == "paused":
                return self._notify(text, source)
            case _FromParent(text=text):
                return await self._run(Run(text=text, if_busy="queue"))
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
            case PodEvent(event=payload):
                return self._pod_event(payload)
            case Permission(request_id=request_id, option_id=option_id):
                self.engine.answer_permission(request_id, option_id)
                return {}
        raise ProtocolError("invalid_request", f"{request!r} is not a pod actor call")

    # -- methods ------------------------------------------------------------------------

    async def _run(self, req: Run) -> dict[str, Any]:
        if self.status == "running":
            assert self.turn is not None
            if req.if_busy == "reject":
                raise ProtocolError(
                    "already_running",
                    f"pod {self.name} is running turn {self.turn.turn_id}; "
                    "send with if_busy 'queue' or 'interrupt'",
                )
            if req.if_busy == "queue":
                turn_id = new_turn_id()
                row = self._store.add_pending(self.name, "run", req.text, turn_id=turn_id)
                queued = _QueuedRun(turn_id, req.text, row)
                self._queue.append(queued)
                return RunResult(turn_id=queued.turn_id, queued=True).model_dump()
        if self.status != "idle":
            await self._end_turn("cancelled")
        turn = Turn(new_turn_id(), "run")
        self._start(turn, req.text)
        return RunResult(turn_id=turn.turn_id).model_dump()

    async def _pause(self) -> dict[str, Any]:
        if self.status == "idle":
            raise ProtocolError("not_running", f"pod {self.name} is idle; nothing to pause")
        if self.status == "running":
            await self._interrupt()
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
        if self.status == "idle":
            raise ProtocolError("not_running", f"pod {self.name} is idle; nothing to cancel")
        dropped = [queued.pending_id for queued in self._queue] if clear_queue else []
        if clear_queue:
            self._queue.clear()
        # The queued runs leave the store with the turn_end: a crash before it keeps them.
        await self._end_turn("cancelled", consumed=dropped)
        return {"cleared": len(dropped)}

    def _notify(self, text: str, source: str) -> dict[str, Any]:
        row = self._store.add_pending(self.name, "notify", text, source=source)
        return self._buffer(PendingNote("notify", source, text, pending_id=row))

    def _buffer(self, note: PendingNote) -> dict[str, Any]:
        self.notes.append(note)
        turn_id = self.turn.turn_id if self.turn else None
        return NotifyResult(buffered=len(self.notes), turn_id=turn_id).model_dump()

    def _pod_event(self, payload: dict[str, Any]) -> dict[str, Any]:
        event_id = payload.get("event_id")
        if isinstance(event_id, str) and event_id in self._seen_event_ids:
            return {"duplicate": True}
        received = PodEventReceived(payload=payload)
        self.emit(received)
        return self._buffer(_report_note(received))

    # -- turns --------------------------------------------------------------------------

    def _kick(self) -> None:
        """Finish a turn whose turn_end could not be committed before; then, when idle,
        start what is pending: a queued run first, then buffered notes."""
        if self._stopped:
            return
        if self._unfinished is not None and self.status == "running" and self._task is None:
            self._finish(self._unfinished.result, self._unfinished.error)
        if self.status != "idle":
            return
        if self._queue:
            queued = self._queue[0]
            self._start(Turn(queued.turn_id, "run"), queued.text, queued.pending_id)
        elif self.notes:
            self._start(Turn(new_turn_id(), self.notes[0].kind), None)

    def _start(self, turn: Turn, text: str | None, pending_id: int | None = None) -> None:
        """Start a turn from idle. Its status, turn_start and user_message commit together
        with the deletion of its queued-run row, so a crash never leaves a started turn
        without its prompt, nor a queued run that both started and is still queued."""
        turn.first_message = len(self.context.messages)
        events: list[DurableEvent] = [
            StatusChanged(status="running", turn_id=turn.turn_id),
            TurnStart(turn_id=turn.turn_id, invoke=turn.invoke),
        ]
        if text is not None:
            events.append(UserMessage(turn_id=turn.turn_id, text=text))
        self._emit_all(events, consumed=[pending_id] if pending_id is not None else [])
        if pending_id is not None:
            self._queue.popleft()  # the queued run _kick started, used up with the commit
        self.turn = turn
        self.status = "running"
        self._on_status(self.name, "running")
        self._launch()

    def _launch(self) -> None:
        assert self.turn is not None
        turn = self.engine.drive_turn(self, self.turn)
        task = asyncio.create_task(turn, name=f"turn {self.name}")
        task.add_done_callback(lambda t: self._mailbox.put_nowait(_TurnDone(t)))
        self._task = task

    def _collect_finished_turn(self) -> None:
        """A turn that ended while its _TurnDone waits in the mailbox ends now, so the
        method being handled sees the pod as it really is."""
        if self._task is not None and self._task.done():
            self._complete(self._task)

    def _complete(self, task: "asyncio.Task[TurnOutcome]") -> None:
        if task is not self._task:
            return
        self._task = None
        output = self.turn.output if self.turn else ""
        if task.cancelled():
            log.error("the turn task of pod %s was cancelled from outside", self.name)
            outcome = TurnOutcome("errored", output, "internal error: the turn was cancelled")
        elif exc := task.exception():
            log.error("turn of pod %s failed", self.name, exc_info=exc)
            outcome = TurnOutcome("errored", output, f"internal error: {type(exc).__name__}: {exc}")
        else:
            outcome = task.result()
        # Kept until its turn_end commits: a failed commit is tried again at the next _kick.
        self._unfinished = outcome
        self._finish(outcome.result, outcome.error)

    async def _interrupt(self) -> None:
        """Cancel the running turn task and wait until it has let go of what it held."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()

    async def _end_turn(
        self, result: TurnResult, error: str | None = None, consumed: Sequence[int] = ()
    ) -> None:
        await self._interrupt()
        self._finish(result, error, consumed)

    def _finish(self, result: TurnResult, error: str | None, consumed: Sequence[int] = ()) -> None:
        turn = self.turn
        assert turn is not None
        self._close_orphans()
        self.emit(
            TurnEnd(turn_id=turn.turn_id, result=result, output=turn.output, error=error),
            report=self._turn_report(turn, result, error),
            consumed=consumed,
        )
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

    async def _halt(self, mode: StopMode) -> None:
        try:
            if self.status == "running" and mode == "pause":
                await self._interrupt()
                self._set_status("paused")
            elif self.status != "idle" and mode == "cancel":
                await self._end_turn("cancelled")
        finally:
            # Also when stopping the turn failed, or took so long the daemon cancelled it.
            self.hub.close_all()
            await self.engine.aclose()

    async def abandon(self) -> None:
        """Let go of what the pod holds after its actor was cancelled mid-method (it would
        not stop): its subscriptions and its engine."""
        self.hub.close_all()
        await self.engine.aclose()
        await self.toolbox.aclose()

    def _refuse_pending(self) -> None:
        while not self._mailbox.empty():
            msg = self._mailbox.get_nowait()
            if isinstance(msg, _TurnDone):
                continue
            request, fut = msg
            stopped = ProtocolError("shutting_down", f"pod {self.name} stopped")
            _settle(fut, {} if isinstance(request, _Stop) else stopped)

    # -- queries ------------------------------------------------------------------------

    def history(self, after_seq: int, limit: int) -> HistoryResult:
        events = [orjson.loads(data) for _, data in self._page(after_seq, limit)]
        return HistoryResult(events=events, last_seq=self.last_seq)

    def status_result(self, children: list[str]) -> dict[str, Any]:
        """The `status` ack's result, a `protocol.results.PodStatus` built as a plain dict:
        `status` is the request a client polls, and the model cost half its time."""
        return {
            "name": self.name,
            "status": self.status,
            "turn_id": self.turn.turn_id if self.turn else None,
            "queued": len(self._queue),
            "last_seq": self.last_seq,
            "parent": self.parent,
            "children": children,
            "model": self._model_label,
            "cwd": str(self.toolbox.context.cwd),
            "tools": list(self.manifest.tools),
            "usage": {
                "input_tokens": self.usage.input_tokens,
                "output_tokens": self.usage.output_tokens,
            },
            "socket": str(self.socket_path),
            "permissions": [
                {
                    "request_id": asked.request_id,
                    "turn_id": asked.turn_id,
                    "tool_call": asked.tool_call,
                    "options": asked.options,
                }
                for asked in self.asked.values()
            ],
        }


def _being_cancelled() -> bool:
    """Whether the running task itself is being cancelled (not just an awaited thing)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _settle(fut: "asyncio.Future[dict[str, Any]]", outcome: dict[str, Any] | Exception) -> None:
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


def _report_note(received: PodEventReceived) -> PendingNote:
    payload = received.payload
    source = f"pod {payload['pod']}" if isinstance(payload.get("pod"), str) else "pod_event"
    return PendingNote("pod_event", source, describe_pod_event(payload), received.seq)
