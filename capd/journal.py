"""A pod's journal: its durable events, committed, applied and broadcast, the reports it
owes its parent, and the state the events imply, rebuilt at restore.

Every durable event goes through `emit_all`: it is written to the store (with the
parent report it owes and the pending rows it uses up), only then takes its seq and is
applied to the derived state (`_track`); it is offered to subscribers, and its report to
the outbox, once its batch commits (capd.store.batch). Ephemeral events wait behind the
durable ones written before them, so a subscriber sees them in the order they were made.
Subscribers and readers are told the committed seq (`committed_seq`), never one a crash
could take back. `restore` runs the same `_track` over the stored events, so a restarted
pod derives exactly what it had.
"""

import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from capd.context import Context
from capd.engines.base import PendingNote, Turn
from capd.fanout import Hub
from capd.outbox import Outbox
from capd.permissions import Grants
from capd.prices import add_usage
from capd.store import OwedReport, Store
from protocol.events import (
    AssistantMessage,
    CheckpointSkipped,
    CheckpointTaken,
    ContextCompacted,
    DurableEvent,
    Notification,
    PermissionRequest,
    PermissionResolved,
    PodEventBase,
    PodEventReceived,
    PodStatusName,
    Reconfigured,
    Rewound,
    StatusChanged,
    TurnEnd,
    TurnStart,
    Usage,
    parse_event,
)
from protocol.framing import encode
from protocol.methods import RequestId
from protocol.reports import Report, ShutDown

log = logging.getLogger(__name__)

REPLAY_PAGE = 1000
"""Stored events read at a time to rebuild a context a `rewound` goes back to."""
DELTA_EVENTS = frozenset({"text_delta", "thinking_delta", "tool_call_delta"})
"""What a `subscribe {deltas: false}` leaves out."""


def new_event_id(pod: str) -> str:
    return f"{pod}/{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class QueuedRun:
    turn_id: str
    text: str
    pending_id: int
    """Its row in the store's `pending` table, deleted as the run's user_message commits."""
    traceparent: str | None = None
    """The `run`'s `traceparent`, kept in the row's `source` (unused by queued runs)."""


@dataclass
class Restored:
    """What restore found of the state machine: the last status, the turn still open,
    and the work pending (queued runs, and notes the model has not read yet)."""

    status: PodStatusName = "idle"
    turn: Turn | None = None
    queue: list[QueuedRun] = field(default_factory=list)
    notes: list[PendingNote] = field(default_factory=list)


class Journal:
    def __init__(self, name: str, parent: str | None, store: Store, outbox: Outbox) -> None:
        self.name = name
        self.parent = parent
        self.last_seq = 0
        """The last seq given to an event: the next one takes the one after."""
        self.committed_seq = 0
        """The last seq committed, and so offered to subscribers: history, replay and
        `subscribe` acks go no further."""
        self.context = Context()
        self.usage = Usage()
        """The pod's usage totals: replaced, never changed in place, by each event that
        counts, so a caller can tell whether an event counted (`PodController.emit`)."""
        self.asked: dict[str, PermissionRequest] = {}
        """The engine's permission questions still waiting for an answer, by request id."""
        self.grants = Grants()
        """What `allow_always` answers granted, as their `permission_resolved` events say."""
        self.hub = Hub(name, lambda: self.committed_seq, self.page, waits_for_writes=False)
        self._store = store
        self._outbox = outbox
        self._received: dict[str, int] = {}
        """The ids of reports received since the events a restart reads begin, each with
        its `pod_event_received`'s seq; older ones are in the store."""
        self._stored_ids: set[str] | None = None
        """The ids the store keeps (`Store.received_ids`), read at the first report."""

    # -- emitting -----------------------------------------------------------------------

    def emit(
        self,
        event: DurableEvent,
        turn: Turn | None,
        *,
        report: Report | None = None,
        consumed: Sequence[int] = (),
    ) -> None:
        """Commit a durable event of `turn` (the pod's current turn) to the store, then
        apply it and broadcast it. A `report` for the parent is committed with it and
        handed to the outbox; `consumed` names the pending rows (queued runs, buffered
        notifies) the event uses up."""
        self.emit_all([event], turn, report=report, consumed=consumed)

    def emit_all(
        self,
        events: list[DurableEvent],
        turn: Turn | None,
        *,
        report: Report | None = None,
        consumed: Sequence[int] = (),
        manifest: str | None = None,
    ) -> None:
        """`emit` for events that must be committed together or not at all; `manifest`,
        the pod's new one, commits with them."""
        ts = time.time()
        frames = []
        for seq, event in enumerate(events, self.last_seq + 1):
            # Straight into the fields, past pydantic's setattr (validate_assignment is off:
            # only its bookkeeping is skipped, a third of an event's encoding time).
            event.__dict__.update(pod=self.name, seq=seq, ts=ts)
            frames.append(encode(event))
        owed = self._owed(report)
        stored = [(e.seq, e.ts, e.event, f[:-1]) for e, f in zip(events, frames, strict=True)]
        kept = self._kept_ids(events)
        self._store.append(self.name, stored, owed, consumed, kept, manifest)
        # Only a stored event takes a seq: one that cannot be encoded or stored leaves
        # no gap for subscribers to wait on.
        self.last_seq += len(events)
        for event_id in kept:
            del self._received[event_id]
        if kept and self._stored_ids is not None:
            self._stored_ids.update(kept)
        for event in events:
            self._track(event, turn)
        target, last = None if owed is None else owed.target, self.last_seq
        self._store.after_commit(lambda: self._committed(frames, last, target))

    def _committed(self, frames: list[bytes], last_seq: int, target: str | None) -> None:
        """Events up to `last_seq` committed: offer them, and deliver their report."""
        self.committed_seq = last_seq
        if target is not None:
            self._outbox.poke(target)
        publish = self.hub.publish
        for seq, frame in enumerate(frames, last_seq - len(frames) + 1):
            publish(frame, seq)

    def emit_ephemeral(self, event: PodEventBase) -> None:
        if self.hub.subscriptions:
            event.pod = self.name
            frame, delta = encode(event), event.event in DELTA_EVENTS
            self._store.after_commit(lambda: self.hub.publish(frame, None, delta))

    def _owed(self, report: Report | None) -> OwedReport | None:
        if report is None or self.parent is None:
            return None
        return OwedReport(self.parent, encode(report)[:-1])

    def shut_down_report(self) -> OwedReport | None:
        """What a stop owes the parent; the supervisor commits it as it marks the pod stopped."""
        return self._owed(ShutDown(pod=self.name, event_id=new_event_id(self.name)))

    def is_duplicate(self, event_id: object) -> bool:
        """Whether a pod_event with this event_id was received already: since the events a
        restart reads begin (`_received`), or before (the store's, read once)."""
        if not isinstance(event_id, str):
            return False
        if event_id in self._received:
            return True
        if self._stored_ids is None:
            self._stored_ids = self._store.received_ids(self.name)
        return event_id in self._stored_ids

    def _kept_ids(self, events: list[DurableEvent]) -> list[str]:
        """The received report ids a compaction among `events` puts before the events a
        restart reads: the store keeps them from then on, committed with it."""
        for event in events:
            if isinstance(event, ContextCompacted):
                start = event.restore_from
                return [event_id for event_id, seq in self._received.items() if seq < start]
        return []

    def _track(self, event: DurableEvent, turn: Turn | None) -> None:
        """Derived state shared by live emission and restore."""
        self.context.apply(event)
        match event:
            case AssistantMessage(text=text, interrupted=True, usage=usage) if turn:
                # What a provider reported for a call a pause cut short was spent: it
                # counts, as `Store.usage_totals` counts it after a restart.
                self.usage = add_usage(self.usage, usage)
                turn.partial += text
            case AssistantMessage(text=text, usage=usage):
                self.usage = add_usage(self.usage, usage)
                # One that says nothing (an ACP prompt's usage, reported after its last
                # step) is no step and keeps the turn's output.
                if turn and (text or event.tool_calls or event.thinking):
                    turn.steps += 1
                    turn.output = turn.partial + text
                    # A reply max_tokens cut off goes on in the next step's text.
                    turn.partial = turn.output if event.runs_on else ""
            case Rewound(to_seq=to_seq):
                self.context.rewind_to(self.context_before(to_seq), event)
            case ContextCompacted(usage=usage):
                # The pod's totals as of the compaction, its summary calls included: a
                # restart that reads no older event still knows them.
                self.usage = usage.model_copy()
            case CheckpointTaken() | CheckpointSkipped() if turn:
                turn.checkpointed = True
            case PodEventReceived(payload=payload) if isinstance(payload.get("event_id"), str):
                self._received[payload["event_id"]] = event.seq
            case PermissionRequest(request_id=request_id):
                self.asked[request_id] = event
            case PermissionResolved(request_id=request_id, grant=grant):
                self.asked.pop(request_id, None)
                if grant is not None:
                    self.grants.add(grant)
            case TurnEnd():
                self.asked.clear()
            case Reconfigured(changed=changed) if "permissions" in changed:
                self.grants = Grants()  # granted by index into rules that are gone

    def context_before(self, seq: int) -> Context:
        """The model's context as it stood just before event `seq`, rebuilt from the
        stored events since the compaction then in force; past a `rewound` among them,
        from the context that rewind went back to (rebuilt the same way, from further
        back), so each level reads its own stretch of events and no `rewound` is read
        twice."""
        start = self._store.context_start(self.name, seq)
        context = Context()
        rewound = self._store.latest_rewound(self.name, start, seq)
        if rewound is not None:
            start = rewound[0] + 1
            event = parse_event(orjson.loads(rewound[1]))
            assert isinstance(event, Rewound)
            context.rewind_to(self.context_before(event.to_seq), event)
        after = start - 1
        while rows := self._store.events_after(self.name, after, REPLAY_PAGE):
            for row_seq, data in rows:
                if row_seq >= seq:
                    return context
                event = parse_event(orjson.loads(data))
                if isinstance(event, DurableEvent):
                    context.apply(event)
            after = rows[-1][0]
        return context

    # -- reading ------------------------------------------------------------------------

    def page(self, after_seq: int, limit: int) -> list[tuple[int, bytes]]:
        """Stored events after `after_seq`, none past the committed seq."""
        rows = self._store.events_after(self.name, after_seq, limit)
        if rows and rows[-1][0] > self.committed_seq:
            rows = [row for row in rows if row[0] <= self.committed_seq]
        return rows

    def history(
        self,
        request_id: RequestId | None,
        after_seq: int,
        limit: int,
        last_turns: int | None = None,
    ) -> bytes:
        """The `history` ack (a `HistoryResult`), the stored events spliced in as they are
        rather than parsed and encoded again. With `last_turns` the page starts at the
        `turn_start` of the last this-many turns (at the first event when there are fewer)."""
        if last_turns is not None:
            start = self._store.last_turns_start(self.name, last_turns)
            after_seq = 0 if start is None else start - 1
        events = b",".join(data for _, data in self.page(after_seq, limit))
        head = orjson.dumps({"event": "ack", "id": request_id})[:-1]
        tail = orjson.dumps(self.committed_seq)
        return b'%s,"result":{"events":[%s],"last_seq":%s}}\n' % (head, events, tail)

    # -- restore ------------------------------------------------------------------------

    def restore(self, stored: Iterable[bytes]) -> Restored:
        """Rebuild the derived state from stored events, and find the state machine's:
        queued runs, buffered notifications and received reports the model has not seen
        yet are pending again. The engine that asked a question still open is gone with
        the capd that died, so its questions are resolved here. `stored` may begin at the
        latest compaction's `restore_from`: the open turn and the unread reports come after
        it by construction, and that event carries the usage totals."""
        found = Restored()
        self._restore_grants()
        unseen: dict[int, PodEventReceived] = {}
        started: set[str] = set()
        for data in stored:
            event = parse_event(orjson.loads(data))
            if not isinstance(event, DurableEvent):
                continue
            self.last_seq = self.committed_seq = event.seq
            self._track(event, found.turn)
            match event:
                case StatusChanged(status=status):
                    found.status = status
                case TurnStart(turn_id=turn_id, invoke=invoke, traceparent=traceparent):
                    found.turn = Turn(
                        turn_id, invoke, started_seq=event.seq, traceparent=traceparent
                    )
                    started.add(turn_id)
                case TurnEnd():
                    found.turn = None
                case PodEventReceived(seq=seq):
                    unseen[seq] = event
                case Notification(pod_event_seq=int(seq)):
                    unseen.pop(seq, None)
        notes = [(event.ts, report_note(event)) for event in unseen.values()]
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
                found.queue.append(QueuedRun(row.turn_id, row.text, row.id, row.source))
        found.notes = [note for _, note in sorted(notes, key=lambda pair: pair[0])]
        for asked in list(self.asked.values()):
            resolved = PermissionResolved(turn_id=asked.turn_id, request_id=asked.request_id)
            self.emit(resolved, found.turn)
        return found

    def _restore_grants(self) -> None:
        """The grants of the pod's whole life: those before the events a restore reads
        (a compaction's `restore_from`) too, since its permissions last changed."""
        for data in self._store.permission_events(self.name):
            event = parse_event(orjson.loads(data))
            if isinstance(event, Reconfigured) and "permissions" in event.changed:
                self.grants = Grants()  # granted by index into rules that are gone
            elif isinstance(event, PermissionResolved) and event.grant is not None:
                self.grants.add(event.grant)


def report_note(received: PodEventReceived) -> PendingNote:
    """The note a received report becomes, for the model to read."""
    payload = received.payload
    source = f"pod {payload['pod']}" if isinstance(payload.get("pod"), str) else "pod_event"
    return PendingNote("pod_event", source, "", received.seq, report=payload)
