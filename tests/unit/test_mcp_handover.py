"""What an external engine is handed of a pod's MCP servers, and what status.mcp says of
each: the cases the stand-in engines do not reach (Claude Code's other states, defaults,
a command that is not executable)."""

import json
from pathlib import Path

from pydantic import TypeAdapter

from capd.engines.mcp_handover import HandedServers, acp_servers, claude_code_config
from protocol.manifest import McpServerConfig

SERVERS = TypeAdapter(dict[str, McpServerConfig]).validate_python(
    {
        "a": {"command": "sh", "env": {"PAGER": "${CAPD_UNIT_UNSET:-cat}"}},
        "b": {"url": "http://127.0.0.1:9/mcp"},
        "c": {"command": "./not-executable"},
    }
)


def _states(handed: HandedServers) -> dict[str, tuple[str, int, str | None]]:
    return {s["name"]: (s["state"], s["tools"], s["error"]) for s in handed.status()}


def test_claude_codes_init_sets_each_servers_state_and_tool_count() -> None:
    handed = HandedServers(SERVERS)
    handed.starting({})
    tools = ["Bash", "mcp__a__x", "mcp__a__y", "mcp__ab__z"]
    reported = [
        {"name": "a", "status": "connected"},
        {"name": "b", "status": "needs-auth"},
        {"name": "c", "status": "pending"},
        {"name": "stranger", "status": "connected"},
        "junk",
    ]
    handed.claude_code_reported(reported, tools)
    assert _states(handed) == {
        "a": ("ready", 2, None),
        "b": ("failed", 0, "claude-code reports it needs-auth"),
        "c": ("starting", 0, None),
    }
    handed.claude_code_reported([{"name": "a", "status": "failed", "error": "exited"}], [])
    assert _states(handed)["a"] == ("failed", 0, "claude-code reports it failed: exited")


def test_a_default_fills_an_unset_variable_and_the_config_keeps_the_text() -> None:
    config, left_out = claude_code_config(SERVERS, {})
    assert left_out == {}
    assert json.loads(config)["mcpServers"]["a"]["env"] == {"PAGER": "${CAPD_UNIT_UNSET:-cat}"}
    assert json.loads(config)["mcpServers"]["b"] == {
        "type": "http",
        "url": "http://127.0.0.1:9/mcp",
        "headers": {},
    }


def test_acp_gets_expanded_values_and_a_command_that_is_not_executable_fails(
    tmp_path: Path,
) -> None:
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    servers, left_out = acp_servers(SERVERS, tmp_path, {"PATH": "/usr/bin:/bin"}, True)
    assert [s["name"] for s in servers] == ["a", "b"]
    assert servers[0]["env"] == [{"name": "PAGER", "value": "cat"}]
    assert servers[0]["command"].endswith("/sh")
    assert left_out == {"c": "command ./not-executable is not an executable file in the pod's cwd"}
    handed = HandedServers(SERVERS)
    handed.starting(left_out)
    handed.taken()
    assert {name: state for name, (state, _, _) in _states(handed).items()} == {
        "a": "ready",
        "b": "ready",
        "c": "failed",
    }
