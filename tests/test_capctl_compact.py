"""`capctl compact`, and how capctl shows compactions.

The first tests drive capctl against a stand-in pod socket that answers as the contract
says a pod does (an idle pod commits `context_compacted` before its ack, a running one
acks first), so the waiting logic is checked frame by frame, and the printers are given
events. The tests after them use a real capd.
"""

import asyncio
import contextlib
import io
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from capctl.render import EventPrinter, TurnPrinter
from protocol.framing import decode, encode
from tests.conftest import CapdProcess
from tests.engine_scaffold import STAND_IN_ACP_AGENT
from tests.helpers import connect_pod, run_turn, scripted, spawn
from tests.test_capctl import (
    TIMEOUT_S,
    Output,
    assert_one_line_error,
    capctl,
    capctl_cmd,
    json_lines,
    ok,
    spawn_scripted,
    start_capctl,
)

Frame = dict[str, Any]
RUNNING_NOTE = "w1 is running: it compacts at its next step boundary"
REFUSAL = "this pod's engine (acp) manages its own context; it cannot compact"


def compacted(seq: int, trigger: str = "request", **fields: Any) -> Frame:
    """A `context_compacted` as a pod sends it."""
    return {
        "event": "context_compacted",
        "pod": "w1",
        "seq": seq,
        "ts": 1764393000.4,
        "turn_id": None,
        "trigger": trigger,
        "summary": "## Task\n\nFix the flaky tests in tests/net.\n## Decisions\n- retry twice\n",
        "through_seq": seq - 2,
        "tokens_before": 41230,
        "tokens_after": 6120,
        "window": 32768,
        "restore_from": seq - 1,
        "usage": {"input_tokens": 912034, "output_tokens": 40211},
    } | fields


def started(trigger: str = "request") -> Frame:
    return {"event": "compaction_started", "pod": "w1", "turn_id": None, "trigger": trigger}


def status(seq: int, name: str) -> Frame:
    turn_id = None if name == "idle" else "t-1"
    return {"event": "status", "pod": "w1", "seq": seq, "ts": 1.0, "status": name} | {
        "turn_id": turn_id
    }


def turn_end(seq: int, result: str, error: str | None = None) -> Frame:
    return {"event": "turn_end", "pod": "w1", "seq": seq, "ts": 1.0, "turn_id": "t-1"} | {
        "result": result,
        "output": "",
        "error": error,
    }


ACK: Frame = {"event": "ack", "result": {}}


@contextlib.asynccontextmanager
async def stand_in_pod(
    runtime: Path, hello: Frame, answers: list[tuple[str, list[Frame]]]
) -> AsyncIterator[list[Frame]]:
    """Pod w1's socket: greets with `hello` as its `pod`, then takes the requests of
    `answers` in order, writing each one's frames (an `ack` or `error` gets the request's
    id). Yields the requests it got."""
    requests: list[Frame] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(encode({"event": "hello", "protocol": 1, "server": "fake", "pod": hello}))
        for method, frames in answers:
            request = decode(await reader.readline())
            requests.append(request)
            if request.get("method") != method:
                break
            for frame in frames:
                if frame["event"] in ("ack", "error"):
                    frame = {**frame, "id": request["id"]}
                writer.write(encode(frame))
            await writer.drain()
        await reader.read()
        writer.close()

    (runtime / "pods").mkdir()
    server = await asyncio.start_unix_server(serve, path=str(runtime / "pods" / "w1.sock"))
    async with server:
        yield requests


async def run_capctl(runtime: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *capctl_cmd(runtime, *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def hello(status: str, last_seq: int) -> Frame:
    return {"name": "w1", "status": status, "last_seq": last_seq}


async def test_compact_an_idle_pod_prints_the_sizes(tmp_path: Path) -> None:
    """Subscribed from the hello's last seq before it asks; the event comes before the ack."""
    answers = [
        ("subscribe", [{"event": "ack", "result": {"last_seq": 7}}]),
        ("compact", [started(), compacted(8), ACK]),
    ]
    async with stand_in_pod(tmp_path, hello("idle", 7), answers) as requests:
        code, out, err = await run_capctl(tmp_path, "compact", "w1", "--instructions", "keep ids")
    assert code == 0, err
    assert out == "compacted w1: 41,230 → 6,120 of 32,768 tokens (through seq 6)\n"
    assert err == "[w1: compacting the context (request)…]\n"
    assert [(r["method"], r.get("after_seq")) for r in requests] == [
        ("subscribe", 7),
        ("compact", None),
    ]
    assert requests[1]["instructions"] == "keep ids"


async def test_compact_a_running_pod_waits_for_its_own_compaction(tmp_path: Path) -> None:
    """The hello said idle, but a turn started before the subscription: the replay's
    status tells capctl that the ack came before the compaction. An auto compaction
    meanwhile is not the one it asked for, and a turn that ends before its next step
    leaves the compaction to be made after it."""
    ours = compacted(12, tokens_before=9000, tokens_after=800, window=None)
    turn = [compacted(9, "auto", turn_id="t-1"), turn_end(10, "finished"), status(11, "idle")]
    answers = [
        ("subscribe", [{"event": "ack", "result": {"last_seq": 7}}, status(8, "running")]),
        ("compact", [ACK, *turn, started(), ours]),
    ]
    async with stand_in_pod(tmp_path, hello("idle", 7), answers):
        code, out, err = await run_capctl(tmp_path, "compact", "w1")
    assert code == 0, err
    assert out == "compacted w1: 9,000 → 800 tokens (through seq 10)\n"
    assert err.splitlines() == [
        f"[{RUNNING_NOTE}; waiting, Ctrl-C detaches]",
        "[w1: compacting the context (request)…]",
    ]


async def test_compact_no_wait_returns_after_the_ack(tmp_path: Path) -> None:
    answers = [
        ("subscribe", [{"event": "ack", "result": {"last_seq": 3}}]),
        ("compact", [ACK]),
    ]
    async with stand_in_pod(tmp_path, hello("running", 3), answers):
        code, out, err = await run_capctl(tmp_path, "compact", "w1", "--no-wait")
    assert (code, out, err) == (0, RUNNING_NOTE + "\n", "")


async def test_compact_reports_a_request_the_running_pod_did_not_make(tmp_path: Path) -> None:
    """A pause in between only puts the compaction off; `compaction_skipped` ends it."""
    skipped = {
        "event": "compaction_skipped",
        "pod": "w1",
        "turn_id": "t-1",
        "trigger": "request",
        "reason": "compaction failed: model call failed: boom",
    }
    answers = [
        ("subscribe", [{"event": "ack", "result": {"last_seq": 3}}]),
        ("compact", [ACK, started() | {"turn_id": "t-1"}, status(9, "paused"), skipped]),
    ]
    async with stand_in_pod(tmp_path, hello("running", 3), answers):
        code, out, err = await run_capctl(tmp_path, "compact", "w1")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"[{RUNNING_NOTE}; waiting, Ctrl-C detaches]",
        "[w1: compacting the context (request)…]",
        "capctl: w1 did not compact: compaction failed: model call failed: boom",
    ]


async def test_compact_reports_an_error_in_one_line(tmp_path: Path) -> None:
    error = {"event": "error", "code": "invalid_request", "message": REFUSAL}
    answers = [("subscribe", [{"event": "ack", "result": {"last_seq": 3}}]), ("compact", [error])]
    async with stand_in_pod(tmp_path, hello("idle", 3), answers):
        code, out, err = await run_capctl(tmp_path, "compact", "w1")
    assert (code, out) == (1, "")
    assert err == f"capctl: invalid_request: {REFUSAL}\n"


async def test_compact_says_so_when_an_idle_pod_made_none(tmp_path: Path) -> None:
    answers = [("subscribe", [{"event": "ack", "result": {"last_seq": 3}}]), ("compact", [ACK])]
    async with stand_in_pod(tmp_path, hello("paused", 3), answers):
        code, out, err = await run_capctl(tmp_path, "compact", "w1")
    assert (code, out, err) == (0, "w1: nothing to compact\n", "")


async def test_compact_json_prints_the_event_and_the_ack(tmp_path: Path) -> None:
    answers = [
        ("subscribe", [{"event": "ack", "result": {"last_seq": 7}}]),
        ("compact", [started(), compacted(8), ACK]),
    ]
    async with stand_in_pod(tmp_path, hello("idle", 7), answers):
        code, out, err = await run_capctl(tmp_path, "compact", "w1", "--json")
    assert code == 0, err
    assert json_lines(out) == [compacted(8), {}]


async def test_compact_detaches_on_ctrl_c(tmp_path: Path) -> None:
    answers = [("subscribe", [{"event": "ack", "result": {"last_seq": 3}}]), ("compact", [ACK])]
    async with stand_in_pod(tmp_path, hello("running", 3), answers):
        proc = await asyncio.create_subprocess_exec(
            *capctl_cmd(tmp_path, "compact", "w1"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert proc.stderr is not None
        waiting = await asyncio.wait_for(proc.stderr.readline(), TIMEOUT_S)
        assert b"waiting, Ctrl-C detaches" in waiting
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    assert proc.returncode == 130
    assert out == b""
    assert err.decode() == "capctl: detached from w1; the compaction still happens\n"


def test_compact_refuses_instructions_past_the_limit(tmp_path: Path) -> None:
    done = capctl(tmp_path, "compact", "w1", "--instructions", "x" * 10_001)
    assert done.returncode == 2
    assert "at most 10,000" in done.stderr
    assert "Traceback" not in done.stderr


def test_compact_without_a_daemon(tmp_path: Path) -> None:
    done = capctl(tmp_path, "compact", "w1")
    assert_one_line_error(done, f"cannot reach capd at {tmp_path / 'capd.sock'}")


def test_watch_and_log_show_compactions() -> None:
    out = io.StringIO()
    printer = EventPrinter(out)
    printer.show(started("auto"))
    long_line = "- " + "y" * 200
    summary = "## Task\n\nFix the flaky tests.\n" + long_line + "\nmore\nand more\n"
    printer.show(compacted(40, "auto", turn_id="t-1", summary=summary))
    printer.show(compacted(50, "overflow", window=None, summary="", tokens_before=None))
    assert out.getvalue().splitlines() == [
        "── compacting the context (auto)…",
        "── context compacted (auto): 41,230 → 6,120 of 32,768 tokens, through seq 38",
        "   ## Task",
        "   Fix the flaky tests.",
        "   - " + "y" * 117 + "… (+2 lines)",
        "── context compacted (overflow): ? → 6,120 tokens, through seq 48",
        "   (empty)",
    ]


def test_send_notes_a_compaction_of_its_turn() -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = TurnPrinter("w1", out, err)
    printer.show(started("overflow") | {"turn_id": "t-1"})
    printer.show(compacted(40, "overflow", turn_id="t-1"))
    assert out.getvalue() == ""
    assert err.getvalue().splitlines() == [
        "[compacting the context (overflow)…]",
        "[context compacted (overflow): 41,230 → 6,120 of 32,768 tokens, through seq 38]",
    ]


# -- against a real capd ---------------------------------------------------------------------

COMPACTED_LINE = re.compile(
    r"compacted w1: [\d,]+ → [\d,]+ (of [\d,]+ )?tokens \(through seq (\d+)\)\n"
)


def _compactions(capd: CapdProcess, pod: str) -> list[Frame]:
    events = json_lines(ok(capd.runtime_dir, "log", pod, "--json"))
    return [e for e in events if e["event"] == "context_compacted"]


def _run_turns(capd: CapdProcess, pod: str, *texts: str) -> None:
    """Run a turn for each of `texts`, in order, over the pod's socket (quicker than a
    `capctl send` each: what is tested here is compact)."""

    async def run() -> None:
        async with await connect_pod(capd, pod) as client:
            for text in texts:
                await run_turn(client, text)

    asyncio.run(run())


@pytest.mark.shared_capd
def test_compact_an_idle_pod_of_capd(capd: CapdProcess, tmp_path: Path) -> None:
    rt = capd.runtime_dir
    spawn_scripted(capd, tmp_path, "w1")
    _run_turns(capd, "w1", "first task", "second task", "third task", "fourth task")
    watch = start_capctl(rt, "watch", "w1", "--from-seq", "0")
    try:
        shown = Output(watch.stdout)
        shown.until("user: fourth task")
        shown.until("finished")
        done = capctl(rt, "compact", "w1", "--instructions", "keep the task names")
        assert done.returncode == 0, done.stderr
        line = COMPACTED_LINE.fullmatch(done.stdout)
        assert line, done.stdout
        shown.until("── compacting the context (request)…")
        shown.until("── context compacted (request): ")
    finally:
        watch.kill()
        watch.wait()
    (event,) = _compactions(capd, "w1")
    assert (event["trigger"], event["turn_id"]) == ("request", None)
    assert event["through_seq"] == int(line[2])
    assert "── context compacted (request): " in ok(rt, "log", "w1")


@pytest.mark.shared_capd
def test_compact_a_running_pod_of_capd_at_its_next_step(capd: CapdProcess, tmp_path: Path) -> None:
    """The turn's tool waits on a FIFO the test writes to once both compacts were acked,
    so the pod is running (between two steps) while they are asked for. The compaction
    keeps that step's call and result, so the scripted model (which counts the assistant
    messages in its context) plays the step again: the test lets it pass twice."""
    rt = capd.runtime_dir
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    wait = {"name": "bash", "arguments": {"command": "read -r _ < gate"}}
    tool_step = {"text": "x", "tool_calls": [wait]}
    model = scripted({"text": "warm"}, tool_step, {"text": "done"})
    asyncio.run(spawn(capd, "w1", model, cwd=str(tmp_path), tools=["bash"]))
    _run_turns(capd, "w1", "warm up the context")
    # Read-write, so it never blocks; the line waits in the pipe until the tool reads it.
    release = os.open(gate, os.O_RDWR)
    send = start_capctl(rt, "send", "w1", "go")
    try:
        Output(send.stdout).until("x")
        assert ok(rt, "compact", "w1", "--no-wait") == RUNNING_NOTE + "\n"
        waiter = start_capctl(rt, "compact", "w1")
        try:
            Output(waiter.stderr).until(RUNNING_NOTE)
            os.write(release, b"go\ngo\n")
            out, err = waiter.communicate(timeout=TIMEOUT_S)
        finally:
            waiter.kill()
        assert waiter.returncode == 0, err
        assert COMPACTED_LINE.fullmatch(out.decode()), out
        assert send.wait(timeout=TIMEOUT_S) == 0
    finally:
        send.kill()
        os.close(release)
    events = json_lines(ok(rt, "log", "w1", "--json"))
    turn = [e for e in events if e["event"] == "turn_start"][-1]["turn_id"]
    kinds = [e["event"] for e in events if e.get("turn_id") == turn]
    first_compaction = kinds.index("context_compacted")
    assert kinds.index("assistant_message") < first_compaction < kinds.index("turn_end")
    assert {e["trigger"] for e in _compactions(capd, "w1")} == {"request"}


@pytest.mark.shared_capd
def test_compact_with_nothing_to_compact(capd: CapdProcess, tmp_path: Path) -> None:
    spawn_scripted(capd, tmp_path, "w1")
    done = capctl(capd.runtime_dir, "compact", "w1")
    assert_one_line_error(done, "invalid_request", "nothing to compact")


@pytest.mark.shared_capd
def test_compact_is_refused_by_an_external_engine(capd: CapdProcess, tmp_path: Path) -> None:
    state = tmp_path / "acp"
    state.mkdir()
    manifest = tmp_path / "ag.yaml"
    engine = STAND_IN_ACP_AGENT.engine(state)
    manifest.write_text(yaml.safe_dump({"name": "ag", "engine": engine, "cwd": str(tmp_path)}))
    ok(capd.runtime_dir, "spawn", "-f", str(manifest))
    done = capctl(capd.runtime_dir, "compact", "ag")
    assert_one_line_error(done, "invalid_request", "manages its own context", "cannot compact")


@pytest.mark.shared_capd
def test_compact_waits_out_a_pause_of_the_running_turn(capd: CapdProcess, tmp_path: Path) -> None:
    """The scripted provider answers a summary call (no assistant message in it) with the
    script's first step: here a slow one, so the pause comes while the summary streams;
    the resumed turn compacts again, and `capctl compact` reports that compaction."""
    rt = capd.runtime_dir
    slow = {"text": "x" * 400, "chunk_chars": 1, "delay_ms": 5}
    spawn_scripted(capd, tmp_path, "w1", [slow | {"tool_calls": [{"name": "bash"}]}])
    send = start_capctl(rt, "send", "w1", "go")
    try:
        Output(send.stdout).until("x")
        waiter = start_capctl(rt, "compact", "w1")
        try:
            Output(waiter.stderr).until("compacting the context (request)")
            ok(rt, "pause", "w1")
            assert _compactions(capd, "w1") == []
            ok(rt, "resume", "w1")
            out, _ = waiter.communicate(timeout=TIMEOUT_S)
        finally:
            waiter.kill()
        assert waiter.returncode == 0
        assert out.decode().startswith("compacted w1: ")
    finally:
        send.kill()
        send.wait()
    assert [c["trigger"] for c in _compactions(capd, "w1")] == ["request"]
