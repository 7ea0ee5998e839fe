"""Optional: the claude-code engine driving the real Claude Code CLI from npm, whose model
is the local Anthropic test server (tests/fakes/anthropic_server.py) with scripted replies.

Skipped unless CAPD_REAL_CLAUDE names the `claude` executable; install the pinned version
with `bash tests/real_claude/install.sh`, which prints the line to export. Each pod's CLI
gets its own HOME and CLAUDE_CONFIG_DIR in the test's temporary directory, the test
server as ANTHROPIC_BASE_URL with a dummy key, and its nonessential traffic (telemetry,
error reports, update checks) off, so nothing leaves 127.0.0.1.
"""

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from capd.engines.process import CONTINUE_PROMPT
from tests.conftest import CapdProcess
from tests.engine_scaffold import claude_code_env, spawn_on_engine
from tests.fakes.anthropic_server import AnthropicTestServer, TextReply, ToolUse, ToolUseReply
from tests.helpers import (
    alive,
    connect_pod,
    full_history,
    is_event,
    kinds,
    pause_turn,
    until,
    wait_for,
)
from tests.mcp_servers import McpServerCommands, time_and_everything
from tests.test_activity import activity_feed
from tests.test_engine_reap import engine_stopped

CLAUDE = os.environ.get("CAPD_REAL_CLAUDE", "")
pytestmark = pytest.mark.skipif(
    not CLAUDE,
    reason="no real Claude Code: run `bash tests/real_claude/install.sh` and export "
    "CAPD_REAL_CLAUDE=<path to claude> to run these",
)

API_KEY = "sk-ant-capd-test"
TURN_TIMEOUT_S = 60.0
"""A turn includes the CLI's start (a few seconds) and its own retries."""


@pytest.fixture
async def server() -> AsyncIterator[AnthropicTestServer]:
    async with AnthropicTestServer() as srv:
        yield srv


async def _spawn(
    capd: CapdProcess,
    server: AnthropicTestServer,
    tmp_path: Path,
    allowed: str = "Bash",
    env: dict[str, str] | None = None,
    **manifest: Any,
) -> Path:
    """A claude-code pod on the real CLI, allowed to run `allowed` (Bash), its
    environment `env` over the offline one; returns its cwd."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    offline = claude_code_env(home, tmp_path / "claude-config", server.base_url, API_KEY)
    engine = {
        "kind": "claude-code",
        "command": [CLAUDE],
        "args": ["--allowedTools", allowed],
        "env": {**offline, **(env or {})},
    }
    await spawn_on_engine(capd, "cc", engine, cwd=str(cwd), **manifest)
    return cwd


async def _turn(pod: Any, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    await pod.request({"method": "run", "text": text})
    return await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)


def _texts(request: dict[str, Any], role: str = "user") -> list[str]:
    """The texts of a Messages request's `role` messages, block by block."""
    texts = []
    for message in request["messages"]:
        if message["role"] != role:
            continue
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts += [block["text"] for block in content if block["type"] == "text"]
    return texts


def _sessions(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in history if e["event"] == "engine_session"]


async def test_a_turn_streams_the_models_reply_and_counts_its_usage(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    words = ["Hel", "lo ", "from the ", "test server"]
    server.enqueue(TextReply(words, input_tokens=123, output_tokens=45))
    await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "cc") as pod:
        end, seen = await _turn(pod, "say hello")
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "Hello from the test server")
    assert [e["text"] for e in seen if e["event"] == "text_delta"] == words
    (session,) = _sessions(history)
    assert session["session_id"]
    assert session["replaced"] is None
    step, *cost = [e for e in history if e["event"] == "assistant_message"]
    assert step["text"] == "Hello from the test server"
    # What the CLI's `result` said the turn cost comes after it, if anything.
    assert all(c["text"] == "" and c["usage"]["input_tokens"] == 0 for c in cost)
    # The CLI's `assistant` message says output_tokens 1; message_delta said 45.
    assert step["usage"] == {"input_tokens": 123, "output_tokens": 45, "cost_usd": None}
    assert status["model"] == "claude-code"
    (request,) = server.requests
    assert _texts(request)[-1] == "say hello"
    assert "system" in {m["role"] for m in request["messages"]}
    assert server.headers[0]["x-api-key"] == API_KEY


async def test_a_bash_call_runs_and_its_result_goes_back_to_the_model(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    command = "touch marker && echo made it"
    server.enqueue(
        ToolUseReply([ToolUse("Bash", {"command": command, "description": "make a marker"})]),
        TextReply("Made it."),
    )
    cwd = await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "cc") as pod:
        end, seen = await _turn(pod, "make the marker file")
    assert (end["result"], end["output"]) == ("finished", "Made it.")
    assert (cwd / "marker").exists()
    start = next(e for e in seen if e["event"] == "tool_call_start")
    step = next(e for e in seen if e["event"] == "assistant_message" and e["tool_calls"])
    (call,) = step["tool_calls"]
    assert (call["id"], call["name"]) == (start["call_id"], "Bash")
    assert call["arguments"]["command"] == command
    result = next(e for e in seen if e["event"] == "tool_result")
    assert (result["call_id"], result["output"], result["is_error"]) == (
        call["id"],
        "made it",
        False,
    )
    assert kinds(seen).index("tool_result") < kinds(seen).index("turn_end")
    tool_result = server.requests[1]["messages"][-1]["content"][0]
    assert (tool_result["type"], tool_result["content"]) == ("tool_result", "made it")


async def test_cancel_mid_stream_ends_the_turn_and_the_cli_takes_the_next(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    server.enqueue(TextReply(["word "] * 200, delay_ms=50), TextReply("Next one."))
    await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": "talk for a long time"})
        await wait_for(pod, is_event("text_delta"), TURN_TIMEOUT_S)
        await pod.request({"method": "cancel"})
        cancelled, seen = await wait_for(pod, is_event("turn_end"))
        await server.wait_disconnects()
        end, _ = await _turn(pod, "and now?")
    assert cancelled["result"] == "cancelled"
    partial = next(e for e in seen if e["event"] == "assistant_message")
    assert partial["interrupted"] is True
    assert partial["text"].startswith("word ")
    assert len(partial["text"]) < len("word ") * 200
    assert (end["result"], end["output"]) == ("finished", "Next one.")
    assert _texts(server.requests[-1])[-1] == "and now?"


async def test_pause_mid_stream_and_resume_continues_the_turn(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    server.enqueue(TextReply(["word "] * 200, delay_ms=50), TextReply(" and done."))
    await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": "talk for a long time"})
        await wait_for(pod, is_event("text_delta"), TURN_TIMEOUT_S)
        seen = await pause_turn(pod)
        await server.wait_disconnects()
        await pod.request({"method": "resume"})
        end, _ = await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)
    partial = next(e for e in seen if e["event"] == "assistant_message")
    assert partial["interrupted"] is True
    assert (end["result"], end["output"]) == ("finished", partial["text"] + " and done.")
    assert _texts(server.requests[-1])[-1] == CONTINUE_PROMPT


async def test_pause_during_a_bash_call_keeps_the_clis_word_on_it(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    """The CLI stops the running command and says so in its tool_result; capd records it."""
    command = "touch started; sleep 30; touch finished"
    server.enqueue(
        ToolUseReply([ToolUse("Bash", {"command": command, "description": "wait a while"})]),
        TextReply("Stopped, then."),
    )
    cwd = await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": "run the slow command"})
        await wait_for(pod, is_event("tool_call_start"), TURN_TIMEOUT_S)
        await until(lambda: (cwd / "started").exists(), TURN_TIMEOUT_S)
        await pod.request({"method": "pause"})
        stopped, _ = await wait_for(pod, is_event("tool_result"))
        await pod.request({"method": "resume"})
        end, _ = await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)
        history = await full_history(pod)
    assert stopped["is_error"] is True
    assert stopped["output"].startswith("The user doesn't want to proceed with this tool use.")
    assert [e["output"] for e in history if e["event"] == "tool_result"] == [stopped["output"]]
    assert (end["result"], end["output"]) == ("finished", "Stopped, then.")
    assert not (cwd / "finished").exists()
    assert _texts(server.requests[-1])[-1] == CONTINUE_PROMPT


async def test_a_restarted_capd_resumes_the_clis_session(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    server.enqueue(TextReply("The word is kumquat."), TextReply("It was kumquat."))
    await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "cc") as pod:
        await _turn(pod, "remember a word")
    assert await asyncio.to_thread(capd.signal, 15) == 0
    capd.start()
    async with await connect_pod(capd, "cc") as pod:
        end, _ = await _turn(pod, "which word?")
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "It was kumquat.")
    second = server.requests[1]
    assert "remember a word" in _texts(second)
    assert "The word is kumquat." in _texts(second, "assistant")
    assert _texts(second)[-1] == "which word?"
    assert len(_sessions(history)) == 1


async def test_a_pruned_session_is_replaced_and_the_loss_recorded(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    """Claude Code deletes old transcripts: `--resume` then fails. The pod goes on in a
    new session, which the history records as replacing the lost one, and stays usable."""
    server.enqueue(
        TextReply("The word is kumquat."), TextReply("Which word?"), TextReply("Still here.")
    )
    await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "cc") as pod:
        await _turn(pod, "remember a word")
        (first,) = _sessions(await full_history(pod))
    old = first["session_id"]
    assert await asyncio.to_thread(capd.signal, 15) == 0
    (transcript,) = (tmp_path / "claude-config").glob(f"projects/*/{old}.jsonl")
    transcript.unlink()
    capd.start()
    async with await connect_pod(capd, "cc") as pod:
        end, _ = await _turn(pod, "which word?")
        later, _ = await _turn(pod, "are you there?")
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "Which word?")
    assert (later["result"], later["output"]) == ("finished", "Still here.")
    _, replacing = _sessions(history)
    assert replacing["replaced"] == old
    assert replacing["reason"] == f"No conversation found with session ID: {old}"
    assert replacing["session_id"] != old
    # The new session starts from the turn's prompt: the lost turn is not in it.
    assert "remember a word" not in _texts(server.requests[1])
    assert _texts(server.requests[1])[-1] == "which word?"
    assert _texts(server.requests[2])[-1] == "are you there?"


SUMMARY = "<analysis>short</analysis><summary>The user asked to remember kumquat.</summary>"


async def test_compact_runs_the_clis_compact_command_and_records_its_summary(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    server.enqueue(
        TextReply("The word is kumquat.", input_tokens=5000),
        TextReply(SUMMARY),
        TextReply("It was kumquat."),
    )
    await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "cc") as pod:
        await _turn(pod, "remember a word")
        await pod.request({"method": "compact", "instructions": "keep the word"}, TURN_TIMEOUT_S)
        end, _ = await _turn(pod, "which word?")
        history = await full_history(pod)
    (compacted,) = [e for e in history if e["event"] == "context_compacted"]
    assert compacted["trigger"] == "request"
    assert compacted["summary"].startswith("This session is being continued")
    assert "The user asked to remember kumquat." in compacted["summary"]
    assert compacted["tokens_before"] > 0
    asked = server.requests[1]
    assert _texts(asked)[-1].endswith(
        "Additional Instructions:\nkeep the word\n\nREMINDER: Do NOT call any tools. Respond "
        "with plain text only \u2014 an <analysis> block followed by a <summary> block. Tool "
        "calls will be rejected and you will fail the task."
    )
    assert (end["result"], end["output"]) == ("finished", "It was kumquat.")
    last = _texts(server.requests[2])
    assert last[-1] == "which word?"
    assert "remember a word" not in last


async def test_the_clis_own_compaction_at_limits_compact_at_is_recorded(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    """limits.compact_at 0.5 reaches the CLI: a context past half its window is compacted
    before the next call, and capd records the compaction the CLI reports."""
    server.enqueue(*[TextReply(f"Reply {i}.") for i in range(5)])
    server.enqueue(TextReply("Big one.", input_tokens=600_000), TextReply(SUMMARY))
    server.enqueue(TextReply("It was kumquat."))
    await _spawn(capd, server, tmp_path, limits={"compact_at": 0.5})
    async with await connect_pod(capd, "cc") as pod:
        for i in range(6):
            await _turn(pod, f"prompt {i}")
        end, seen = await _turn(pod, "which word?")
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "It was kumquat.")
    assert [e["trigger"] for e in seen if e["event"] == "compaction_started"] == ["auto"]
    (compacted,) = [e for e in history if e["event"] == "context_compacted"]
    assert (compacted["turn_id"], compacted["trigger"]) == (end["turn_id"], "auto")
    assert "The user asked to remember kumquat." in compacted["summary"]
    assert compacted["tokens_before"] >= 600_000
    assert 0 < compacted["tokens_after"] < compacted["tokens_before"]
    prompt = next(e for e in history if e["event"] == "user_message" and e["text"] == "which word?")
    assert compacted["through_seq"] == prompt["seq"]


async def test_a_rewind_restores_the_files_bash_changed_and_primes_a_new_session(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    """The second turn writes a file through the CLI's own Bash; a rewind to before it
    (with files) removes the file, and the next turn goes to a new session whose first
    prompt carries the first turn, not the second."""
    server.enqueue(
        TextReply("The word is kumquat."),
        ToolUseReply([ToolUse("Bash", {"command": "echo fig > word.txt", "description": "w"})]),
        TextReply("Wrote fig."),
        TextReply("It was kumquat."),
    )
    cwd = await _spawn(capd, server, tmp_path)
    async with await connect_pod(capd, "cc") as pod:
        await _turn(pod, "remember a word")
        second, seen = await _turn(pod, "write another word to word.txt")
        assert "checkpoint" in kinds(seen)
        assert (cwd / "word.txt").read_text() == "fig\n"
        await pod.request({"method": "rewind", "turn_id": second["turn_id"], "files": True})
        rewound, _ = await wait_for(pod, is_event("rewound"))
        end, _ = await _turn(pod, "which word?")
        history = await full_history(pod)
    assert (rewound["files_restored"], rewound["new_session"]) == (True, True)
    assert not (cwd / "word.txt").exists()
    assert (end["result"], end["output"]) == ("finished", "It was kumquat.")
    first, after = _sessions(history)
    assert first["session_id"] != after["session_id"]
    prompt = _texts(server.requests[-1])
    assert prompt[-1].startswith("[capd: this conversation was rewound")
    assert "remember a word" in prompt[-1]
    assert prompt[-1].endswith("which word?")
    assert not [text for text in prompt if "another word" in text]


async def test_the_manifests_mcp_servers_run_in_the_cli_and_their_results_come_back(
    capd: CapdProcess,
    server: AnthropicTestServer,
    tmp_path: Path,
    mcp_commands: McpServerCommands,
) -> None:
    """--mcp-config as capd writes it, read by the real CLI: it starts mcp-server-time and
    server-everything, expands the `${VAR}` capd left in an env value from its own
    environment, and the tools' results go back to the model."""
    token = "capd-mcp-token-4711"
    servers = time_and_everything(mcp_commands)
    server.enqueue(
        ToolUseReply(
            [
                ToolUse("mcp__time__get_current_time", {"timezone": "Europe/Paris"}),
                ToolUse("mcp__ev__get-env", {}),
            ]
        ),
        TextReply("It is time."),
    )
    await _spawn(
        capd,
        server,
        tmp_path,
        allowed="Bash mcp__time mcp__ev",
        env={"CAPD_TEST_MCP_TOKEN": token},
        mcp_servers=servers,
    )
    async with await connect_pod(capd, "cc") as pod:
        end, seen = await _turn(pod, "what time is it in Paris?")
        status = await pod.request({"method": "status"})
    assert (end["result"], end["output"]) == ("finished", "It is time.")
    results = {e["name"]: e for e in seen if e["event"] == "tool_result"}
    clock, env = results["mcp__time__get_current_time"], results["mcp__ev__get-env"]
    assert clock["is_error"] is False
    assert json.loads(clock["output"])["timezone"] == "Europe/Paris"
    assert token in env["output"]
    # The CLI defers MCP tools (tool search): the first request names them, not as tools.
    assert "mcp__time__convert_time" in json.dumps(server.requests[0])
    answered = json.dumps(server.requests[1]["messages"][-1]["content"])
    assert "Europe/Paris" in answered
    shown = {s["name"]: (s["state"], s["managed_by"]) for s in status["mcp"]}
    assert shown == {"time": ("ready", "engine"), "ev": ("ready", "engine")}
    assert {s["name"]: s["tools"] for s in status["mcp"]}["time"] == 2


async def test_an_idle_cli_stops_and_the_next_turn_resumes_its_session(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    """docs/protocol.md "Idle engines": the CLI stops after limits.engine_idle_s; the
    next turn's `--resume` sends the model the first turn too."""
    server.enqueue(TextReply("Noted."), TextReply("It was 42."))
    await _spawn(capd, server, tmp_path, limits={"engine_idle_s": 0.5})
    async with await activity_feed(capd) as feed, await connect_pod(capd, "cc") as pod:
        first, _ = await _turn(pod, "remember 42")
        pid = (await pod.request({"method": "status"}))["engine"]["pid"]
        await wait_for(feed, engine_stopped("cc"), TURN_TIMEOUT_S)
        second, _ = await _turn(pod, "what was it?")
        history = await full_history(pod)
    assert (first["result"], second["output"]) == ("finished", "It was 42.")
    assert not alive(pid)
    assert len(_sessions(history)) == 1
    texts = _texts(server.requests[-1])
    assert "remember 42" in texts
    assert texts[-1] == "what was it?"
