"""A builtin pod using a real MCP server (mcp-server-time, from PyPI) through a real capd:
the server comes up, its tools are offered, and calls and errors become tool_results."""

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CapdProcess
from tests.helpers import connect_pod, run_turn, scripted, spawn
from tests.mcp_servers import McpServerCommands

pytestmark = pytest.mark.shared_capd

START_S = 30.0


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
        status: dict[str, Any] = {}

        async def ready() -> bool:
            status.update(await pod.request({"method": "status"}))
            return status["mcp"][0]["state"] == "ready"

        await _until_async(ready)
        [entry] = status["mcp"]
        assert entry["name"] == "time"
        assert entry["tools"] == 2
        assert entry["transport"] == "stdio"
        assert entry["managed_by"] == "capd"
        assert entry["pid"] is not None

        end, seen = await run_turn(pod, "what time is it")
        assert end["result"] == "finished"
        good, bad = [e for e in seen if e["event"] == "tool_result"]
        assert good["name"] == tool
        assert not good["is_error"]
        assert json.loads(good["output"])["timezone"] == "UTC"
        assert bad["is_error"]
        assert "Nowhere/Bad" in bad["output"]


async def _until_async(check: Callable[[], Awaitable[bool]], timeout: float = START_S) -> None:
    """Poll an awaitable condition (a server's state in `status`) until it holds."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)
