"""Stopping a pod's MCP server at any point of its start."""

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from capd.tools.base import ToolContext
from capd.tools.mcp.server import McpServer
from capd.tools.toolbox import Toolbox
from protocol.manifest import Limits, McpStdioServer

REFUSER = """
import json, sys
for line in sys.stdin:
    request = json.loads(line)
    if "id" in request:
        error = {"code": -32603, "message": "not today"}
        print(json.dumps({"jsonrpc": "2.0", "id": request["id"], "error": error}), flush=True)
"""
"""A server that answers every request (server/discover, initialize) with an error and
stays up."""


def _refuser(tmp_path: Path) -> McpServer:
    config = McpStdioServer(command=sys.executable, args=["-c", REFUSER])
    return McpServer(
        config=config, name="refuser", pod="p", cwd=tmp_path, state_dir=None, limits=Limits()
    )


async def test_a_stop_while_a_failed_start_is_being_explained_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _refuser(tmp_path)
    explaining = asyncio.Event()
    failure = server._failure

    async def hooked(*args: Any) -> str:
        explaining.set()  # its startup deadline has been left, the process still runs
        return await failure(*args)

    monkeypatch.setattr(server, "_failure", hooked)
    server.start()
    async with asyncio.timeout(30):
        await explaining.wait()
    await server.aclose()
    assert server.status()["state"] == "failed"
    assert server.status()["pid"] is None


async def test_a_server_that_fails_to_stop_does_not_stop_the_others(tmp_path: Path) -> None:
    closed: list[str] = []

    class Server:
        def __init__(self, name: str) -> None:
            self.name = name

        async def aclose(self) -> None:
            if self.name == "broken":
                raise RuntimeError("a bug")
            closed.append(self.name)

    toolbox = Toolbox(ToolContext(cwd=tmp_path, pod="p"))
    toolbox.add_mcp_servers([Server("a"), Server("broken"), Server("b")])  # type: ignore[list-item]
    await toolbox.aclose()
    assert closed == ["a", "b"]
