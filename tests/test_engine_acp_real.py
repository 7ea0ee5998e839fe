"""Optional: the acp engine driving a real ACP agent from PyPI, Mistral Vibe's `vibe-acp`,
whose model is the local OpenAI-compatible test server (tests/fakes/openai_server.py).

Skipped unless CAPD_REAL_ACP_AGENT names the `vibe-acp` executable; install the pinned
version with `bash tests/real_acp/install.sh`, which prints the line to export. The agent
gets its own VIBE_HOME (and HOME) in the test's temporary directory: a config.toml with one
OpenAI-compatible provider at the test server, telemetry and update checks off, and a dummy
key, so nothing leaves 127.0.0.1 and nothing is written outside the test's directories.
"""

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from capd.engines.process import CONTINUE_PROMPT, LOST
from tests.conftest import CapdProcess
from tests.engine_scaffold import groups_with_env, spawn_on_engine, user_texts
from tests.fakes.openai_server import FunctionCall, OpenAITestServer, TextReply, ToolCallsReply
from tests.fakes.sse_server import HeldReply
from tests.helpers import (
    alive,
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
from tests.test_activity import activity_feed
from tests.test_engine_reap import engine_stopped

AGENT = os.environ.get("CAPD_REAL_ACP_AGENT", "")
pytestmark = pytest.mark.skipif(
    not AGENT,
    reason="no real ACP agent: run `bash tests/real_acp/install.sh` and export "
    "CAPD_REAL_ACP_AGENT=<path to vibe-acp> to run these",
)

MODEL = "test-model"
API_KEY = "sk-capd-test"
STARTUP_TIMEOUT_S = 60.0
"""The agent's first turn includes its start (a Python process and its Rust runtime)."""


@pytest.fixture
async def server() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as srv:
        yield srv


def _vibe_home(home: Path, base_url: str) -> dict[str, str]:
    """A VIBE_HOME whose only model is `MODEL` at `base_url`; the engine's env for it."""
    home.mkdir()
    (home / "config.toml").write_text(
        f"""active_model = "local"
enable_telemetry = false
enable_update_checks = false
enable_auto_update = false

[[providers]]
name = "capd-test"
api_base = "{base_url}"
api_key_env_var = "CAPD_TEST_API_KEY"
backend = "generic"

[[models]]
name = "{MODEL}"
provider = "capd-test"
alias = "local"
"""
    )
    return {"VIBE_HOME": str(home), "HOME": str(home), "CAPD_TEST_API_KEY": API_KEY}


async def _spawn(
    capd: CapdProcess,
    server: OpenAITestServer,
    tmp_path: Path,
    permission: str = "deny",
    **manifest: Any,
) -> Path:
    """An acp pod on the real agent; returns its cwd."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    engine = {
        "kind": "acp",
        "command": [AGENT],
        "env": _vibe_home(tmp_path / "vibe-home", server.base_url),
        "permission": permission,
    }
    home = {"writable": [str(tmp_path / "vibe-home")]}  # the agent's state: sessions, logs
    await spawn_on_engine(capd, "vibe", engine, cwd=str(cwd), sandbox=home, **manifest)
    return cwd


def _text(events: list[dict[str, Any]], kind: str = "text_delta") -> str:
    return "".join(e["text"] for e in events if e["event"] == kind)


async def _tool_turn(
    pod: Any, server: OpenAITestServer, command: str, then: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    server.enqueue(ToolCallsReply([FunctionCall("bash", {"command": command})]), TextReply(then))
    await pod.request({"method": "run", "text": "make the marker file"})
    return await wait_for(pod, is_event("turn_end"), STARTUP_TIMEOUT_S)


async def test_a_turn_streams_the_models_reply(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    server.enqueue(TextReply(["Hel", "lo ", "from the ", "test server"]))
    await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "vibe") as pod:
        await pod.request({"method": "run", "text": "say hello"})
        end, seen = await wait_for(pod, is_event("turn_end"), STARTUP_TIMEOUT_S)
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "Hello from the test server")
    assert _text(seen) == "Hello from the test server"
    assert sum(e["event"] == "text_delta" for e in seen) >= 2
    (session,) = [e for e in history if e["event"] == "engine_session"]
    assert session["session_id"]
    step = next(e for e in history if e["event"] == "assistant_message")
    assert step["text"] == "Hello from the test server"
    assert status["model"] == "acp/vibe-acp"
    (request,) = server.requests
    assert request["model"] == MODEL
    assert request["stream"] is True
    assert user_texts(request)[-1] == "say hello"
    assert server.headers[0]["authorization"] == f"Bearer {API_KEY}"


async def test_an_allowed_tool_call_runs_and_its_result_is_recorded(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    cwd = await _spawn(capd, server, tmp_path, permission="allow")
    async with await connect_pod(capd, "vibe") as pod:
        end, seen = await _tool_turn(pod, server, "touch marker && echo made it", "Made it.")
    assert (end["result"], end["output"]) == ("finished", "Made it.")
    assert (cwd / "marker").exists()
    start = next(e for e in seen if e["event"] == "tool_call_start")
    step = next(e for e in seen if e["event"] == "assistant_message" and e["tool_calls"])
    (call,) = step["tool_calls"]
    assert call["id"] == start["call_id"]
    assert call["arguments"] == {"command": "touch marker && echo made it"}
    result = next(e for e in seen if e["event"] == "tool_result")
    assert (result["call_id"], result["is_error"]) == (call["id"], False)
    assert result["output"].strip() == "made it"
    assert kinds(seen).index("tool_result") < kinds(seen).index("turn_end")
    # The agent sent the tool's output back to the model.
    tool_message = next(m for m in server.requests[1]["messages"] if m["role"] == "tool")
    assert "made it" in str(tool_message["content"])


async def test_a_denied_tool_call_does_not_run(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    cwd = await _spawn(capd, server, tmp_path, permission="deny")
    async with await connect_pod(capd, "vibe") as pod:
        end, seen = await _tool_turn(pod, server, "touch marker", "Not allowed, then.")
    assert (end["result"], end["output"]) == ("finished", "Not allowed, then.")
    assert not (cwd / "marker").exists()
    result = next(e for e in seen if e["event"] == "tool_result")
    assert result["is_error"] is True
    assert "denied" in result["output"]


async def test_the_ask_policy_puts_the_agents_question_to_the_client(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    cwd = await _spawn(capd, server, tmp_path, permission="ask")
    server.enqueue(
        ToolCallsReply([FunctionCall("bash", {"command": "touch marker"})]), TextReply("Asked.")
    )
    async with await connect_pod(capd, "vibe") as pod:
        await pod.request({"method": "run", "text": "make the marker file"})
        asked, _ = await wait_for(pod, is_event("permission_request"), STARTUP_TIMEOUT_S)
        options = {o["optionId"]: o["kind"] for o in asked["options"]}
        allow_once = next(option for option, kind in options.items() if kind == "allow_once")
        await pod.request(
            {"method": "permission", "request_id": asked["request_id"], "option_id": allow_once}
        )
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert "reject_once" in options.values()
    assert (end["result"], end["output"]) == ("finished", "Asked.")
    assert (cwd / "marker").exists()
    assert "permission_resolved" in kinds(seen)


async def test_cancel_mid_stream_ends_the_turn_and_the_agent_takes_the_next(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    server.enqueue(TextReply(["word "] * 200, delay_ms=50), TextReply("Next one."))
    await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "vibe") as pod:
        await pod.request({"method": "run", "text": "talk for a long time"})
        await wait_for(pod, is_event("text_delta"), STARTUP_TIMEOUT_S)
        await pod.request({"method": "cancel"})
        cancelled, seen = await wait_for(pod, is_event("turn_end"))
        await server.wait_disconnects()
        end, _ = await run_turn(pod, "and now?")
    assert cancelled["result"] == "cancelled"
    partial = next(e for e in seen if e["event"] == "assistant_message")
    assert partial["interrupted"] is True
    assert partial["text"].startswith("word ")
    assert len(partial["text"]) < len("word ") * 200
    assert (end["result"], end["output"]) == ("finished", "Next one.")
    assert user_texts(server.requests[-1])[-1] == "and now?"


async def test_pause_mid_stream_and_resume_continues_the_turn(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    server.enqueue(TextReply(["word "] * 200, delay_ms=50), TextReply(" and done."))
    await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "vibe") as pod:
        await pod.request({"method": "run", "text": "talk for a long time"})
        await wait_for(pod, is_event("text_delta"), STARTUP_TIMEOUT_S)
        seen = await pause_turn(pod)
        await server.wait_disconnects()
        end, _ = await resume_turn(pod)
    partial = next(e for e in seen if e["event"] == "assistant_message")
    assert partial["interrupted"] is True
    assert (end["result"], end["output"]) == ("finished", partial["text"] + " and done.")
    assert user_texts(server.requests[-1])[-1] == CONTINUE_PROMPT


async def test_a_restarted_capd_loads_the_agents_session(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    server.enqueue(TextReply("The word is kumquat."), TextReply("It was kumquat."))
    await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "vibe") as pod:
        await pod.request({"method": "run", "text": "remember a word"})
        await wait_for(pod, is_event("turn_end"), STARTUP_TIMEOUT_S)
    assert await asyncio.to_thread(capd.signal, 15) == 0
    capd.start()
    async with await connect_pod(capd, "vibe") as pod:
        await pod.request({"method": "run", "text": "which word?"})
        end, _ = await wait_for(pod, is_event("turn_end"), STARTUP_TIMEOUT_S)
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "It was kumquat.")
    # session/load gave the new agent process the first turn's conversation.
    second = server.requests[1]
    assert user_texts(second)[-2:] == ["remember a word", "which word?"]
    assistant = [m.get("content") for m in second["messages"] if m["role"] == "assistant"]
    assert "The word is kumquat." in str(assistant)
    assert sum(e["event"] == "engine_session" for e in history) == 1


async def test_an_agent_killed_mid_turn_is_restarted_and_finishes_the_turn(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    never = asyncio.Event()
    server.enqueue(HeldReply(TextReply("never sent"), never), TextReply("After the restart."))
    await _spawn(capd, server, tmp_path)
    vibe_home = tmp_path / "vibe-home"
    async with await connect_pod(capd, "vibe") as pod:
        await pod.request({"method": "run", "text": "do the thing"})
        await server.wait_requests(1, timeout=STARTUP_TIMEOUT_S)
        (group,) = groups_with_env("VIBE_HOME", str(vibe_home))
        os.killpg(group, signal.SIGKILL)
        end, _ = await wait_for(pod, is_event("turn_end"), STARTUP_TIMEOUT_S)
        history = await full_history(pod)
        (restarted,) = groups_with_env("VIBE_HOME", str(vibe_home))
        await daemon_request(capd, {"method": "delete", "name": "vibe"})
        await until(lambda: not group_alive(restarted))
    never.set()
    assert (end["result"], end["output"]) == ("finished", "After the restart.")
    # The restarted agent loaded its session, which has the user's request.
    assert user_texts(server.requests[1])[0] == "do the thing"
    assert sum(e["event"] == "engine_session" for e in history) == 1
    assert restarted != group


async def test_an_idle_agent_stops_and_the_next_turn_loads_its_session(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    """docs/protocol.md "Idle engines": the agent stops after limits.engine_idle_s (it
    loads sessions); the next turn's `session/load` sends the model the first turn too."""
    server.enqueue(TextReply("Noted."), TextReply("It was 42."))
    await _spawn(capd, server, tmp_path, limits={"engine_idle_s": 0.5})
    async with await activity_feed(capd) as feed, await connect_pod(capd, "vibe") as pod:
        await pod.request({"method": "run", "text": "remember 42"})
        first, _ = await wait_for(pod, is_event("turn_end"), STARTUP_TIMEOUT_S)
        pid = (await pod.request({"method": "status"}))["engine"]["pid"]
        await wait_for(feed, engine_stopped("vibe"), STARTUP_TIMEOUT_S)
        await pod.request({"method": "run", "text": "what was it?"})
        second, _ = await wait_for(pod, is_event("turn_end"), STARTUP_TIMEOUT_S)
        history = await full_history(pod)
    assert (first["result"], second["output"]) == ("finished", "It was 42.")
    assert not alive(pid)
    assert len([e for e in history if e["event"] == "engine_session"]) == 1
    texts = user_texts(server.requests[-1])
    assert "remember 42" in texts
    assert texts[-1] == "what was it?"


async def test_an_idle_agent_whose_session_is_gone_primes_the_new_one(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    """As when the agent's session store does not persist: after the stop, its
    `session/load` fails, and the new session's prompt carries the first turn."""
    server.enqueue(TextReply("Noted."), TextReply("It was 42."))
    await _spawn(capd, server, tmp_path, limits={"engine_idle_s": 0.5})
    async with await activity_feed(capd) as feed, await connect_pod(capd, "vibe") as pod:
        await pod.request({"method": "run", "text": "remember 42"})
        await wait_for(pod, is_event("turn_end"), STARTUP_TIMEOUT_S)
        await wait_for(feed, engine_stopped("vibe"), STARTUP_TIMEOUT_S)
        shutil.rmtree(tmp_path / "vibe-home" / "logs" / "session")
        await pod.request({"method": "run", "text": "what was it?"})
        second, _ = await wait_for(pod, is_event("turn_end"), STARTUP_TIMEOUT_S)
        history = await full_history(pod)
    first, replacing = [e for e in history if e["event"] == "engine_session"]
    assert replacing["replaced"] == first["session_id"]
    (prompt,) = [t for t in user_texts(server.requests[-1]) if "what was it?" in t]
    assert prompt.startswith(f"[capd: {LOST}")
    assert "remember 42" in prompt
    assert second["output"] == "It was 42."
