"""What a viewer reads of a pod's recent past on a real capd: `history {last_turns}`,
`subscribe {deltas: false}`, and `capctl log --tail N` / `--tail-events N`."""

import asyncio
from pathlib import Path
from typing import Any

import pytest

from protocol.client import Client
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.helpers import connect_pod, is_event, run_turn, scripted, spawn, wait_for
from tests.test_capctl import capctl, json_lines, ok

pytestmark = pytest.mark.shared_capd

Event = dict[str, Any]


async def pod_with_turns(capd: CapdProcess, name: str, texts: list[str]) -> Client:
    """A scripted pod (it echoes) that ran one turn per text; a subscribed client."""
    await spawn(capd, name, scripted())
    pod = await connect_pod(capd, name)
    for text in texts:
        await run_turn(pod, text)
    return pod


def user_texts(events: list[Event]) -> list[str]:
    return [e["text"] for e in events if e["event"] == "user_message"]


async def test_history_last_turns_starts_at_the_nth_last_turn_start(capd: CapdProcess) -> None:
    pod = await pod_with_turns(capd, "w1", ["one", "two", "three"])
    async with pod:
        page = await pod.request({"method": "history", "last_turns": 2})
        events = page["events"]
        assert events[0]["event"] == "turn_start"
        assert user_texts(events) == ["two", "three"]
        assert events[-1]["seq"] == page["last_seq"]
        # Seqs run on without a gap from that turn_start to the end.
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(seqs[0], page["last_seq"] + 1))

        # last_turns wins over after_seq; limit still pages, and paging goes on by after_seq.
        first = await pod.request(
            {"method": "history", "last_turns": 1, "after_seq": 1, "limit": 2}
        )
        assert [e["event"] for e in first["events"]] == ["turn_start", "user_message"]
        assert user_texts(first["events"]) == ["three"]
        rest = await pod.request({"method": "history", "after_seq": first["events"][-1]["seq"]})
        assert rest["events"][-1]["seq"] == page["last_seq"]

        # More turns than the pod has: from its first event.
        everything = await pod.request({"method": "history", "last_turns": 10000})
        assert everything["events"][0]["seq"] == 1
        assert user_texts(everything["events"]) == ["one", "two", "three"]

        for bad in (0, 10001, "2"):
            with pytest.raises(ProtocolError) as refused:
                await pod.request({"method": "history", "last_turns": bad})
            assert refused.value.code == "invalid_request"
            assert "last_turns" in refused.value.message


async def test_history_last_turns_of_a_pod_without_turns_and_of_a_running_turn(
    capd: CapdProcess, tmp_path: Path
) -> None:
    sleep = {"name": "bash", "arguments": {"command": "sleep 30"}}
    model = scripted({"text": "first"}, {"tool_calls": [sleep]})
    await spawn(capd, "w1", model, cwd=str(tmp_path), tools=["bash"])
    async with await connect_pod(capd, "w1") as pod:
        fresh = await pod.request({"method": "history", "last_turns": 3})
        assert fresh == {"events": [], "last_seq": 0}

        await run_turn(pod, "done")
        await pod.request({"method": "run", "text": "busy"})
        await wait_for(pod, is_event("tool_call_start"))
        running = await pod.request({"method": "history", "last_turns": 1})
        assert running["events"][0]["event"] == "turn_start"
        assert user_texts(running["events"]) == ["busy"]
        assert "turn_end" not in [e["event"] for e in running["events"]], running
        await pod.request({"method": "cancel"})
        await wait_for(pod, is_event("turn_end"))


async def test_subscribe_without_deltas_gets_every_other_event(
    capd: CapdProcess, tmp_path: Path
) -> None:
    call = {"name": "bash", "arguments": {"command": "echo hi"}}
    step = {"thinking": "hmm", "text": "calling", "chunk_chars": 2, "tool_calls": [call]}
    await spawn(capd, "w1", scripted(step, {"text": "done"}), cwd=str(tmp_path), tools=["bash"])
    async with (
        await connect_pod(capd, "w1") as every,
        await connect_pod(capd, "w1", subscribe=False) as whole,
    ):
        ack = await whole.request({"method": "subscribe", "deltas": False})
        assert isinstance(ack["last_seq"], int)
        await every.request({"method": "run", "text": "go"})
        _, all_events = await wait_for(every, is_event("turn_end"))
        _, without = await wait_for(whole, is_event("turn_end"))

    deltas = {"text_delta", "thinking_delta", "tool_call_delta"}
    seen = {e["event"] for e in all_events}
    assert deltas <= seen, "the default subscription gets every kind of delta"
    assert [e for e in all_events if e["event"] not in deltas] == without
    assert "tool_call_start" in {e["event"] for e in without}


async def test_subscribe_deltas_false_replays_then_goes_live(capd: CapdProcess) -> None:
    """`deltas: false` with `after_seq`: the replay, then live events without deltas."""
    pod = await pod_with_turns(capd, "w1", ["one"])
    async with pod, await connect_pod(capd, "w1", subscribe=False) as viewer:
        await viewer.request({"method": "subscribe", "after_seq": 0, "deltas": False})
        _, replayed = await wait_for(viewer, is_event("turn_end"))
        assert replayed[0]["seq"] == 1
        await pod.request({"method": "run", "text": "x" * 40})
        _, live = await wait_for(viewer, is_event("turn_end"))
        assert "text_delta" not in {e["event"] for e in live}
        assert user_texts(live) == ["x" * 40]


async def test_log_tail_shows_exactly_the_last_two_turns(capd: CapdProcess) -> None:
    pod = await pod_with_turns(capd, "w1", ["alpha", "bravo", "charlie"])
    await pod.close()
    rt = capd.runtime_dir
    text = await asyncio.to_thread(ok, rt, "log", "w1", "--tail", "2")
    lines = text.splitlines()
    assert lines[0].startswith("── turn ")
    assert [line for line in lines if line.startswith("user: ")] == [
        "user: bravo",
        "user: charlie",
    ]
    assert "alpha" not in text
    assert sum(line.startswith("── turn ") and "(run)" in line for line in lines) == 2

    events = json_lines(await asyncio.to_thread(ok, rt, "--json", "log", "w1", "--tail", "2"))
    assert [e["event"] for e in events].count("turn_start") == 2
    assert events[0]["event"] == "turn_start"
    assert user_texts(events) == ["bravo", "charlie"]


async def test_log_tail_events_and_its_limits(capd: CapdProcess) -> None:
    pod = await pod_with_turns(capd, "w1", ["alpha", "bravo"])
    async with pod:
        last_seq = (await pod.request({"method": "status"}))["last_seq"]
    rt = capd.runtime_dir
    outputs = await asyncio.gather(
        *(
            asyncio.to_thread(ok, rt, "--json", "log", "w1", *args)
            for args in (
                ("--tail-events", "3"),
                ("--tail-events", "3", "--limit", "1"),
                ("--tail-events", "9999"),
            )
        )
    )
    tail, limited, everything = (json_lines(text) for text in outputs)
    assert [e["seq"] for e in tail] == [last_seq - 2, last_seq - 1, last_seq]
    assert [e["seq"] for e in limited] == [last_seq - 2]
    assert everything[0]["seq"] == 1
    assert everything[-1]["seq"] == last_seq


async def test_log_tail_options_exclude_each_other(tmp_path: Path) -> None:
    """Refused before capctl connects: no capd is needed."""
    runs = [
        asyncio.to_thread(capctl, tmp_path, "log", "w1", *args)
        for args in (
            ("--tail", "1", "--from-seq", "3"),
            ("--tail-events", "1", "--tail", "2", "--from-seq", "0"),
            ("--tail", "0"),
        )
    ]
    two, three, zero = await asyncio.gather(*runs)
    for done, flags in (
        (two, "--from-seq and --tail"),
        (three, "--from-seq and --tail and --tail-events"),
    ):
        assert done.returncode == 2, done
        assert f"Error: {flags} exclude each other: give one" in done.stderr
        assert "Traceback" not in done.stderr
    assert zero.returncode == 2
    assert "'--tail'" in zero.stderr
