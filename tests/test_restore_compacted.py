"""Restore after a compaction (issue 16): a restart reads a pod's events from the
`restore_from` of its latest `context_compacted` on, never the older history, and the pod
goes on with the context that event made.

The histories are written into a stopped capd's store with capd's own `Store` and event
models, as capd writes them (a hundred turns need no model); then a real capd restores them
and a real model server receives what the pod asks next.
"""

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from capd.store import SqliteStore
from protocol.events import (
    AssistantMessage,
    ContextCompacted,
    DurableEvent,
    PodEventReceived,
    StatusChanged,
    TurnEnd,
    TurnStart,
    Usage,
    UserMessage,
)
from protocol.framing import encode
from tests.conftest import CapdProcess
from tests.fakes.openai_server import OpenAITestServer, TextReply
from tests.helpers import connect_pod, daemon_request, full_history, is_event, spawn, wait_for

OLD_TURNS = 100
STEP_USAGE = Usage(input_tokens=100, output_tokens=7)
SUMMARY = "Summary 7f3a: a hundred earlier exchanges, every one answered."


@pytest.fixture
async def server() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as srv:
        yield srv


class _History:
    """Events appended to a stopped capd's store for one pod, each with the next seq."""

    def __init__(self, capd: CapdProcess, pod: str) -> None:
        self._store = SqliteStore(capd.state_dir / "capd.db")
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


def _model(server: OpenAITestServer) -> dict[str, Any]:
    return {"provider": "openai", "name": "test-model", "base_url": server.base_url}


def _texts(request: dict[str, Any]) -> list[str]:
    return [str(message.get("content")) for message in request["messages"]]


async def test_a_restored_pod_goes_on_from_the_summary_without_the_old_history(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server))
    capd.stop()
    stored = _History(capd, "w1")
    stored.old_turns()
    through = stored.seq
    stored.start_turn("recent", "recent question")
    stored.add(_compacted("recent", through, through + 1, OLD_TURNS))
    last_seq = stored.end_turn("recent", "recent answer")
    stored.commit()
    capd.start()

    server.enqueue(TextReply("next answer"))
    async with await connect_pod(capd, "w1") as pod:
        history = await full_history(pod)
        status = await pod.request({"method": "status"})
        await pod.request({"method": "run", "text": "next question"})
        end, _ = await wait_for(pod, is_event("turn_end"))

    assert [event["seq"] for event in history] == list(range(1, last_seq + 1))
    assert [e["text"] for e in history if e["event"] == "user_message"][:2] == [
        "old question 0",
        "old question 1",
    ]
    assert (status["status"], status["last_seq"]) == ("idle", last_seq)
    # The compaction's totals, which cover the old turns, plus the answer after it.
    steps = OLD_TURNS + 1
    assert status["usage"] == {
        "input_tokens": steps * STEP_USAGE.input_tokens,
        "output_tokens": steps * STEP_USAGE.output_tokens,
        "cost_usd": None,
    }
    assert end["output"] == "next answer"
    [request] = server.requests
    texts = _texts(request)
    assert not [text for text in texts if "old question" in text or "old answer" in text]
    assert any(SUMMARY in text for text in texts)
    assert texts[-3:] == ["recent question", "recent answer", "next question"]


async def test_the_open_turn_and_an_unread_report_come_back_from_the_window(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    """restore_from is the received report the model has not read: older than the turn
    still open, and than the compaction's through_seq."""
    await spawn(capd, "w1", _model(server))
    capd.stop()
    stored = _History(capd, "w1")
    stored.old_turns()
    stored.start_turn("before", "before question")
    report = {"kind": "shut_down", "pod": "c1", "event_id": "c1/1"}
    received = stored.add(PodEventReceived(payload=report))
    through = stored.end_turn("before", "before answer")
    stored.start_turn("open", "open question")
    stored.add(_compacted("open", through, received, OLD_TURNS + 1))
    stored.commit()
    capd.start()

    server.enqueue(TextReply("resumed answer"))
    async with await connect_pod(capd, "w1") as pod:
        status = await pod.request({"method": "status"})
        await pod.request({"method": "resume"})
        end, _ = await wait_for(pod, is_event("turn_end"))
        history = await full_history(pod)

    assert (status["status"], status["turn_id"]) == ("paused", "open")
    assert (end["turn_id"], end["output"]) == ("open", "resumed answer")
    [note] = [e for e in history if e["event"] == "notification"]
    assert note["pod_event_seq"] == received
    [request] = server.requests
    texts = _texts(request)
    assert not [text for text in texts if "old " in text or "before " in text]
    assert any(SUMMARY in text for text in texts)
    assert "open question" in texts
    assert any("pod c1 shut down" in text for text in texts)


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
