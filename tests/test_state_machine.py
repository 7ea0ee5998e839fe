"""The pod state machine (docs/protocol.md), row by row, against a real capd over its
Unix sockets."""

import asyncio
from pathlib import Path

import pytest

from protocol.client import Client
from protocol.errors import ProtocolError
from protocol.results import PodStatus
from tests.conftest import CapdProcess
from tests.helpers import (
    alive,
    connect_pod,
    is_event,
    kinds,
    pause_turn,
    scripted,
    slow_text,
    spawn,
    wait_for,
)

pytestmark = pytest.mark.shared_capd


async def test_run_when_idle_streams_a_whole_turn_in_order(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted({"text": "hello there", "chunk_chars": 3}))
    async with await connect_pod(capd, "w1") as pod:
        ack = await pod.request({"method": "run", "text": "hi", "id": 7})
        end, seen = await wait_for(pod, is_event("turn_end"))
        _, after = await wait_for(pod, is_event("status"))
    turn_id = ack["turn_id"]
    assert kinds(seen + after) == [
        "status", "turn_start", "user_message",
        "text_delta", "text_delta", "text_delta", "text_delta",
        "assistant_message", "turn_end", "status",
    ]  # fmt: skip
    assert all(e["turn_id"] == turn_id for e in seen)
    assert "".join(e["text"] for e in seen if e["event"] == "text_delta") == "hello there"
    assert end["result"] == "finished"
    assert end["output"] == "hello there"
    assert seen[0]["status"] == "running"
    assert after[-1]["status"] == "idle"
    seqs = [e["seq"] for e in seen + after if "seq" in e]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_run_while_running_is_rejected_by_default(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted(slow_text()))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "one"})
        with pytest.raises(ProtocolError) as err:
            await pod.request({"method": "run", "text": "two"})
        assert err.value.code == "already_running"
        status = await pod.request({"method": "status"})
        assert status["status"] == "running"
        assert status["queued"] == 0


async def test_run_queue_starts_when_the_current_turn_ends(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted({"text": "first", "chunk_chars": 1, "delay_ms": 20}))
    async with await connect_pod(capd, "w1") as pod:
        first = await pod.request({"method": "run", "text": "one"})
        second = await pod.request({"method": "run", "text": "two", "if_busy": "queue"})
        assert second["queued"] is True
        assert (await pod.request({"method": "status"}))["queued"] == 1
        end1, _ = await wait_for(pod, is_event("turn_end"))
        start2, _ = await wait_for(pod, is_event("turn_start"))
        msg2, _ = await wait_for(pod, is_event("user_message"))
        end2, _ = await wait_for(pod, is_event("turn_end"))
    assert end1["turn_id"] == first["turn_id"]
    assert end1["result"] == "finished"
    assert start2["turn_id"] == second["turn_id"]
    assert msg2["text"] == "two"
    assert end2["result"] == "finished"


async def test_run_interrupt_cancels_the_current_turn(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted(slow_text()))
    async with await connect_pod(capd, "w1") as pod:
        first = await pod.request({"method": "run", "text": "one"})
        await wait_for(pod, is_event("text_delta"))
        second = await pod.request({"method": "run", "text": "two", "if_busy": "interrupt"})
        end1, _ = await wait_for(pod, is_event("turn_end"))
        start2, _ = await wait_for(pod, is_event("turn_start"))
    assert end1["turn_id"] == first["turn_id"]
    assert end1["result"] == "cancelled"
    assert start2["turn_id"] == second["turn_id"]


async def test_run_while_paused_cancels_the_paused_turn(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted(slow_text()))
    async with await connect_pod(capd, "w1") as pod:
        first = await pod.request({"method": "run", "text": "one"})
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "pause"})
        second = await pod.request({"method": "run", "text": "two"})
        end1, _ = await wait_for(pod, is_event("turn_end"))
        start2, _ = await wait_for(pod, is_event("turn_start"))
    assert (end1["turn_id"], end1["result"]) == (first["turn_id"], "cancelled")
    assert start2["turn_id"] == second["turn_id"]


async def test_pause_when_idle_is_not_running(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted())
    async with await connect_pod(capd, "w1") as pod:
        with pytest.raises(ProtocolError) as err:
            await pod.request({"method": "pause"})
    assert err.value.code == "not_running"


async def test_pause_interrupts_streaming_and_keeps_partial_text(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted(slow_text(chars=3000)))
    async with await connect_pod(capd, "w1") as pod:
        ack = await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "pause"})
        paused, seen = await wait_for(pod, is_event("status", status="paused"))
        partial = next(e for e in seen if e["event"] == "assistant_message")
        # Pausing again changes nothing.
        await pod.request({"method": "pause"})
        status = await pod.request({"method": "status"})
    assert paused["turn_id"] == ack["turn_id"]
    assert partial["interrupted"] is True
    assert 0 < len(partial["text"]) < 3000
    assert status["status"] == "paused"
    assert status["turn_id"] == ack["turn_id"]


async def test_pause_kills_the_running_tools_process_group(
    capd: CapdProcess, tmp_path: Path
) -> None:
    command = "sleep 1000 & echo $! > pids; echo $$ >> pids; wait"
    # Unconfined: the tool writes its pids, which a sandbox's PID namespace renumbers.
    off = {"mode": "off"}
    model = scripted(_bash_step(command))
    await spawn(capd, "w1", model, cwd=str(tmp_path), tools=["bash"], sandbox=off)
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("assistant_message"))
        pids = await _wait_for_pids(tmp_path / "pids", 2)
        await pause_turn(pod)
        # SIGKILL lands asynchronously: the group must be gone within a second.
        await _wait_until_dead(pids, timeout=1.0)
        # Resume closes the orphaned call with an "interrupted" result.
        await pod.request({"method": "resume"})
        result, _ = await wait_for(pod, is_event("tool_result"))
        await wait_for(pod, is_event("turn_end"))
    assert result["is_error"] is True
    assert "interrupted" in result["output"]


async def test_resume_continues_the_same_turn(capd: CapdProcess) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(600))
    await spawn(capd, "w1", scripted({"text": text, "chunk_chars": 1, "delay_ms": 2}))
    async with await connect_pod(capd, "w1") as pod:
        for method in ("resume",):
            with pytest.raises(ProtocolError) as err:
                await pod.request({"method": method})
            assert err.value.code == "not_paused"
        ack = await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("text_delta"))
        with pytest.raises(ProtocolError) as err:
            await pod.request({"method": "resume"})
        assert err.value.code == "not_paused"
        await pause_turn(pod)
        await pod.request({"method": "resume"})
        running, _ = await wait_for(pod, is_event("status"))
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert running["status"] == "running"
    assert running["turn_id"] == ack["turn_id"]
    assert end["turn_id"] == ack["turn_id"]
    assert end["result"] == "finished"
    assert end["output"] == text
    assert "turn_start" not in kinds(seen)


async def test_cancel(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted(slow_text(), slow_text(), slow_text()))
    async with await connect_pod(capd, "w1") as pod:
        with pytest.raises(ProtocolError) as err:
            await pod.request({"method": "cancel"})
        assert err.value.code == "not_running"
        # running: the turn ends cancelled and the queued one starts
        first = await pod.request({"method": "run", "text": "one"})
        queued = await pod.request({"method": "run", "text": "two", "if_busy": "queue"})
        await pod.request({"method": "cancel"})
        end, _ = await wait_for(pod, is_event("turn_end"))
        start, _ = await wait_for(pod, is_event("turn_start"))
        assert (end["turn_id"], end["result"]) == (first["turn_id"], "cancelled")
        assert start["turn_id"] == queued["turn_id"]
        # paused, with all: the queue is cleared and the pod goes idle
        await pod.request({"method": "run", "text": "three", "if_busy": "queue"})
        await pod.request({"method": "pause"})
        reply = await pod.request({"method": "cancel", "all": True})
        end, _ = await wait_for(pod, is_event("turn_end"))
        idle, _ = await wait_for(pod, is_event("status"))
        status = await pod.request({"method": "status"})
    assert reply["cleared"] == 1
    assert (end["turn_id"], end["result"]) == (queued["turn_id"], "cancelled")
    assert idle["status"] == "idle"
    assert (status["status"], status["queued"]) == ("idle", 0)


async def test_notify_when_idle_kicks_a_turn(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted({"text": "noted"}))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "notify", "text": "build is green", "source": "ci"})
        start, _ = await wait_for(pod, is_event("turn_start"))
        note, seen = await wait_for(pod, is_event("notification"))
        end, _ = await wait_for(pod, is_event("turn_end"))
    assert start["invoke"] == "notify"
    assert (note["source"], note["text"]) == ("ci", "build is green")
    assert "user_message" not in kinds(seen)
    assert end["result"] == "finished"


async def test_notify_while_running_enters_before_the_next_model_call(
    capd: CapdProcess, tmp_path: Path
) -> None:
    wait_cmd = "while [ ! -f go ]; do sleep 0.01; done"
    await spawn(
        capd,
        "w1",
        scripted(
            {"tool_calls": [{"name": "bash", "arguments": {"command": wait_cmd}}]}, {"text": "ok"}
        ),
        cwd=str(tmp_path),
        tools=["bash"],
    )
    async with await connect_pod(capd, "w1") as pod:
        ack = await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("assistant_message"))
        reply = await pod.request({"method": "notify", "text": "heads up"})
        (tmp_path / "go").touch()
        _, seen = await wait_for(pod, is_event("turn_end"))
    assert reply["buffered"] == 1
    assert kinds(seen, durable_only=True) == [
        "tool_result", "notification", "assistant_message", "turn_end"
    ]  # fmt: skip
    note = seen[kinds(seen).index("notification")]
    assert (note["turn_id"], note["text"], note["source"]) == (ack["turn_id"], "heads up", "notify")


async def test_notify_while_paused_waits_for_resume(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted(slow_text(chars=300)))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("text_delta"))
        await pause_turn(pod)
        await pod.request({"method": "notify", "text": "later"})
        history = await pod.request({"method": "history"})
        assert "notification" not in kinds(history["events"])
        await pod.request({"method": "resume"})
        note, _ = await wait_for(pod, is_event("notification"))
        end, _ = await wait_for(pod, is_event("turn_end"))
    assert note["text"] == "later"
    assert end["result"] == "finished"


async def test_pod_event_is_durable_kicks_a_turn_and_drops_duplicates(
    capd: CapdProcess,
) -> None:
    await spawn(capd, "w1", scripted({"text": "thanks"}))
    report = {
        "kind": "turn_ended",
        "pod": "child",
        "event_id": "child-1",
        "turn_id": "t-1",
        "result": "finished",
        "output": "all done",
    }
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "pod_event", "event": report})
        received, _ = await wait_for(pod, is_event("pod_event_received"))
        start, _ = await wait_for(pod, is_event("turn_start"))
        note, _ = await wait_for(pod, is_event("notification"))
        await wait_for(pod, is_event("turn_end"))
        again = await pod.request({"method": "pod_event", "event": report})
        history = await pod.request({"method": "history"})
    assert received["payload"] == report
    assert start["invoke"] == "pod_event"
    assert "all done" in note["text"]
    assert again == {"duplicate": True}
    assert kinds(history["events"]).count("pod_event_received") == 1


async def test_status_reports_the_pod(capd: CapdProcess, tmp_path: Path) -> None:
    await spawn(
        capd, "w1", scripted({"text": "a b c"}), cwd=str(tmp_path), tools=["bash", "read_file"]
    )
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("turn_end"))
        await wait_for(pod, is_event("status"))
        status = await pod.request({"method": "status"})
    assert status["name"] == "w1"
    assert status["status"] == "idle"
    assert status["turn_id"] is None
    assert status["cwd"] == str(tmp_path.resolve())
    assert status["tools"] == ["bash", "read_file"]
    assert status["model"] == "scripted"
    assert status["parent"] is None
    assert status["children"] == []
    assert status["last_seq"] == 7  # status, turn_start, user_message, checkpoint, step, end, idle
    assert status["usage"]["output_tokens"] == 3
    # capd builds this result without the model: it must still be exactly a PodStatus.
    assert PodStatus.model_validate(status).model_dump(mode="json") == status


async def test_history_pages_durable_events_only(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted({"text": "hello", "chunk_chars": 1}))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("turn_end"))
        await wait_for(pod, is_event("status"))
        everything = await pod.request({"method": "history"})
        page = await pod.request({"method": "history", "after_seq": 2, "limit": 3})
    assert [e["seq"] for e in everything["events"]] == list(range(1, 7))
    assert "text_delta" not in kinds(everything["events"])
    assert everything["last_seq"] == 6
    assert [e["seq"] for e in page["events"]] == [3, 4, 5]


async def test_stop_acks_then_removes_the_socket(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted(slow_text()))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "stop"})
        end, _ = await wait_for(pod, is_event("turn_end"))
    assert end["result"] == "cancelled"
    async with await Client.connect(capd.socket) as daemon:
        listing = await daemon.request({"method": "list"})
    assert listing["pods"][0]["status"] == "stopped"
    assert not capd.pod_socket("w1").exists()


def _bash_step(command: str) -> dict[str, object]:
    return {"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}


async def _wait_for_pids(path: Path, count: int) -> list[int]:
    async with asyncio.timeout(10):
        while True:
            text = path.read_text() if path.exists() else ""
            pids = [int(x) for x in text.split()]
            if len(pids) >= count:
                return pids
            await asyncio.sleep(0.01)


async def _wait_until_dead(pids: list[int], timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            while any(alive(pid) for pid in pids):
                await asyncio.sleep(0.005)
    except TimeoutError:
        alive_pids = [pid for pid in pids if alive(pid)]
        raise AssertionError(f"processes still alive after {timeout} s: {alive_pids}") from None


async def test_max_steps_ends_the_turn_limit_reached(capd: CapdProcess, tmp_path: Path) -> None:
    step = {"text": "again", **_bash_step("true")}
    await spawn(
        capd, "w1", scripted(step, step, step), cwd=str(tmp_path), tools=["bash"],
        limits={"max_steps": 2},
    )  # fmt: skip
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "loop"})
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert end["result"] == "limit_reached"
    assert "max_steps=2" in end["error"]
    assert kinds(seen).count("assistant_message") == 2
    assert kinds(seen).count("tool_result") == 2


async def test_turn_timeout_ends_the_turn_limit_reached(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted(slow_text(chars=5000)), limits={"turn_timeout_s": 0.3})
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert end["result"] == "limit_reached"
    assert "turn_timeout_s=0.3" in end["error"]
    partial = next(e for e in seen if e["event"] == "assistant_message")
    assert partial["interrupted"] is True
