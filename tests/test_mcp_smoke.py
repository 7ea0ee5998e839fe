"""A builtin pod using a real MCP server (mcp-server-time, from PyPI) through a real capd:
the server comes up, its tools are offered, and calls and errors become tool_results."""

import json
from pathlib import Path

import pytest

from tests.conftest import CapdProcess
from tests.helpers import connect_pod, is_event, scripted, spawn, wait_for
from tests.mcp_servers import McpServerCommands

pytestmark = pytest.mark.shared_capd

START_S = 30.0
"""mcp-server-time imports the MCP SDK, as capd does on its first MCP pod: seconds each."""


async def test_a_pod_calls_an_mcp_servers_tools(
    capd: CapdProcess, mcp_commands: McpServerCommands, tmp_path: Path
) -> None:
    tool = "mcp__time__get_current_time"
    model = scripted(
        {
            "tool_calls": [
                {"name": tool, "arguments": {"timezone": "UTC"}},
                {"name": tool, "arguments": {"timezone": "Nowhere/Bad"}},
            ]
        },
        {"text": "done"},
    )
    servers = {"time": {"command": mcp_commands.time[0]}}
    await spawn(capd, "w1", model, cwd=str(tmp_path), tools=[], mcp_servers=servers)
    async with await connect_pod(capd, "w1") as pod:
        # At once: the turn's first step waits for the server's first start.
        await pod.request({"method": "run", "text": "what time is it"})
        end, seen = await wait_for(pod, is_event("turn_end"), timeout=START_S)
        assert end["result"] == "finished"
        good, bad = [e for e in seen if e["event"] == "tool_result"]
        assert good["name"] == tool
        assert not good["is_error"]
        assert json.loads(good["output"])["timezone"] == "UTC"
        assert bad["is_error"]
        assert "Nowhere/Bad" in bad["output"]

        [entry] = (await pod.request({"method": "status"}))["mcp"]
        assert entry["name"] == "time"
        assert entry["state"] == "ready"
        assert entry["tools"] == 2
        assert entry["transport"] == "stdio"
        assert entry["managed_by"] == "capd"
        assert entry["pid"] is not None
