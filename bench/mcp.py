"""The overhead of an MCP tool call through capd (issue 18).

A scripted pod calls server-everything's `echo` once a step; each call is timed from its
`assistant_message` (the model asked for the call) to its `tool_result`, as a client of
the pod sees them. The baseline is the same server called directly with the MCP SDK in
the same run (`mcp.Client` over stdio, `call_tool` round trips). For context, the same
through capd with `bash {command: "true"}`, which forks a shell per call.
"""

import asyncio
import os
import time
from typing import Any, TextIO

from bench import servers
from bench.report import Figure, median, percentile
from bench.sizes import Size
from bench.wire import LineClient
from tests.mcp_servers import McpServerCommands, install

WARM_UP = 3
"""Calls not counted: the first ones pay for imports, JIT and caches on both sides."""
READY_TIMEOUT_S = 60.0
MESSAGE = "hello from the benchmark"


async def _direct_ms(commands: McpServerCommands, calls: int, errlog: TextIO) -> list[float]:
    """Milliseconds per `echo` call made with the SDK straight to a server of its own."""
    # 2-3 s to import: only when measured.
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    server = StdioServerParameters(
        command=commands.everything[0], args=[*commands.everything[1:], "stdio"]
    )
    samples = []
    async with Client(stdio_client(server, errlog=errlog)) as client:
        for _ in range(WARM_UP + calls):
            start = time.perf_counter()
            result = await client.call_tool("echo", {"message": MESSAGE})
            samples.append((time.perf_counter() - start) * 1000)
            if result.is_error:
                raise RuntimeError(f"echo failed: {result.content}")
    return samples[WARM_UP:]


def _wait_ready(pod: LineClient, server: str) -> None:
    """Poll `status` until `server` is ready (status.mcp changes send no event)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        status = pod.request({"id": "status", "method": "status"})["result"]
        state = next(s for s in status["mcp"] if s["name"] == server)
        if state["state"] == "ready":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"MCP server {server} not ready in {READY_TIMEOUT_S:g} s: {state}")
        time.sleep(0.05)


def _through_capd_ms(
    daemon: LineClient, name: str, call: dict[str, Any], calls: int, **manifest: Any
) -> list[float]:
    """Milliseconds from each call's `assistant_message` to its `tool_result`."""
    steps = [{"tool_calls": [call]}] * (WARM_UP + calls) + [{"text": "done"}]
    limits = {"max_steps": len(steps) + 1}
    pod_socket = servers.spawn(daemon, name, servers.scripted(*steps), limits=limits, **manifest)
    samples = []
    with LineClient(pod_socket, timeout_s=READY_TIMEOUT_S) as pod:
        for server in manifest.get("mcp_servers", {}):
            _wait_ready(pod, server)
        pod.request({"id": "sub", "method": "subscribe"})
        pod.send({"id": "run", "method": "run", "text": "go"})  # events may precede its ack
        for _ in range(WARM_UP + calls):
            _, asked = pod.wait_event("assistant_message")
            result, answered = pod.wait_event("tool_result")
            if result["is_error"]:
                raise RuntimeError(f"{call['name']} failed: {result['output']}")
            samples.append((answered - asked) * 1000)
        pod.wait_event("turn_end")
    return samples[WARM_UP:]


def run(size: Size) -> list[Figure]:
    commands = install()
    with open(os.devnull, "w") as quiet:  # the server's banner on stderr
        direct = asyncio.run(_direct_ms(commands, size.mcp_calls, quiet))
    echo = {"name": "mcp__everything__echo", "arguments": {"message": MESSAGE}}
    everything = {"command": commands.everything[0], "args": [*commands.everything[1:], "stdio"]}
    bash = {"name": "bash", "arguments": {"command": "true"}}
    with servers.capd() as capd, LineClient(capd.socket) as daemon:
        through = _through_capd_ms(
            daemon, "mcp", echo, size.mcp_calls, mcp_servers={"everything": everything}
        )
        shell = _through_capd_ms(daemon, "bash", bash, size.mcp_calls, tools=["bash"])
    direct_median = median(direct)
    return [
        Figure("mcp", "echo via capd, median", median(through), "ms", "lower", direct_median),
        Figure(
            "mcp",
            "echo via capd, p99",
            percentile(through, 0.99),
            "ms",
            "lower",
            percentile(direct, 0.99),
        ),
        Figure("mcp", "bash true via capd, median", median(shell), "ms", "lower", direct_median),
    ]
