"""Restore after a compaction (issue 16): a restart reads a pod's events from the
`restore_from` of its latest `context_compacted` on, never the older history.

The histories are written into a stopped capd's store with capd's own `Store` and event
models, as capd writes them (a hundred turns need no model); then a real capd restores them.
"""

import time

from capd.store import Store
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
from tests.conftest import CapdProcess
from tests.helpers import daemon_request, spawn

OLD_TURNS = 100
STEP_USAGE = Usage(input_tokens=100, output_tokens=7)
SUMMARY = "Summary 7f3a: a hundred earlier exchanges, every one answered."


class _History:
    """Events appended to a stopped capd's store for one pod, each with the next seq."""

    def __init__(self, capd: CapdProcess, pod: str) -> None:
        self._store = Store(capd.state_dir / "capd.db")
        self._pod = pod
        self.seq = len(self._store.events_after(pod, 0, 1_000_000))
        self._rows: list[tuple[int, float, str, bytes]] = []

    def add(self, event: DurableEvent) -> int:
        self.seq += 1
        event.pod, event.seq, event.ts = self._pod, self.seq, time.time()
        self._rows.append((self.seq, event.ts, event.event, encode(event)[:-1]))
        return self.seq

    def add_raw(self, kind: str, data: bytes) -> int:
        """A stored event as bytes no capd wrote."""
        self.seq += 1
        self._rows.append((self.seq, time.time(), kind, data))
        return self.seq

    def start_turn(self, turn_id: str, text: str) -> int:
        """A turn's first events; the seq of its `turn_start`."""
        self.add(StatusChanged(status="running", turn_id=turn_id))
        started = self.add(TurnStart(turn_id=turn_id, invoke="run"))
        self.add(UserMessage(turn_id=turn_id, text=text))
        return started

    def end_turn(self, turn_id: str, answer: str) -> int:
        """The model's answer and the turn's end; the seq of the last event."""
        self.add(AssistantMessage(turn_id=turn_id, text=answer, usage=STEP_USAGE))
        self.add(TurnEnd(turn_id=turn_id, result="finished", output=answer))
        return self.add(StatusChanged(status="idle", turn_id=None))

    def old_turns(self) -> None:
        for i in range(OLD_TURNS):
            self.start_turn(f"old-{i}", f"old question {i}")
            self.end_turn(f"old-{i}", f"old answer {i}")

    def commit(self) -> None:
        self._store.append(self._pod, self._rows)
        self._store.close()


def _compacted(
    turn_id: str | None, through_seq: int, restore_from: int, steps: int
) -> ContextCompacted:
    return ContextCompacted(
        turn_id=turn_id,
        trigger="auto",
        summary=SUMMARY,
        through_seq=through_seq,
        tokens_before=5000,
        tokens_after=300,
        restore_from=restore_from,
        usage=Usage(
            input_tokens=steps * STEP_USAGE.input_tokens,
            output_tokens=steps * STEP_USAGE.output_tokens,
        ),
    )


async def test_events_older_than_restore_from_are_never_read(capd: CapdProcess) -> None:
    """An event before the window that no capd could parse does not keep the pod down:
    the restart never reads it (the old code replayed the whole history, and failed)."""
    await spawn(capd, "w1", {"provider": "scripted"})
    capd.stop()
    stored = _History(capd, "w1")
    stored.old_turns()
    unreadable = stored.seq + 1
    stored.add_raw("user_message", b'{"event": "user_message", "seq": %d}' % unreadable)
    stored.add(_compacted(None, unreadable, unreadable + 1, OLD_TURNS))
    stored.commit()
    capd.start()

    [entry] = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert (entry["status"], entry["error"]) == ("idle", None)
