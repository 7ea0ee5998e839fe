"""The claude-code engine, through a real capd and the stand-in `claude` (tests/fakes/claude.py)."""

import asyncio
from pathlib import Path
from typing import Any

import pytest

from capd.context import INTERRUPTED_TOOL_OUTPUT
from capd.engines.process import CONTINUE_PROMPT
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.engine_scaffold import STAND_IN_CLAUDE, engine_starts, spawn_on_engine, stand_in_log
from tests.fakes.claude import TOOL_STOPPED
from tests.helpers import (
    connect_pod,
    daemon_request,
    full_history,
    group_alive,
    is_event,
    kinds,
    pause_turn,
    resume_turn,
    run_turn,
    until,
    wait_for,
)
from tests.test_capctl import capctl, ok

pytestmark = pytest.mark.shared_capd


async def _spawn(
    capd: CapdProcess,
    name: str,
    state: Path,
    parent: str | None = None,
    engine_extra: dict[str, Any] | None = None,
    **manifest: Any,
) -> None:
    engine = STAND_IN_CLAUDE.engine(state, **(engine_extra or {}))
    await spawn_on_engine(capd, name, engine, parent, **manifest)


def _prompts(state: Path) -> list[str]:
    return [
        entry["read"]["message"]["content"]
        for entry in stand_in_log(state)
        if entry.get("read", {}).get("type") == "user"
    ]


def _interrupts(state: Path) -> list[dict[str, Any]]:
    return [
        entry["read"]
        for entry in stand_in_log(state)
        if entry.get("read", {}).get("type") == "control_request"
    ]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "claude"
    path.mkdir()
    return path


async def test_a_turn_streams_and_records_steps_and_tool_results(
    capd: CapdProcess, state: Path, tmp_path: Path
) -> None:
    await _spawn(capd, "cc", state, cwd=str(tmp_path), system_prompt="Be brief.")
    async with await connect_pod(capd, "cc") as pod:
        end, seen = await run_turn(pod, "tool:echo hi from the tool")
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "done")
    assert {"text_delta", "tool_call_start", "tool_call_delta"} <= set(kinds(seen))
    steps = [e for e in history if e["event"] == "assistant_message"]
    assert [s["tool_calls"][0]["name"] for s in steps[:1]] == ["Bash"]
    assert steps[0]["tool_calls"][0]["arguments"] == {"command": "echo hi from the tool"}
    assert steps[-1]["text"] == "done"
    result = next(e for e in history if e["event"] == "tool_result")
    assert (result["name"], result["output"], result["is_error"]) == (
        "Bash",
        "hi from the tool",
        False,
    )
    assert result["call_id"] == steps[0]["tool_calls"][0]["id"]
    session = next(e for e in history if e["event"] == "engine_session")
    (start,) = engine_starts(state)
    assert start["cwd"] == str(tmp_path)
    assert start["pgid"] == start["pid"]
    argv = start["argv"]
    assert argv[:7] == [
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--include-partial-messages",
    ]
    assert argv[argv.index("--append-system-prompt") + 1] == "Be brief."
    assert "--resume" not in argv
    assert session["session_id"]
    assert status["model"] == "claude-code"


async def test_pause_interrupts_the_engine_and_resume_continues(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": "slow"})
        await wait_for(pod, is_event("text_delta"))
        seen = await pause_turn(pod)
        await until(lambda: len(_interrupts(state)) == 1)
        end, _ = await resume_turn(pod)
    partial = next(e for e in seen if e["event"] == "assistant_message")
    assert partial["interrupted"] is True
    assert partial["text"].startswith("tok ")
    assert _interrupts(state)[0]["request"] == {"subtype": "interrupt"}
    assert _prompts(state) == ["slow", CONTINUE_PROMPT]
    # As with the builtin engine, the interrupted text runs on into its continuation.
    continued = f"You said: {CONTINUE_PROMPT}"
    assert (end["result"], end["output"]) == ("finished", partial["text"] + continued)
    assert len(engine_starts(state)) == 1


async def test_a_tool_the_cli_stops_on_pause_gets_the_cli_result(
    capd: CapdProcess, state: Path
) -> None:
    """The CLI's own word on a tool it stopped while winding down is what the pod keeps."""
    running = state / "running"
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": f"tool:touch {running}; sleep 30"})
        await until(running.exists)
        await pod.request({"method": "pause"})
        stopped, _ = await wait_for(pod, is_event("tool_result"))
        end, _ = await resume_turn(pod)
        history = await full_history(pod)
    assert (stopped["output"], stopped["is_error"]) == (TOOL_STOPPED, True)
    step = next(e for e in history if e["event"] == "assistant_message")
    assert stopped["call_id"] == step["tool_calls"][0]["id"]
    assert [e["output"] for e in history if e["event"] == "tool_result"] == [TOOL_STOPPED]
    assert end["result"] == "finished"


async def test_pause_during_a_tool_closes_the_call_on_resume(
    capd: CapdProcess, state: Path
) -> None:
    """A CLI that says nothing of the stopped tool before its turn ends: capd closes it."""
    (state / "deaf").touch()
    await _spawn(capd, "cc", state, engine_extra={"settle_timeout_s": 0.2})
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": "tool:sleep 30"})
        await wait_for(pod, is_event("assistant_message"))
        await pause_turn(pod)
        end, seen = await resume_turn(pod)
    closed = next(e for e in seen if e["event"] == "tool_result")
    assert closed["is_error"] is True
    assert closed["output"] == INTERRUPTED_TOOL_OUTPUT
    assert end["result"] == "finished"


async def test_an_engine_deaf_to_interrupts_is_restarted_after_the_settle_timeout(
    capd: CapdProcess, state: Path
) -> None:
    (state / "deaf").touch()
    await _spawn(capd, "cc", state, engine_extra={"settle_timeout_s": 0.2})
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": "slow"})
        await wait_for(pod, is_event("text_delta"))
        await pause_turn(pod)
        end, _ = await resume_turn(pod)
    first, second = engine_starts(state)
    await until(lambda: not group_alive(first["pgid"]))
    assert second["argv"][second["argv"].index("--resume") + 1]
    assert _prompts(state) == ["slow", CONTINUE_PROMPT]
    assert end["result"] == "finished"
    assert end["output"].endswith(f"You said: {CONTINUE_PROMPT}")


async def test_cancel_ends_the_turn_and_the_engine_takes_the_next(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": "slow"})
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "cancel"})
        cancelled, _ = await wait_for(pod, is_event("turn_end"))
        end, _ = await run_turn(pod, "hello")
    assert cancelled["result"] == "cancelled"
    assert (end["result"], end["output"]) == ("finished", "You said: hello")
    assert len(engine_starts(state)) == 1


async def test_a_notify_while_running_becomes_the_next_prompt(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": "slow:50"})
        first, _ = await wait_for(pod, is_event("turn_start"))
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "notify", "text": "CI is green", "source": "ci"})
        end, _ = await wait_for(pod, is_event("turn_end", turn_id=first["turn_id"]))
        second, _ = await wait_for(pod, is_event("turn_start"))
        after, _ = await wait_for(pod, is_event("turn_end"))
    assert end["output"] == "tok " * 50
    assert second["invoke"] == "notify"
    assert _prompts(state) == ["slow:50", "[notification from ci]\nCI is green"]
    assert after["result"] == "finished"


async def test_an_engine_that_dies_mid_turn_is_restarted_once(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        end, _ = await run_turn(pod, "crash-once")
    _, second = engine_starts(state)
    session = second["argv"][second["argv"].index("--resume") + 1]
    assert session == (await _session_ids(capd, "cc"))[0]
    assert _prompts(state) == ["crash-once", CONTINUE_PROMPT]
    assert end["result"] == "finished"


async def test_an_engine_that_dies_again_errors_the_turn_clearly(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        end, _ = await run_turn(pod, "crash")
        status = await pod.request({"method": "status"})
    assert end["result"] == "errored"
    error = end["error"]
    assert "\n" not in error
    assert error.startswith("claude-code engine died again after a restart:")
    assert "exited with code 3" in error
    assert "boom, the process fell over" in error
    assert len(engine_starts(state)) == 2
    assert status["status"] == "idle"


async def test_the_engine_process_group_dies_with_its_pod(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        end, _ = await run_turn(pod, "bg")
    assert end["output"] == "started"
    (start,) = engine_starts(state)
    assert group_alive(start["pgid"])
    await daemon_request(capd, {"method": "stop", "name": "cc"})
    await until(lambda: not group_alive(start["pgid"]))


@pytest.mark.own_capd
async def test_a_restarted_capd_resumes_the_engine_session(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
        await pod.request({"method": "run", "text": "slow"})
        await wait_for(pod, is_event("text_delta"))
    (session,) = await _session_ids(capd, "cc")
    pgid = engine_starts(state)[0]["pgid"]
    assert await asyncio.to_thread(capd.signal, 15) == 0
    assert not group_alive(pgid)
    capd.start()
    async with await connect_pod(capd, "cc") as pod:
        status = await pod.request({"method": "status"})
        end, _ = await resume_turn(pod)
    assert status["status"] == "paused"
    _, restarted = engine_starts(state)
    assert restarted["argv"][restarted["argv"].index("--resume") + 1] == session
    assert _prompts(state) == ["hello", "slow", CONTINUE_PROMPT]
    assert end["result"] == "finished"


@pytest.mark.own_capd
async def test_a_session_the_cli_forks_by_itself_replaces_nothing(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "cc", state, engine_extra={"args": ["--fork-session"]})
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
    assert await asyncio.to_thread(capd.signal, 15) == 0
    capd.start()
    async with await connect_pod(capd, "cc") as pod:
        end, _ = await run_turn(pod, "again")
        history = await full_history(pod)
    assert end["result"] == "finished"
    first, forked = [e for e in history if e["event"] == "engine_session"]
    assert first["session_id"] != forked["session_id"]
    assert (forked["replaced"], forked["reason"]) == (None, None)


@pytest.mark.own_capd
async def test_a_cli_dying_at_start_for_another_reason_keeps_its_session(
    capd: CapdProcess, state: Path
) -> None:
    """A usage error after an upgrade, say, is no lost session: once the CLI starts again,
    the pod's session is resumed, not replaced."""
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
    (old,) = await _session_ids(capd, "cc")
    assert await asyncio.to_thread(capd.signal, 15) == 0
    (state / "die-at-start").touch()
    capd.start()
    async with await connect_pod(capd, "cc") as pod:
        failed, _ = await run_turn(pod, "while broken")
        (state / "die-at-start").unlink()
        end, _ = await run_turn(pod, "once mended")
        history = await full_history(pod)
    assert failed["result"] == "errored"
    assert "unknown option" in failed["error"]
    assert (end["result"], end["output"]) == ("finished", "You said: once mended")
    assert [e["session_id"] for e in history if e["event"] == "engine_session"] == [old]
    argv = engine_starts(state)[-1]["argv"]
    assert argv[argv.index("--resume") + 1] == old


@pytest.mark.parametrize("refusal", ["result", "exit"])
@pytest.mark.own_capd
async def test_a_session_claude_cannot_resume_is_replaced_by_a_new_one(
    capd: CapdProcess, state: Path, refusal: str
) -> None:
    """The CLI pruned the session (or it lives under another HOME): `--resume` writes an
    error result and exits 1 (`exit`: exits 1 without a word). The pod goes on in a new
    session, and the history says which session was lost and why."""
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
    (old,) = await _session_ids(capd, "cc")
    assert await asyncio.to_thread(capd.signal, 15) == 0
    (state / "sessions" / old).unlink()
    if refusal == "exit":
        (state / "die-on-resume").touch()
    capd.start()
    sent = await asyncio.to_thread(capctl, capd.runtime_dir, "send", "cc", "hello again")
    async with await connect_pod(capd, "cc") as pod:
        second, _ = await run_turn(pod, "and again")
        history = await full_history(pod)
    _, failed, fresh = engine_starts(state)
    assert failed["argv"][failed["argv"].index("--resume") + 1] == old
    assert "--resume" not in fresh["argv"]
    assert _prompts(state) == ["hello", "hello again", "and again"]
    assert (sent.returncode, sent.stdout.strip()) == (0, "You said: hello again")
    assert (second["result"], second["output"]) == ("finished", "You said: and again")
    first, replacing = [e for e in history if e["event"] == "engine_session"]
    assert (first["replaced"], first["reason"]) == (None, None)
    assert replacing["replaced"] == old
    assert (state / "sessions" / replacing["session_id"]).exists()
    if refusal == "result":
        assert replacing["reason"] == f"No conversation found with session ID: {old}"
    else:
        assert replacing["reason"].startswith("claude-code engine exited with code 1; stderr: ")
    log = await asyncio.to_thread(ok, capd.runtime_dir, "log", "cc")
    reason = replacing["reason"] if refusal == "result" else ""  # the other is cut short
    for shown in (sent.stderr, log):
        assert f"engine session {old} could not be resumed ({reason}" in shown
        assert f"new session {replacing['session_id']}: earlier turns are lost" in shown


async def test_steps_count_the_usage_the_api_reported_at_their_end(
    capd: CapdProcess, state: Path
) -> None:
    """The `assistant` messages carry message_start's output_tokens (1); message_delta has
    the real count."""
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "tool:echo counted")
        history = await full_history(pod)
    tool_step, text_step = [e for e in history if e["event"] == "assistant_message"]
    # The stand-in claude: a tool_use message ends with output_tokens 20; a text one with 3 a chunk.
    assert tool_step["usage"] == {"input_tokens": 10, "output_tokens": 20}
    assert text_step["usage"] == {"input_tokens": 20, "output_tokens": 3}


async def test_a_missing_command_is_refused_at_spawn(capd: CapdProcess, tmp_path: Path) -> None:
    manifest = {"name": "cc", "engine": {"kind": "claude-code", "command": ["no-such-claude"]}}
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, {"method": "spawn", "manifest": manifest})
    assert refused.value.code == "invalid_request"
    assert (
        refused.value.message == "engine claude-code: command no-such-claude is not found on PATH"
    )
    listed = await daemon_request(capd, {"method": "list"})
    assert listed["pods"] == []


async def test_a_child_on_claude_code_reports_to_its_parent(
    capd: CapdProcess, state: Path, tmp_path: Path
) -> None:
    await daemon_request(
        capd,
        {
            "method": "spawn",
            "manifest": {"name": "boss", "model": {"provider": "scripted"}, "cwd": str(tmp_path)},
        },
    )
    async with await connect_pod(capd, "boss") as boss:
        await _spawn(capd, "kid", state, parent=str(capd.pod_socket("boss")), cwd=str(tmp_path))
        async with await connect_pod(capd, "kid", subscribe=False) as kid:
            started = await kid.request({"method": "run", "text": "hi"})
        received, _ = await wait_for(boss, is_event("pod_event_received"))
    report = received["payload"]
    assert report["kind"] == "turn_ended"
    assert (report["pod"], report["turn_id"]) == ("kid", started["turn_id"])
    assert (report["result"], report["output"]) == ("finished", "You said: hi")


async def _session_ids(capd: CapdProcess, name: str) -> list[str]:
    async with await connect_pod(capd, name, subscribe=False) as pod:
        history = await full_history(pod)
    return [e["session_id"] for e in history if e["event"] == "engine_session"]
