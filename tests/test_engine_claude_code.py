"""The claude-code engine, through a real capd and the stand-in `claude` (tests/fakes/claude.py)."""

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from capd.context import INTERRUPTED_TOOL_OUTPUT
from capd.engines.process import CONTINUE_PROMPT
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.engine_scaffold import (
    STAND_IN_CLAUDE,
    UNCONFINED,
    engine_starts,
    spawn_on_engine,
    stand_in_log,
)
from tests.fakes.claude import (
    COMPACT_UNAVAILABLE,
    COMPACTED_POST_TOKENS,
    COMPACTED_PRE_TOKENS,
    SUMMARY_HEAD,
    TOOL_STOPPED,
)
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


def _steps(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The steps recorded, without the usage-only messages that record what a turn cost."""
    return [
        e for e in history if e["event"] == "assistant_message" and (e["text"] or e["tool_calls"])
    ]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "claude"
    path.mkdir()
    return path


async def test_a_turn_streams_and_records_steps_and_tool_results(
    capd: CapdProcess, state: Path, tmp_path: Path
) -> None:
    await _spawn(
        capd, "cc", state, cwd=str(tmp_path), system_prompt="Be brief.", sandbox=UNCONFINED
    )
    async with await connect_pod(capd, "cc") as pod:
        end, seen = await run_turn(pod, "tool:echo hi from the tool")
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "done")
    assert {"text_delta", "tool_call_start", "tool_call_delta"} <= set(kinds(seen))
    steps = _steps(history)
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
    assert "--mcp-config" not in argv
    assert "--strict-mcp-config" not in argv
    assert status["mcp"] == []
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
    await _spawn(capd, "cc", state, engine_extra={"settle_timeout_s": 0.2}, sandbox=UNCONFINED)
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
    await _spawn(capd, "cc", state, sandbox=UNCONFINED)
    async with await connect_pod(capd, "cc") as pod:
        end, _ = await run_turn(pod, "bg")
    assert end["output"] == "started"
    (start,) = engine_starts(state)
    assert group_alive(start["pgid"])
    await daemon_request(capd, {"method": "stop", "name": "cc"})
    await until(lambda: not group_alive(start["pgid"]))


@pytest.mark.own_capd
async def test_a_restarted_capd_resumes_the_engine_session(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "cc", state, sandbox=UNCONFINED)
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
    # The turn starts a CLI that fails to resume, then a fresh one: under load, slow.
    sent = await asyncio.to_thread(
        capctl, capd.runtime_dir, "send", "cc", "hello again", timeout=30
    )
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
    tool_step, text_step, cost = [e for e in history if e["event"] == "assistant_message"]
    # The stand-in claude: a tool_use message ends with output_tokens 20; a text one with 3 a chunk.
    assert tool_step["usage"] == {"input_tokens": 10, "output_tokens": 20, "cost_usd": None}
    assert text_step["usage"] == {"input_tokens": 20, "output_tokens": 3, "cost_usd": None}
    # Then what the turn cost, as its `result` said (tests/test_budgets.py has more).
    assert (cost["text"], cost["usage"]["input_tokens"], cost["usage"]["output_tokens"]) == (
        "",
        0,
        0,
    )
    assert cost["usage"]["cost_usd"] > 0


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


def _compactions(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in history if e["event"] == "context_compacted"]


def _last_message_seq(history: list[dict[str, Any]], before: int) -> int:
    messages = ("user_message", "notification", "assistant_message", "tool_result")
    return max(e["seq"] for e in history if e["event"] in messages and e["seq"] < before)


async def test_claude_codes_own_compaction_is_recorded(capd: CapdProcess, state: Path) -> None:
    """The CLI compacts by itself mid-turn: its compact_boundary and the summary after it
    become a context_compacted through the turn's messages so far; the turn goes on."""
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
        end, seen = await run_turn(pod, "compact-auto")
        after, _ = await run_turn(pod, "and after")
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "done after compacting")
    (started,) = [e for e in seen if e["event"] == "compaction_started"]
    assert (started["turn_id"], started["trigger"]) == (end["turn_id"], "auto")
    (compacted,) = _compactions(history)
    assert compacted["turn_id"] == end["turn_id"]
    assert compacted["trigger"] == "auto"
    assert compacted["summary"].startswith(SUMMARY_HEAD)
    assert "The user's prompts: hello, compact-auto." in compacted["summary"]
    assert compacted["through_seq"] == _last_message_seq(history, compacted["seq"])
    prompt = next(
        e for e in history if e["event"] == "user_message" and e["text"] == "compact-auto"
    )
    assert compacted["through_seq"] == prompt["seq"]
    assert (compacted["tokens_before"], compacted["tokens_after"]) == (
        COMPACTED_PRE_TOKENS,
        COMPACTED_POST_TOKENS,
    )
    assert kinds(seen, durable_only=True).index("context_compacted") < kinds(
        seen, durable_only=True
    ).index("assistant_message")
    # The summary is the CLI's own context: never sent back as a prompt.
    assert _prompts(state)[-1] == "and after"
    assert after["output"] == "You said: and after"


@pytest.mark.own_capd
async def test_a_turn_resumed_after_a_crash_past_a_compaction_sends_no_summary(
    capd: CapdProcess, state: Path
) -> None:
    """capd dies just after the CLI compacted mid-turn: the summary heads the restored
    context, the newest message of it. It is the CLI's own; the resumed turn's prompt
    only asks it to go on."""
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
        await pod.request({"method": "run", "text": "compact-auto slow"})
        await wait_for(pod, is_event("context_compacted"))
    assert await asyncio.to_thread(capd.signal, 9) == -9
    capd.start()
    async with await connect_pod(capd, "cc") as pod:
        end, _ = await resume_turn(pod)
    assert _prompts(state)[-1] == CONTINUE_PROMPT
    assert end["output"] == f"You said: {CONTINUE_PROMPT}"


async def test_compact_sends_claude_code_its_compact_command(
    capd: CapdProcess, state: Path
) -> None:
    """`compact` on an idle pod: the CLI gets `/compact <instructions>` as its next prompt;
    its compaction is recorded (trigger request) before the ack."""
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "remember kumquat")
        acked = await pod.request({"method": "compact", "instructions": "keep the fruit"})
        _, seen = await wait_for(pod, is_event("context_compacted"))
        history = await full_history(pod)
        end, _ = await run_turn(pod, "which fruit?")
        status = await pod.request({"method": "status"})
    assert acked == {}
    assert _prompts(state) == ["remember kumquat", "/compact keep the fruit", "which fruit?"]
    (started,) = [e for e in seen if e["event"] == "compaction_started"]
    assert (started["turn_id"], started["trigger"]) == (None, "request")
    (compacted,) = _compactions(history)
    assert (compacted["turn_id"], compacted["trigger"]) == (None, "request")
    assert compacted["summary"].startswith(SUMMARY_HEAD)
    assert compacted["summary"].endswith("As asked: keep the fruit")
    assert compacted["through_seq"] == _last_message_seq(history, compacted["seq"])
    assert compacted["tokens_before"] == COMPACTED_PRE_TOKENS
    # The CLI's own words on it are no model step.
    assert [e["event"] for e in history[-1:]] == ["context_compacted"]
    assert end["output"] == "You said: which fruit?"
    assert status["status"] == "idle"
    assert len(engine_starts(state)) == 1


@pytest.mark.own_capd
async def test_compact_after_a_restart_resumes_the_session_to_compact_it(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
    (session,) = await _session_ids(capd, "cc")
    assert await asyncio.to_thread(capd.signal, 15) == 0
    capd.start()
    async with await connect_pod(capd, "cc", subscribe=False) as pod:
        await pod.request({"method": "compact"})
        history = await full_history(pod)
    _, second = engine_starts(state)
    assert second["argv"][second["argv"].index("--resume") + 1] == session
    assert _prompts(state)[-1] == "/compact"
    (event,) = _compactions(history)
    assert "The user's prompts: hello." in event["summary"]
    assert await _session_ids(capd, "cc") == [session]


async def test_compact_before_any_turn_is_refused(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "compact"})
    assert refused.value.code == "invalid_request"
    assert refused.value.message == "claude-code has no session to compact yet; run a turn first"
    assert engine_starts(state) == []


async def test_compact_where_claude_code_offers_no_compact_command_is_refused(
    capd: CapdProcess, state: Path
) -> None:
    """With DISABLE_COMPACT the CLI lists no `compact` in its init and says so if asked;
    a first `compact` (no init seen yet in this process) hears its words, the next one is
    refused without asking."""
    await _spawn(capd, "cc", state, engine_extra={"env": _env(state, DISABLE_COMPACT="1")})
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "compact"})
        history = await full_history(pod)
    assert refused.value.code == "invalid_request"
    assert "offers no /compact" in refused.value.message
    assert _prompts(state) == ["hello"]
    assert _compactions(history) == []


@pytest.mark.own_capd
async def test_what_claude_code_says_instead_of_compacting_is_the_error(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "cc", state, engine_extra={"env": _env(state, DISABLE_COMPACT="1")})
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
    assert await asyncio.to_thread(capd.signal, 15) == 0
    capd.start()
    async with await connect_pod(capd, "cc") as pod:
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "compact"})
        end, _ = await run_turn(pod, "still here")
        history = await full_history(pod)
    assert refused.value.code == "invalid_request"
    assert refused.value.message == f"claude-code did not compact: {COMPACT_UNAVAILABLE}"
    assert _compactions(history) == []
    assert _steps(history)[-1]["text"] == "You said: still here"
    assert end["output"] == "You said: still here"


async def test_pause_stops_a_compaction_and_the_next_turn_goes_on(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
        (state / "slow-compact").touch()
        compacting = asyncio.create_task(pod.request({"method": "compact"}))
        await wait_for(pod, is_event("compaction_started"))
        async with await connect_pod(capd, "cc", subscribe=False) as other:
            await other.request({"method": "pause"})
        with pytest.raises(ProtocolError) as stopped:
            await compacting
        await until(lambda: len(_interrupts(state)) == 1)
        end, _ = await run_turn(pod, "after that")
        history = await full_history(pod)
    assert "stopped by a pause" in stopped.value.message
    assert _compactions(history) == []
    assert end["output"] == "You said: after that"
    assert _prompts(state) == ["hello", "/compact", "after that"]


async def test_compact_while_running_compacts_after_the_turn(
    capd: CapdProcess, state: Path
) -> None:
    """The CLI takes no prompt mid-turn: the compaction waits for the turn's end."""
    await _spawn(capd, "cc", state)
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": "slow:20"})
        await wait_for(pod, is_event("text_delta"))
        acked = await pod.request({"method": "compact", "instructions": "briefly"})
        end, _ = await wait_for(pod, is_event("turn_end"))
        compacted, _ = await wait_for(pod, is_event("context_compacted"))
    assert acked == {}
    assert end["result"] == "finished"
    assert compacted["trigger"] == "request"
    assert _prompts(state) == ["slow:20", "/compact briefly"]


async def test_limits_compact_at_reaches_claude_code_unless_its_env_says_otherwise(
    capd: CapdProcess, state: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    await _spawn(capd, "cc", state, limits={"compact_at": 0.6})
    pinned = _env(other, CLAUDE_AUTOCOMPACT_PCT_OVERRIDE="95")
    await _spawn(capd, "pinned", other, engine_extra={"env": pinned}, limits={"compact_at": 0.6})
    for name in ("cc", "pinned"):
        async with await connect_pod(capd, name) as pod:
            await run_turn(pod, "hello")
    assert [start["pct"] for start in engine_starts(state)] == ["60"]
    assert [start["pct"] for start in engine_starts(other)] == ["95"]


def _env(state: Path, **more: str) -> dict[str, str]:
    return {**STAND_IN_CLAUDE.engine(state)["env"], **more}


@pytest.mark.own_capd
async def test_mcp_servers_reach_claude_code_as_mcp_config_with_their_variables_unexpanded(
    capd_dirs: CapdProcess, state: Path, tmp_path: Path
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    capd_dirs.env = {"CAPD_TEST_MCP_TOKEN": secret}
    capd_dirs.log = tmp_path / "capd.log"
    capd_dirs.start()
    servers = {
        "git": {
            "command": "mcp-server-git",
            "args": ["--repository", "."],
            "env": {"TOKEN": "${CAPD_TEST_MCP_TOKEN}", "PAGER": "${CAPD_TEST_UNSET:-cat}"},
        },
        "docs": {
            "url": "https://mcp.example.com/mcp",
            "headers": {"Authorization": "Bearer ${CAPD_TEST_MCP_TOKEN}"},
        },
        "gone": {"command": "mcp-server-gone", "env": {"KEY": "${CAPD_TEST_MCP_UNSET}"}},
    }
    await _spawn(capd_dirs, "cc", state, mcp_servers=servers)
    async with await connect_pod(capd_dirs, "cc") as pod:
        before = await pod.request({"method": "status"})
        end, _ = await run_turn(pod, "hello")
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    assert end["result"] == "finished"
    assert [(s["name"], s["state"]) for s in before["mcp"]] == [
        ("git", "starting"),
        ("docs", "starting"),
        ("gone", "failed"),
    ]
    (start,) = engine_starts(state)
    argv = start["argv"]
    assert json.loads(argv[argv.index("--mcp-config") + 1]) == start["mcp_config"]
    assert start["strict"] is True
    assert start["mcp_config"] == {
        "mcpServers": {
            "git": {"type": "stdio", **servers["git"]},
            "docs": {"type": "http", **servers["docs"]},
        }
    }
    assert start["mcp_expanded"] == {
        "git": {"TOKEN": secret, "PAGER": "cat"},
        "docs": {"Authorization": f"Bearer {secret}"},
    }
    git, docs, gone = status["mcp"]
    assert git == {
        "name": "git",
        "state": "ready",
        "tools": 1,
        "error": None,
        "transport": "stdio",
        "pid": None,
        "restarts": 0,
        "managed_by": "engine",
    }
    assert (docs["state"], docs["transport"], docs["managed_by"]) == ("ready", "http", "engine")
    assert (gone["state"], gone["tools"]) == ("failed", 0)
    assert "${CAPD_TEST_MCP_UNSET} is not set in capd's environment" in gone["error"]
    for seen in (json.dumps(argv), json.dumps(history), json.dumps(status), capd_dirs.output()):
        assert secret not in seen
