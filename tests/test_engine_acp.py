"""The acp engine, through a real capd and an ACP agent built on the official SDK
(tests/fakes/acp_agent.py), each a real subprocess."""

import asyncio
import json
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from capd.engines.process import CONTINUE_PROMPT
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.engine_scaffold import (
    STAND_IN_ACP_AGENT,
    UNCONFINED,
    engine_starts,
    spawn_on_engine,
    stand_in_log,
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

pytestmark = pytest.mark.shared_capd


async def _spawn(
    capd: CapdProcess, name: str, state: Path, permission: str = "deny", **manifest: Any
) -> None:
    engine = STAND_IN_ACP_AGENT.engine(state, permission=permission)
    await spawn_on_engine(capd, name, engine, **manifest)


def _calls(state: Path, call: str) -> list[dict[str, Any]]:
    return [entry for entry in stand_in_log(state) if entry.get("call") == call]


def _prompts(state: Path) -> list[str]:
    return [entry["texts"][-1] for entry in _calls(state, "prompt")]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "acp"
    path.mkdir()
    return path


async def test_a_turn_opens_a_session_and_streams_text_and_thoughts(
    capd: CapdProcess, state: Path, tmp_path: Path
) -> None:
    await _spawn(capd, "ag", state, cwd=str(tmp_path), system_prompt="Be brief.")
    async with await connect_pod(capd, "ag") as pod:
        end, seen = await run_turn(pod, "hello")
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "You said: hello")
    assert "".join(e["text"] for e in seen if e["event"] == "thinking_delta") == "hmm"
    deltas = [e["text"] for e in seen if e["event"] == "text_delta"]
    assert "".join(deltas) == "You said: hello"
    assert all(deltas), "an empty chunk is no delta"
    step = next(e for e in history if e["event"] == "assistant_message")
    assert step["thinking"] == [{"text": "hmm", "signature": "", "redacted": ""}]
    (init,) = _calls(state, "initialize")
    assert init["protocolVersion"] == 1
    assert init["capabilities"]["fs"] == {"readTextFile": False, "writeTextFile": False}
    assert init["capabilities"]["terminal"] is False
    (new,) = _calls(state, "new_session")
    assert (new["cwd"], new["mcpServers"]) == (str(tmp_path), [])
    (prompt,) = _calls(state, "prompt")
    assert prompt["texts"] == ["Be brief.", "hello"]
    assert [e["session_id"] for e in history if e["event"] == "engine_session"] == [new["id"]]
    assert status["model"] == f"acp/{Path(sys.executable).name}"


async def test_allowed_tool_calls_are_recorded_with_their_results(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state, permission="allow")
    async with await connect_pod(capd, "ag") as pod:
        end, seen = await run_turn(pod, "tool:echo hi from the tool")
    assert (end["result"], end["output"]) == ("finished", "done")
    start = next(e for e in seen if e["event"] == "tool_call_start")
    step = next(e for e in seen if e["event"] == "assistant_message")
    (call,) = step["tool_calls"]
    assert (call["id"], call["name"]) == (start["call_id"], "Run a command")
    assert call["arguments"] == {"command": "echo hi from the tool"}
    result = next(e for e in seen if e["event"] == "tool_result")
    assert (result["call_id"], result["output"], result["is_error"]) == (
        call["id"],
        "hi from the tool",
        False,
    )
    (answer,) = _calls(state, "permission_answer")
    assert answer["outcome"] == {"outcome": "selected", "optionId": "allow"}


async def test_the_deny_policy_rejects_tool_calls(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        end, seen = await run_turn(pod, "tool:echo never")
    result = next(e for e in seen if e["event"] == "tool_result")
    assert (result["output"], result["is_error"]) == ("denied", True)
    assert (end["result"], end["output"]) == ("finished", "not allowed")
    assert _calls(state, "permission_answer")[0]["outcome"]["optionId"] == "reject"


async def test_the_ask_policy_asks_the_clients(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "ag", state, permission="ask")
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "tool:echo asked"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
        with pytest.raises(ProtocolError) as refused:
            await pod.request(
                {"method": "permission", "request_id": asked["request_id"], "option_id": "maybe"}
            )
        await pod.request(
            {"method": "permission", "request_id": asked["request_id"], "option_id": "allow"}
        )
        resolved, _ = await wait_for(pod, is_event("permission_resolved"))
        end, seen = await wait_for(pod, is_event("turn_end"))
        with pytest.raises(ProtocolError) as stale:
            await pod.request({"method": "permission", "request_id": asked["request_id"]})
    assert "seq" in asked
    assert asked["tool_call"]["toolCallId"].startswith("call-")
    assert [o["optionId"] for o in asked["options"]] == ["allow", "reject"]
    assert refused.value.code == "invalid_request"
    assert resolved["option_id"] == "allow"
    assert next(e for e in seen if e["event"] == "tool_result")["output"] == "asked"
    assert end["output"] == "done"
    assert stale.value.code == "not_found"


async def test_pause_cancels_the_prompt_and_resume_continues(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "slow"})
        await wait_for(pod, is_event("text_delta"))
        seen = await pause_turn(pod)
        await until(lambda: len(_calls(state, "cancel")) == 1)
        end, _ = await resume_turn(pod)
    partial = next(e for e in seen if e["event"] == "assistant_message")
    assert partial["interrupted"] is True
    assert partial["text"].startswith("tok ")
    assert _prompts(state) == ["slow", CONTINUE_PROMPT]
    assert end["result"] == "finished"
    assert end["output"] == partial["text"] + f"You said: {CONTINUE_PROMPT}"
    assert len(engine_starts(state)) == 1


async def test_pause_while_asking_cancels_the_question(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "ag", state, permission="ask")
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "tool:echo asked"})
        await wait_for(pod, is_event("permission_request"))
        await pod.request({"method": "pause"})
        resolved, _ = await wait_for(pod, is_event("permission_resolved"))
        await pod.request({"method": "cancel"})
        end, seen = await wait_for(pod, is_event("turn_end"))
        after, _ = await run_turn(pod, "hello")
    assert resolved["option_id"] is None
    assert _calls(state, "permission_answer")[0]["outcome"]["outcome"] == "cancelled"
    closed = next(e for e in seen if e["event"] == "tool_result")
    assert "interrupted" in closed["output"]
    assert end["result"] == "cancelled"
    assert after["output"] == "You said: hello"


async def test_cancel_ends_the_turn_and_the_agent_takes_the_next(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "slow"})
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "cancel"})
        cancelled, _ = await wait_for(pod, is_event("turn_end"))
        end, _ = await run_turn(pod, "hello")
    assert cancelled["result"] == "cancelled"
    assert (end["result"], end["output"]) == ("finished", "You said: hello")


async def test_a_notify_while_running_becomes_the_next_prompt(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "slow:50"})
        first, _ = await wait_for(pod, is_event("turn_start"))
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "notify", "text": "CI is green", "source": "ci"})
        await wait_for(pod, is_event("turn_end", turn_id=first["turn_id"]))
        second, _ = await wait_for(pod, is_event("turn_start"))
        await wait_for(pod, is_event("turn_end"))
    assert second["invoke"] == "notify"
    assert _prompts(state) == ["slow:50", "[notification from ci]\nCI is green"]


async def test_an_agent_that_dies_mid_turn_is_restarted_and_reloads_its_session(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "hello")
        end, seen = await run_turn(pod, "crash-once")
    (new,) = _calls(state, "new_session")
    (load,) = _calls(state, "load_session")
    assert load["id"] == new["id"]
    assert _prompts(state) == ["hello", "crash-once", CONTINUE_PROMPT]
    assert end["result"] == "finished"
    # The replayed history of session/load is not recorded again.
    assert sum(e["event"] == "assistant_message" for e in seen) == 2


async def test_an_agent_that_dies_again_errors_the_turn_clearly(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await run_turn(pod, "crash")
    assert end["result"] == "errored"
    assert end["error"].startswith("acp engine died again after a restart:")
    assert "exited with code 3" in end["error"]
    assert "boom, the process fell over" in end["error"]
    assert "\n" not in end["error"]


async def test_the_agent_process_group_dies_with_its_pod(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "ag", state, sandbox=UNCONFINED)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "bg")
    (start,) = engine_starts(state)
    assert group_alive(start["pgid"])
    await daemon_request(capd, {"method": "delete", "name": "ag"})
    await until(lambda: not group_alive(start["pgid"]))


@pytest.mark.own_capd
async def test_a_restarted_capd_loads_the_agent_session(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "ag", state, sandbox=UNCONFINED)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "hello")
        await pod.request({"method": "run", "text": "slow"})
        await wait_for(pod, is_event("text_delta"))
    assert await asyncio.to_thread(capd.signal, 15) == 0
    assert not group_alive(engine_starts(state)[0]["pgid"])
    capd.start()
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await resume_turn(pod)
    (new,) = _calls(state, "new_session")
    (load,) = _calls(state, "load_session")
    assert load["id"] == new["id"]
    assert _prompts(state) == ["hello", "slow", CONTINUE_PROMPT]
    assert end["result"] == "finished"


async def test_an_agent_not_on_path_is_refused_at_spawn(capd: CapdProcess) -> None:
    manifest = {"name": "ag", "engine": {"kind": "acp", "command": ["no-such-agent", "--acp"]}}
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, {"method": "spawn", "manifest": manifest})
    assert refused.value.code == "invalid_request"
    assert refused.value.message == "engine acp: command no-such-agent is not found on PATH"


async def test_capctl_send_shows_the_question_and_capctl_permission_answers(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state, permission="ask")
    runtime = str(capd.runtime_dir)
    send = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "capctl", "--runtime-dir", runtime, "send", "ag", "tool:echo hi"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert send.stderr is not None
    async with asyncio.timeout(10):
        while b"permission asked" not in (line := await send.stderr.readline()):
            assert line, "capctl send ended without showing the permission request"
    hint = line.decode().split("— ")[-1].split()
    assert hint[:3] == ["capctl", "permission", "ag"]
    answer = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "capctl", "--runtime-dir", runtime, *hint[1:4], "allow"),
        stdout=asyncio.subprocess.PIPE,
    )
    answered, _ = await asyncio.wait_for(answer.communicate(), 10)
    out, _ = await asyncio.wait_for(send.communicate(), 10)
    assert answer.returncode == 0
    assert answered.decode() == f"answered {hint[3]}: allow\n"
    assert send.returncode == 0
    assert out.decode().endswith("done\n")


async def test_a_pause_while_the_agent_starts_keeps_the_prompt_for_resume(
    capd: CapdProcess, state: Path
) -> None:
    (state / "hold-init").touch()
    await _spawn(capd, "ag", state, sandbox=UNCONFINED)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "hello"})
        await until(lambda: bool(_calls(state, "initialize")))
        await pause_turn(pod)
        (state / "hold-init").unlink()
        end, _ = await resume_turn(pod)
    assert _prompts(state) == ["hello"]
    assert (end["result"], end["output"]) == ("finished", "You said: hello")
    first, _ = engine_starts(state)
    await until(lambda: not group_alive(first["pgid"]))


@pytest.mark.own_capd
async def test_a_session_the_agent_lost_is_replaced_and_the_loss_recorded(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "hello")
    assert await asyncio.to_thread(capd.signal, 15) == 0
    for saved in (state / "sessions").iterdir():
        saved.unlink()
    capd.start()
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await run_turn(pod, "again")
        end_next, _ = await run_turn(pod, "and again")
        history = await full_history(pod)
    first, second = (call["id"] for call in _calls(state, "new_session"))
    (load,) = _calls(state, "load_session")
    assert load["id"] == first
    recorded = [e for e in history if e["event"] == "engine_session"]
    assert [(e["session_id"], e["replaced"]) for e in recorded] == [(first, None), (second, first)]
    assert f"no session {first}" in recorded[1]["reason"]
    assert (end["result"], end["output"]) == ("finished", "You said: again")
    assert end_next["result"] == "finished"


@pytest.mark.own_capd
async def test_a_load_refused_until_the_user_logs_in_keeps_the_session(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "hello")
    assert await asyncio.to_thread(capd.signal, 15) == 0
    (state / "load-auth").touch()
    capd.start()
    async with await connect_pod(capd, "ag") as pod:
        refused, _ = await run_turn(pod, "while logged out")
        (state / "load-auth").unlink()
        end, _ = await run_turn(pod, "logged in")
        history = await full_history(pod)
    (new,) = _calls(state, "new_session")
    assert refused["result"] == "errored"
    assert "Authentication required" in refused["error"]
    assert (end["result"], end["output"]) == ("finished", "You said: logged in")
    assert [e["session_id"] for e in history if e["event"] == "engine_session"] == [new["id"]]


async def test_an_agent_dying_as_it_starts_is_started_again(capd: CapdProcess, state: Path) -> None:
    (state / "die-in-init").touch()
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await run_turn(pod, "hello")
    assert len(engine_starts(state)) == 2
    assert _prompts(state) == ["hello"]
    assert (end["result"], end["output"]) == ("finished", "You said: hello")


async def test_an_agent_that_cannot_load_its_session_gets_the_prompt_again(
    capd: CapdProcess, state: Path
) -> None:
    (state / "no-load").touch()
    await _spawn(capd, "ag", state, system_prompt="Be brief.")
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await run_turn(pod, "crash-once")
        history = await full_history(pod)
    assert not _calls(state, "load_session")
    sessions = [call["id"] for call in _calls(state, "new_session")]
    assert len(sessions) == 2
    recorded = [e for e in history if e["event"] == "engine_session"]
    assert [e["session_id"] for e in recorded] == sessions
    assert [e["replaced"] for e in recorded] == [None, sessions[0]]
    assert "cannot load sessions" in recorded[1]["reason"]
    assert [call["texts"] for call in _calls(state, "prompt")] == [["Be brief.", "crash-once"]] * 2
    assert (end["result"], end["output"]) == ("finished", "You said: crash-once")


async def test_an_agent_exiting_while_its_child_holds_its_output_is_restarted(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state, sandbox=UNCONFINED)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "bg")
        end, _ = await run_turn(pod, "crash-once")
    first, _ = engine_starts(state)
    await until(lambda: not group_alive(first["pgid"]))
    assert _prompts(state) == ["bg", "crash-once", CONTINUE_PROMPT]
    assert end["result"] == "finished"


async def test_a_resumed_turn_gets_the_notes_and_then_continue(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "slow"})
        await wait_for(pod, is_event("text_delta"))
        await pause_turn(pod)
        await pod.request({"method": "notify", "text": "CI is green", "source": "ci"})
        end, _ = await resume_turn(pod)
    assert _prompts(state) == ["slow", f"[notification from ci]\nCI is green\n\n{CONTINUE_PROMPT}"]
    assert end["result"] == "finished"


async def test_tool_calls_announced_together_are_one_step(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        end, seen = await run_turn(pod, "pair:echo hi")
    steps = [e for e in seen if e["event"] == "assistant_message"]
    assert [len(step["tool_calls"]) for step in steps] == [2, 0]
    calls = {call["id"] for call in steps[0]["tool_calls"]}
    results = [e for e in seen if e["event"] == "tool_result"]
    assert {r["call_id"] for r in results} == calls
    assert [r["output"] for r in results] == ["hi", "hi"]
    assert kinds(seen, durable_only=True).index("tool_result") > kinds(
        seen, durable_only=True
    ).index("assistant_message")
    assert (end["result"], end["output"]) == ("finished", "done")


async def test_tools_the_agent_stops_on_pause_keep_its_results(
    capd: CapdProcess, state: Path
) -> None:
    running = state / "running"
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": f"pair:touch {running}; sleep 30"})
        await until(running.exists)
        await pod.request({"method": "pause"})
        await wait_for(pod, is_event("tool_result"))
        await wait_for(pod, is_event("tool_result"))
        end, _ = await resume_turn(pod)
        history = await full_history(pod)
    (step,) = [e for e in history if e["event"] == "assistant_message" and e["tool_calls"]]
    results = [e for e in history if e["event"] == "tool_result"]
    assert sorted(r["call_id"] for r in results) == sorted(c["id"] for c in step["tool_calls"])
    assert [(r["output"], r["is_error"]) for r in results] == [("stopped", True)] * 2
    assert _prompts(state)[1] == CONTINUE_PROMPT
    assert end["result"] == "finished"


async def test_an_agent_dying_while_asking_resolves_the_question(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state, permission="ask", sandbox=UNCONFINED)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "tool:echo asked"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
        os.kill(engine_starts(state)[0]["pid"], signal.SIGKILL)
        resolved, _ = await wait_for(pod, is_event("permission_resolved"))
        end, _ = await wait_for(pod, is_event("turn_end"))
        with pytest.raises(ProtocolError) as stale:
            await pod.request({"method": "permission", "request_id": asked["request_id"]})
    assert (resolved["request_id"], resolved["option_id"]) == (asked["request_id"], None)
    assert stale.value.code == "not_found"
    assert len(engine_starts(state)) == 2
    assert end["result"] == "finished"


async def test_a_repeated_tool_call_updates_the_call(capd: CapdProcess, state: Path) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        end, seen = await run_turn(pod, "dup-tool:echo hi")
    starts = [e for e in seen if e["event"] == "tool_call_start"]
    step = next(e for e in seen if e["event"] == "assistant_message")
    (call,) = step["tool_calls"]
    assert [s["call_id"] for s in starts] == [call["id"]]
    assert (call["name"], call["arguments"]) == ("Terminal", {"command": "echo hi"})
    (result,) = [e for e in seen if e["event"] == "tool_result"]
    assert (result["call_id"], result["output"]) == (call["id"], "hi")
    assert (end["result"], end["output"]) == ("finished", "done")


async def test_a_paused_repeated_tool_call_is_interrupted_once(
    capd: CapdProcess, state: Path
) -> None:
    running = state / "running"
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": f"dup-tool:touch {running}; sleep 30"})
        await until(running.exists)
        await pause_turn(pod)
        end, _ = await resume_turn(pod)
        history = await full_history(pod)
    (step,) = [e for e in history if e["event"] == "assistant_message" and e["tool_calls"]]
    (call,) = step["tool_calls"]
    (closed,) = [e for e in history if e["event"] == "tool_result"]
    assert closed["call_id"] == call["id"]
    assert "interrupted" in closed["output"]
    assert end["result"] == "finished"


async def test_a_call_whose_input_comes_in_an_update_records_that_input(
    capd: CapdProcess, state: Path, tmp_path: Path
) -> None:
    await _spawn(capd, "ag", state, cwd=str(tmp_path))
    async with await connect_pod(capd, "ag") as pod:
        end, seen = await run_turn(pod, "late-input:echo late")
    step = next(e for e in seen if e["event"] == "assistant_message")
    (call,) = step["tool_calls"]
    assert call["name"] == "bash"
    assert call["arguments"] == {
        "command": "echo late",
        "description": "Runs it",
        "cwd": str(tmp_path),
    }
    result = next(e for e in seen if e["event"] == "tool_result")
    assert (result["call_id"], result["output"].strip()) == (call["id"], "late")
    assert (end["result"], end["output"]) == ("finished", "done")


@pytest.mark.own_capd
async def test_an_agent_error_gives_its_data_in_the_turn_error_and_the_log(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await run_turn(pod, "rpc-error")
    assert end["result"] == "errored"
    assert end["error"] == (
        "acp: Internal error: Query closed before response received (code -32603)"
    )
    assert await asyncio.to_thread(capd.signal, 15) == 0
    assert "Query closed before response received" in capd.output()


@pytest.mark.own_capd
async def test_an_agent_that_panics_is_reported_by_its_panic_not_its_backtrace(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await run_turn(pod, "rust-panic")
    panic = (
        "thread 'main' panicked at codex-rs/acp/src/main.rs:42:10: called `Result::unwrap()` "
        "on an `Err` value: the model provider refused the API key"
    )
    assert end["result"] == "errored"
    assert end["error"] == (
        f"acp engine died again after a restart: acp engine exited with code 101; stderr: {panic}"
    )
    assert await asyncio.to_thread(capd.signal, 15) == 0
    log = capd.output()
    assert log.count("the model provider refused the API key") >= 2  # both deaths
    assert "stack backtrace:" in log


async def test_the_agents_usage_reports_count_for_the_step_and_the_pod(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "hello")
        _, seen = await run_turn(pod, "tool:echo hi")
        status = await pod.request({"method": "status"})
    steps = [e for e in seen if e["event"] == "assistant_message"]
    # The prompt's usage (20 input, 5 + 3 cached, 10 output) goes with its last step.
    assert [step["usage"] for step in steps] == [
        {"input_tokens": 0, "output_tokens": 0, "cost_usd": None},
        {"input_tokens": 28, "output_tokens": 10, "cost_usd": None},
    ]
    assert status["usage"] == {"input_tokens": 56, "output_tokens": 20, "cost_usd": None}


async def test_usage_reported_after_the_last_step_keeps_the_turns_output(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        end, seen = await run_turn(pod, "quiet-tool:echo hi")
    assert (end["result"], end["output"]) == ("finished", "Running it.")
    steps = [e for e in seen if e["event"] == "assistant_message"]
    assert steps[-1]["usage"] == {"input_tokens": 28, "output_tokens": 10, "cost_usd": None}


async def test_status_shows_the_questions_waiting_for_an_answer(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state, permission="ask")
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "tool:echo asked"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
        waiting = await pod.request({"method": "status"})
        shown = await _capctl(capd, "status", "ag")
        await pod.request(
            {"method": "permission", "request_id": asked["request_id"], "option_id": "allow"}
        )
        await wait_for(pod, is_event("permission_resolved"))
        answered = await pod.request({"method": "status"})
        await wait_for(pod, is_event("turn_end"))
    question = {key: asked[key] for key in ("request_id", "turn_id", "tool_call", "options")}
    assert (waiting["status"], waiting["permissions"]) == ("running", [question])
    assert answered["permissions"] == []
    request_id = asked["request_id"]
    assert "status:      running (waiting for permission)\n" in shown
    assert (
        f"permissions: {request_id}: Run a command; options: allow (allow_once), "
        f"reject (reject_once) — capctl permission ag {request_id} OPTION\n"
    ) in shown


@pytest.mark.own_capd
async def test_a_question_open_when_capd_died_is_resolved_at_restore(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state, permission="ask")
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "tool:echo asked"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
    assert await asyncio.to_thread(capd.signal, signal.SIGKILL) == -signal.SIGKILL
    capd.start()
    async with await connect_pod(capd, "ag") as pod:
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    resolved = [e for e in history if e["event"] == "permission_resolved"]
    assert [(e["request_id"], e["option_id"]) for e in resolved] == [(asked["request_id"], None)]
    assert (status["status"], status["permissions"]) == ("paused", [])


async def _capctl(capd: CapdProcess, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "capctl", "--runtime-dir", str(capd.runtime_dir), *args),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    return out.decode()


async def test_a_step_is_recorded_once_the_input_of_each_call_is_final(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        end, seen = await run_turn(pod, "late-pair:echo both")
    durable = [e for e in seen if "seq" in e and e["event"] in ("assistant_message", "tool_result")]
    assert [e["event"] for e in durable] == [
        "assistant_message",
        "tool_result",
        "tool_result",
        "assistant_message",
    ]
    calls = durable[0]["tool_calls"]
    assert [call["arguments"]["command"] for call in calls] == ["echo both", "echo both"]
    assert [r["call_id"] for r in durable[1:3]] == [call["id"] for call in calls]
    assert (end["result"], end["output"]) == ("finished", "done")


async def test_a_compaction_the_agent_reports_is_recorded(capd: CapdProcess, state: Path) -> None:
    """capd takes ACP's compaction updates: one the agent completes becomes a
    context_compacted (trigger auto) through the turn's messages so far, with the summary
    it streamed; the turn goes on."""
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "hello")
        end, seen = await run_turn(pod, "compact-auto")
        after, _ = await run_turn(pod, "and after")
        history = await full_history(pod)
    (init,) = _calls(state, "initialize")
    assert init["capabilities"]["session"] == {}  # the SDK's model drops `compaction: {}`
    assert (end["result"], end["output"]) == ("finished", "You said: compact-auto")
    (started,) = [e for e in seen if e["event"] == "compaction_started"]
    assert (started["turn_id"], started["trigger"]) == (end["turn_id"], "auto")
    (compacted,) = [e for e in history if e["event"] == "context_compacted"]
    prompt = next(
        e for e in history if e["event"] == "user_message" and e["text"] == "compact-auto"
    )
    assert (compacted["turn_id"], compacted["trigger"]) == (end["turn_id"], "auto")
    assert compacted["summary"] == "The user said hello, then asked to compact."
    assert compacted["through_seq"] == prompt["seq"]
    assert (compacted["tokens_before"], compacted["tokens_after"]) == (0, 0)
    assert _prompts(state)[-1] == "and after"
    assert after["output"] == "You said: and after"


@pytest.mark.parametrize(
    ("how", "recorded"),
    [
        ("compact-silent", ["(The agent compacted its context and showed no summary of it.)"]),
        ("compact-failed", []),
    ],
)
async def test_a_compaction_without_summary_or_failed(
    capd: CapdProcess, state: Path, how: str, recorded: list[str]
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await run_turn(pod, how)
        history = await full_history(pod)
    assert end["output"] == f"You said: {how}"
    assert [e["summary"] for e in history if e["event"] == "context_compacted"] == recorded


async def test_compact_is_refused_saying_the_agent_manages_its_context(
    capd: CapdProcess, state: Path
) -> None:
    await _spawn(capd, "ag", state)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "hello")
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "compact", "instructions": "briefly"})
    assert refused.value.code == "invalid_request"
    assert refused.value.message == (
        "this pod's engine (acp) manages its own context; it cannot compact"
    )
    assert _prompts(state) == ["hello"]


@pytest.mark.own_capd
async def test_mcp_servers_reach_the_agent_in_acp_shapes_with_their_values_expanded(
    capd_dirs: CapdProcess, state: Path, tmp_path: Path
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    capd_dirs.env = {"CAPD_TEST_MCP_TOKEN": secret}
    capd_dirs.log = tmp_path / "capd.log"
    capd_dirs.start()
    server = tmp_path / "bin" / "server"
    server.parent.mkdir()
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    servers = {
        "sh": {"command": "sh", "args": ["-c", "true"], "env": {"TOKEN": "${CAPD_TEST_MCP_TOKEN}"}},
        "own": {"command": "bin/server"},
        "docs": {
            "url": "https://mcp.example.com/mcp",
            "headers": {"Authorization": "Bearer ${CAPD_TEST_MCP_TOKEN}"},
        },
        "gone": {"command": "sh", "env": {"KEY": "${CAPD_TEST_MCP_UNSET}"}},
        "nowhere": {"command": "mcp-server-nowhere"},
    }
    await _spawn(capd_dirs, "ag", state, cwd=str(tmp_path), mcp_servers=servers)
    async with await connect_pod(capd_dirs, "ag") as pod:
        before = await pod.request({"method": "status"})
        await run_turn(pod, "hello")
        first = await pod.request({"method": "status"})
        (state / "mcp-http").touch()
        end, _ = await run_turn(pod, "crash-once")
        second = await pod.request({"method": "status"})
        history = await full_history(pod)
    assert end["result"] == "finished"
    # Before the agent starts, what cannot be handed over already failed; http waits.
    assert [s["state"] for s in before["mcp"]] == [
        "starting",
        "starting",
        "starting",
        "failed",
        "failed",
    ]
    stdio = [
        {
            "name": "sh",
            "command": shutil.which("sh"),
            "args": ["-c", "true"],
            "env": [{"name": "TOKEN", "value": secret}],
        },
        {"name": "own", "command": str(server), "args": [], "env": []},
    ]
    http = {
        "type": "http",
        "name": "docs",
        "url": "https://mcp.example.com/mcp",
        "headers": [{"name": "Authorization", "value": f"Bearer {secret}"}],
    }
    (new,) = _calls(state, "new_session")
    (load,) = _calls(state, "load_session")
    assert new["mcpServers"] == stdio
    assert load["mcpServers"] == [stdio[0], stdio[1], http]
    states = {s["name"]: (s["state"], s["managed_by"], s["error"]) for s in first["mcp"]}
    assert [s["name"] for s in first["mcp"]] == list(servers)
    assert states["sh"] == states["own"] == ("ready", "engine", None)
    assert states["docs"][0] == "failed"
    assert "does not take http MCP servers" in str(states["docs"][2])
    assert "${CAPD_TEST_MCP_UNSET} is not set" in str(states["gone"][2])
    assert "command mcp-server-nowhere is not on PATH" in str(states["nowhere"][2])
    now = {s["name"]: (s["state"], s["transport"]) for s in second["mcp"]}
    assert now["docs"] == ("ready", "http")
    assert [now[name][0] for name in ("sh", "own", "gone", "nowhere")] == [
        "ready",
        "ready",
        "failed",
        "failed",
    ]
    for seen in (json.dumps(history), json.dumps([first, second]), capd_dirs.output()):
        assert secret not in seen
