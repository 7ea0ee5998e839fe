"""The overhead of an MCP tool call through capd (issue 18).

A scripted pod calls server-everything's `echo` once a step; each call is timed from its
`assistant_message` (the model asked for the call) to its `tool_result`, as a client of
the pod sees them. The baseline is the same server called directly with the MCP SDK in
the same run (`mcp.Client` over stdio, `call_tool` round trips). For context, the same
through capd with `bash {command: "true"}`, which forks a shell per call.

The three run in alternating blocks (a turn of calls each), so that a machine busier in
one part of the run weighs on all of them alike.
"""

import asyncio
import os
import time
from pathlib import Path
from typing import Any, TextIO

from bench import servers
from bench.report import Figure, median, percentile
from bench.sizes import Size
from bench.wire import LineClient
from tests.mcp_servers import McpServerCommands, install

BLOCK = 50
"""Calls in a row of one kind before the next kind's."""
WARM_UP = 3
"""Calls not counted, of each kind: the first pay for imports, JIT and caches."""
READY_TIMEOUT_S = 60.0
MESSAGE = "hello from the benchmark"
ECHO = {"name": "mcp__everything__echo", "arguments": {"message": MESSAGE}}
BASH = {"name": "bash", "arguments": {"command": "true"}}


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


def _spawn_caller(
    daemon: LineClient, name: str, call: dict[str, Any], turns: list[int], **manifest: Any
) -> Path:
    """A pod whose turns make `call` as many times as `turns` says, one call a step."""
    steps: list[dict[str, Any]] = []
    for calls in turns:
        steps += [{"tool_calls": [call]}] * calls + [{"text": "done"}]
    limits = {"max_steps": max(turns) + 2}
    return servers.spawn(daemon, name, servers.scripted(*steps), limits=limits, **manifest)


def _turn_ms(pod: LineClient, calls: int, answer: str) -> list[float]:
    """Run one turn of `calls` calls, each answering `answer`; milliseconds from each
    `assistant_message` to its `tool_result`."""
    pod.send({"id": "run", "method": "run", "text": "go"})  # events may precede its ack
    samples = []
    for _ in range(calls):
        _, asked = pod.wait_event("assistant_message")
        result, answered = pod.wait_event("tool_result")
        if result["is_error"] or answer not in result["output"]:
            raise RuntimeError(f"{result['name']} failed: {result['output']}")
        samples.append((answered - asked) * 1000)
    pod.wait_event("turn_end")
    return samples


async def _direct_block_ms(client: Any, calls: int) -> list[float]:
    """Milliseconds per `echo` call made with the SDK straight to the server."""
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        result = await client.call_tool("echo", {"message": MESSAGE})
        samples.append((time.perf_counter() - start) * 1000)
        if result.is_error or MESSAGE not in str(result.content):
            raise RuntimeError(f"echo failed: {result.content}")
    return samples


async def _measure(
    commands: McpServerCommands, blocks: list[int], errlog: TextIO
) -> tuple[list[float], list[float], list[float]]:
    """Per-call milliseconds: the SDK directly, `echo` through capd, `bash true` through
    capd. The capd parts block this loop while they run; the SDK's client is idle then."""
    # 2-3 s to import: only when measured.
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    args = [*commands.everything[1:], "stdio"]
    server = StdioServerParameters(command=commands.everything[0], args=args)
    turns = [WARM_UP, *blocks]
    direct: list[float] = []
    echo: list[float] = []
    shell: list[float] = []
    with servers.capd() as capd, LineClient(capd.socket) as daemon:
        everything = {"command": commands.everything[0], "args": args}
        mcp_pod = _spawn_caller(daemon, "mcp", ECHO, turns, mcp_servers={"everything": everything})
        bash_pod = _spawn_caller(daemon, "bash", BASH, turns, tools=["bash"])
        async with Client(stdio_client(server, errlog=errlog)) as client:
            with (
                LineClient(mcp_pod, timeout_s=READY_TIMEOUT_S) as mcp,
                LineClient(bash_pod, timeout_s=READY_TIMEOUT_S) as bash,
            ):
                _wait_ready(mcp, "everything")
                for pod in (mcp, bash):
                    pod.request({"id": "sub", "method": "subscribe"})
                for i, calls in enumerate(turns):
                    counted = i > 0
                    sample = await _direct_block_ms(client, calls)
                    direct += sample if counted else []
                    sample = _turn_ms(mcp, calls, MESSAGE)
                    echo += sample if counted else []
                    sample = _turn_ms(bash, calls, "")
                    shell += sample if counted else []
    return direct, echo, shell


def run(size: Size) -> list[Figure]:
    commands = install()
    full, rest = divmod(size.mcp_calls, BLOCK)
    blocks = [BLOCK] * full + ([rest] if rest else [])
    with open(os.devnull, "w") as quiet:  # the server's banner on stderr
        direct, echo, shell = asyncio.run(_measure(commands, blocks, quiet))
    direct_median = median(direct)
    return [
        Figure("mcp", "echo via capd, median", median(echo), "ms", "lower", direct_median),
        Figure(
            "mcp",
            "echo via capd, p99",
            percentile(echo, 0.99),
            "ms",
            "lower",
            percentile(direct, 0.99),
        ),
        Figure("mcp", "bash true via capd, median", median(shell), "ms", "lower", direct_median),
    ]
