"""Optional: the acp engine driving real ACP agents from npm, each against a local model
server: Zed's claude-agent-acp (Claude Code as an ACP agent) on tests/fakes/anthropic_server.py,
and opencode (`opencode acp`) on tests/fakes/openai_server.py.

Each agent runs only when its variable names its executable (CAPD_REAL_CLAUDE_ACP,
CAPD_REAL_OPENCODE); `bash tests/real_acp/install-npm.sh` installs the pinned versions and
prints the lines to export. Every test gives the agent its own HOME (and XDG dirs, and
Claude Code's config dir) in its temporary directory, a dummy key, and the switches that
keep it off the network (no telemetry, update checks or model catalogue), so nothing
leaves 127.0.0.1 and nothing is written outside the test's directories.
"""

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from capd.engines.process import CONTINUE_PROMPT
from tests.conftest import CapdProcess
from tests.engine_scaffold import claude_code_env, groups_with_env, spawn_on_engine, user_texts
from tests.fakes import anthropic_server, openai_server
from tests.fakes.sse_server import HeldReply, SseTestServer
from tests.helpers import (
    connect_pod,
    daemon_request,
    full_history,
    group_alive,
    is_event,
    pause_turn,
    resume_turn,
    run_turn,
    until,
    wait_for,
)
from tests.mcp_servers import McpServerCommands, time_and_everything

MODEL = "test-model"
SMALL_MODEL = "small-model"
"""The model agents use on the side (titles, summaries), with replies of its own."""
API_KEY = "sk-capd-test"
TURN_TIMEOUT_S = 90.0
"""A first turn includes the agent's start (opencode takes several seconds)."""
MARKER = "CAPD_TEST_AGENT_HOME"


@dataclass(frozen=True)
class Agent:
    name: str
    variable: str
    api: str
    """`anthropic` or `openai`: the model server it is given."""

    @property
    def command(self) -> str:
        return os.environ.get(self.variable, "")

    def env(self, home: Path, base_url: str, ask: bool = True) -> dict[str, str]:
        """The engine's environment: everything in `home`, the model at `base_url`.
        `ask`: opencode asks before running bash (Claude Code always does)."""
        home.mkdir()
        if self.api == "anthropic":
            # Manual approval (ACP permission requests) rather than the `auto` mode, whose
            # classifier calls the model and which warns about a non-Anthropic base URL.
            claude_dir = home / ".claude"
            claude_dir.mkdir()
            settings = {"permissions": {"defaultMode": "default"}}
            (claude_dir / "settings.json").write_text(json.dumps(settings))
            return {
                MARKER: str(home),
                **claude_code_env(home, claude_dir, base_url, API_KEY),
                # claude-agent-acp picks the `default` model, which is Sonnet's alias.
                "ANTHROPIC_MODEL": MODEL,
                "ANTHROPIC_DEFAULT_SONNET_MODEL": MODEL,
                "ANTHROPIC_DEFAULT_OPUS_MODEL": MODEL,
                "ANTHROPIC_DEFAULT_HAIKU_MODEL": SMALL_MODEL,
                # claude-agent-acp passes --allow-dangerously-skip-permissions, which the
                # CLI refuses as root (CI runs as root) unless it is told it is sandboxed.
                "IS_SANDBOX": "1",
            }
        provider = {
            "npm": "@ai-sdk/openai-compatible",
            "name": "capd test",
            "options": {"baseURL": base_url, "apiKey": API_KEY},
            "models": {MODEL: {"name": MODEL}, SMALL_MODEL: {"name": SMALL_MODEL}},
        }
        config = {
            "provider": {"capd": provider},
            "model": f"capd/{MODEL}",
            "small_model": f"capd/{SMALL_MODEL}",
            "permission": {"bash": "ask" if ask else "allow"},
            "autoupdate": False,
            "share": "disabled",
        }
        return {
            "HOME": str(home),
            MARKER: str(home),
            **{f"XDG_{kind}_HOME": str(home / kind.lower()) for kind in XDG_KINDS},
            "OPENCODE_CONFIG_CONTENT": json.dumps(config),
            "OPENCODE_DISABLE_MODELS_FETCH": "1",
            "OPENCODE_DISABLE_AUTOUPDATE": "1",
            "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
            "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
            "OPENCODE_DISABLE_SHARE": "1",
        }

    def text(self, pieces: str | list[str], delay_ms: float = 0) -> Any:
        server = anthropic_server if self.api == "anthropic" else openai_server
        return server.TextReply(pieces, delay_ms=delay_ms)

    def calls(self, *calls: tuple[str, str, dict[str, Any]]) -> Any:
        """A reply calling MCP tools, each (server, tool, arguments), by the agent's names
        for them: Claude Code's mcp__<server>__<tool>, opencode's <server>_<tool>."""
        if self.api == "anthropic":
            uses = [anthropic_server.ToolUse(f"mcp__{s}__{t}", a) for s, t, a in calls]
            return anthropic_server.ToolUseReply(uses)
        functions = [openai_server.FunctionCall(f"{s}_{t}", a) for s, t, a in calls]
        return openai_server.ToolCallsReply(functions)

    def bash(self, *commands: str, delay_ms: float = 0) -> Any:
        """A reply calling the agent's shell tool once per command."""
        inputs = [{"command": command, "description": "Runs the command"} for command in commands]
        if self.api == "anthropic":
            uses = [anthropic_server.ToolUse("Bash", arguments) for arguments in inputs]
            return anthropic_server.ToolUseReply(uses, delay_ms=delay_ms)
        calls = [openai_server.FunctionCall("bash", arguments) for arguments in inputs]
        return openai_server.ToolCallsReply(calls, delay_ms=delay_ms)


XDG_KINDS = ("CONFIG", "DATA", "CACHE", "STATE")
AGENTS = [
    Agent("claude-agent-acp", "CAPD_REAL_CLAUDE_ACP", "anthropic"),
    Agent("opencode", "CAPD_REAL_OPENCODE", "openai"),
]


@pytest.fixture(
    params=[
        pytest.param(
            agent,
            id=agent.name,
            marks=pytest.mark.skipif(
                not agent.command,
                reason=f"no {agent.name}: run `bash tests/real_acp/install-npm.sh` and "
                f"export {agent.variable} as it says",
            ),
        )
        for agent in AGENTS
    ]
)
def agent(request: pytest.FixtureRequest) -> Agent:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def server(agent: Agent) -> AsyncIterator[SseTestServer[Any]]:
    kind = anthropic_server.AnthropicTestServer
    if agent.api == "openai":
        kind = openai_server.OpenAITestServer  # type: ignore[assignment]
    async with kind() as srv:
        yield srv


async def _spawn(
    capd: CapdProcess,
    agent: Agent,
    server: SseTestServer[Any],
    tmp_path: Path,
    permission: str = "deny",
    ask: bool = True,
    env: dict[str, str] | None = None,
    **manifest: Any,
) -> Path:
    """A pod on the agent, `env` over its environment; returns its cwd."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    engine = {
        "kind": "acp",
        "command": [agent.command, "acp"] if agent.api == "openai" else [agent.command],
        "env": {**agent.env(tmp_path / "home", server.base_url, ask), **(env or {})},
        "permission": permission,
    }
    manifest.setdefault("sandbox", {"writable": [str(tmp_path / "home")]})  # the agent's state
    await spawn_on_engine(capd, "ag", engine, cwd=str(cwd), **manifest)
    return cwd


def _words(event: dict[str, Any]) -> bool:
    """A text_delta with text (claude-agent-acp starts each reply with an empty one)."""
    return event["event"] == "text_delta" and bool(event["text"])


def _said(requests: list[dict[str, Any]], text: str) -> bool:
    return any(text in said for request in requests for said in user_texts(request))


async def _tool_turn(
    pod: Any, agent: Agent, server: SseTestServer[Any], command: str, then: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    server.enqueue(agent.bash(command), agent.text(then), model=MODEL)
    await pod.request({"method": "run", "text": "make the marker file"})
    return await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)


async def test_a_turn_streams_the_models_reply_and_counts_its_usage(
    capd: CapdProcess, agent: Agent, server: SseTestServer[Any], tmp_path: Path
) -> None:
    server.enqueue(agent.text(["Hel", "lo ", "from the ", "test server"]), model=MODEL)
    await _spawn(capd, agent, server, tmp_path)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "say hello"})
        end, seen = await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "Hello from the test server")
    assert "".join(e["text"] for e in seen if e["event"] == "text_delta") == end["output"]
    (session,) = [e for e in history if e["event"] == "engine_session"]
    assert session["session_id"]
    (step,) = [e for e in history if e["event"] == "assistant_message"]
    # One model call, as the test server counts it: 10 tokens in, 5 out. claude-agent-acp
    # reports the cost at its model's price (usage_update.cost), opencode none.
    usage = step["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (10, 5)
    if agent.api == "anthropic":
        assert usage["cost_usd"] > 0
    else:
        assert usage["cost_usd"] is None
    assert status["usage"] == usage
    assert status["model"] == f"acp/{Path(agent.command).name}"
    assert _said(server.requests_for(MODEL), "say hello")


async def test_an_allowed_tool_call_is_recorded_once_with_its_command(
    capd: CapdProcess, agent: Agent, server: SseTestServer[Any], tmp_path: Path
) -> None:
    cwd = await _spawn(capd, agent, server, tmp_path, permission="allow")
    command = "touch marker && echo made it"
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await _tool_turn(pod, agent, server, command, "Made it.")
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "Made it.")
    assert (cwd / "marker").exists()
    calls = [c for e in history if e["event"] == "assistant_message" for c in e["tool_calls"]]
    (call,) = calls
    assert call["arguments"]["command"] == command
    (result,) = [e for e in history if e["event"] == "tool_result"]
    assert (result["call_id"], result["is_error"]) == (call["id"], False)
    assert "made it" in result["output"]
    # The agent gave the tool's output back to the model.
    assert "made it" in json.dumps(server.requests_for(MODEL)[1]["messages"])


async def test_two_calls_in_one_reply_are_one_step_with_both_commands(
    capd: CapdProcess, agent: Agent, server: SseTestServer[Any], tmp_path: Path
) -> None:
    # opencode not asking, and the reply streamed slowly enough that it runs the first
    # call while the second one's command still streams.
    await _spawn(capd, agent, server, tmp_path, permission="allow", ask=False)
    commands = ["echo one", "sleep 1; echo two"]
    server.enqueue(agent.bash(*commands, delay_ms=30), agent.text("Both ran."), model=MODEL)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "run both"})
        end, _ = await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "Both ran.")
    steps = [e for e in history if e["event"] == "assistant_message" and e["tool_calls"]]
    (step,) = steps
    assert [call["arguments"]["command"] for call in step["tool_calls"]] == commands
    results = [e for e in history if e["event"] == "tool_result"]
    assert sorted(r["call_id"] for r in results) == sorted(c["id"] for c in step["tool_calls"])
    assert history.index(step) < history.index(results[0])


async def test_a_denied_tool_call_does_not_run(
    capd: CapdProcess, agent: Agent, server: SseTestServer[Any], tmp_path: Path
) -> None:
    cwd = await _spawn(capd, agent, server, tmp_path, permission="deny")
    async with await connect_pod(capd, "ag") as pod:
        end, _ = await _tool_turn(pod, agent, server, "touch marker", "Not allowed, then.")
        history = await full_history(pod)
    assert end["result"] == "finished"
    assert not (cwd / "marker").exists()
    calls = [c for e in history if e["event"] == "assistant_message" for c in e["tool_calls"]]
    (call,) = calls
    assert call["arguments"]["command"] == "touch marker"
    (result,) = [e for e in history if e["event"] == "tool_result"]
    assert (result["call_id"], result["is_error"]) == (call["id"], True)


async def test_the_ask_policy_shows_the_question_in_status_until_answered(
    capd: CapdProcess, agent: Agent, server: SseTestServer[Any], tmp_path: Path
) -> None:
    cwd = await _spawn(capd, agent, server, tmp_path, permission="ask")
    server.enqueue(agent.bash("touch marker"), agent.text("Asked."), model=MODEL)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "make the marker file"})
        asked, _ = await wait_for(pod, is_event("permission_request"), TURN_TIMEOUT_S)
        waiting = await pod.request({"method": "status"})
        options = {o["optionId"]: o["kind"] for o in asked["options"]}
        allow_once = next(option for option, kind in options.items() if kind == "allow_once")
        await pod.request(
            {"method": "permission", "request_id": asked["request_id"], "option_id": allow_once}
        )
        end, _ = await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)
        after = await pod.request({"method": "status"})
    assert [q["request_id"] for q in waiting["permissions"]] == [asked["request_id"]]
    assert "reject_once" in options.values()
    assert (end["result"], end["output"]) == ("finished", "Asked.")
    assert (cwd / "marker").exists()
    assert after["permissions"] == []


async def test_cancel_mid_stream_ends_the_turn_and_the_agent_takes_the_next(
    capd: CapdProcess, agent: Agent, server: SseTestServer[Any], tmp_path: Path
) -> None:
    long = agent.text(["word "] * 200, delay_ms=50)
    server.enqueue(long, agent.text("Next one."), model=MODEL)
    await _spawn(capd, agent, server, tmp_path)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "talk for a long time"})
        await wait_for(pod, _words, TURN_TIMEOUT_S)
        await pod.request({"method": "cancel"})
        cancelled, seen = await wait_for(pod, is_event("turn_end"))
        await server.wait_disconnects()
        end, _ = await run_turn(pod, "and now?")
    assert cancelled["result"] == "cancelled"
    partial = next(e for e in seen if e["event"] == "assistant_message")
    assert partial["interrupted"] is True
    assert partial["text"].startswith("word ")
    assert (end["result"], end["output"]) == ("finished", "Next one.")
    assert _said(server.requests_for(MODEL)[-1:], "and now?")


async def test_pause_mid_stream_and_resume_continues_the_turn(
    capd: CapdProcess, agent: Agent, server: SseTestServer[Any], tmp_path: Path
) -> None:
    long = agent.text(["word "] * 200, delay_ms=50)
    server.enqueue(long, agent.text(" and done."), model=MODEL)
    await _spawn(capd, agent, server, tmp_path)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "talk for a long time"})
        await wait_for(pod, _words, TURN_TIMEOUT_S)
        seen = await pause_turn(pod)
        await server.wait_disconnects()
        end, _ = await resume_turn(pod)
    partial = next(e for e in seen if e["event"] == "assistant_message")
    assert partial["interrupted"] is True
    assert (end["result"], end["output"]) == ("finished", partial["text"] + " and done.")
    assert _said(server.requests_for(MODEL)[-1:], CONTINUE_PROMPT)


async def test_a_restarted_capd_loads_the_agents_session(
    capd: CapdProcess, agent: Agent, server: SseTestServer[Any], tmp_path: Path
) -> None:
    replies = (agent.text("The word is kumquat."), agent.text("It was kumquat."))
    server.enqueue(*replies, model=MODEL)
    await _spawn(capd, agent, server, tmp_path)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "remember a word"})
        await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)
    assert await asyncio.to_thread(capd.signal, 15) == 0
    capd.start()
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "which word?"})
        end, _ = await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "It was kumquat.")
    # session/load gave the new agent process the first turn's conversation.
    second = server.requests_for(MODEL)[1]
    assert _said([second], "remember a word")
    assert _said([second], "which word?")
    assert "The word is kumquat." in json.dumps(second["messages"])
    assert sum(e["event"] == "engine_session" for e in history) == 1


async def test_an_agent_killed_mid_turn_is_restarted_and_finishes_the_turn(
    capd: CapdProcess, agent: Agent, server: SseTestServer[Any], tmp_path: Path
) -> None:
    never = asyncio.Event()
    held = HeldReply(agent.text("never sent"), never)
    server.enqueue(held, agent.text("After the restart."), model=MODEL)
    await _spawn(capd, agent, server, tmp_path)
    home = tmp_path / "home"
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "do the thing"})
        await server.wait_requests(1, timeout=TURN_TIMEOUT_S, model=MODEL)
        (group,) = groups_with_env(MARKER, str(home))
        os.killpg(group, signal.SIGKILL)
        end, _ = await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)
        history = await full_history(pod)
        (restarted,) = groups_with_env(MARKER, str(home))
        await daemon_request(capd, {"method": "delete", "name": "ag"})
        await until(lambda: not group_alive(restarted))
    never.set()
    assert (end["result"], end["output"]) == ("finished", "After the restart.")
    assert _said(server.requests_for(MODEL)[1:], "do the thing")
    # The restarted agent loads the session, or, when the killed one had not saved it yet
    # (Claude Code may not have, mid-request: `session/load` says "Resource not found"),
    # capd opens a new one and gives it the prompt again.
    assert sum(e["event"] == "engine_session" for e in history) in (1, 2)
    assert restarted != group


async def test_the_manifests_mcp_servers_run_in_the_agent_and_their_results_come_back(
    capd: CapdProcess,
    agent: Agent,
    server: SseTestServer[Any],
    tmp_path: Path,
    mcp_commands: McpServerCommands,
) -> None:
    """session/new's mcpServers as capd writes them, read by the real agent: it starts
    mcp-server-time and server-everything, the latter with the env value capd expanded,
    and the tools' results go back to the model."""
    token = "capd-mcp-token-4711"
    servers = time_and_everything(mcp_commands)
    server.enqueue(
        agent.calls(
            ("time", "get_current_time", {"timezone": "Europe/Paris"}), ("ev", "get-env", {})
        ),
        agent.text("It is time."),
        model=MODEL,
    )
    await _spawn(
        capd,
        agent,
        server,
        tmp_path,
        permission="allow",
        env={"CAPD_TEST_MCP_TOKEN": token},
        mcp_servers=servers,
    )
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "what time is it in Paris?"})
        end, _ = await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "It is time.")
    answered = json.dumps(server.requests_for(MODEL)[1]["messages"])
    assert "Europe/Paris" in answered
    assert token in answered
    results = [e for e in history if e["event"] == "tool_result"]
    assert [e["is_error"] for e in results] == [False, False]
    shown = {s["name"]: (s["state"], s["managed_by"]) for s in status["mcp"]}
    assert shown == {"time": ("ready", "engine"), "ev": ("ready", "engine")}
