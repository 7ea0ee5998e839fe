"""Test helpers: spawn pods on a real capd and wait on their events with timeouts; run a
built-in tool in-process."""

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from capd.tools import BUILTIN_TOOLS
from capd.tools.base import ToolContext, ToolOutcome
from capd.tools.toolbox import Toolbox
from protocol.client import Client
from tests.conftest import CapdProcess

EVENT_TIMEOUT_S = 10.0
Event = dict[str, Any]


def scripted(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"provider": "scripted", "script": list(steps)}


def sleeper(*then: str) -> dict[str, Any]:
    """A scripted model that runs `sleep 30` (long enough to pause, stop or crash in), then
    says each of `then`."""
    sleep = {"name": "bash", "arguments": {"command": "sleep 30"}}
    return scripted({"tool_calls": [sleep]}, *({"text": text} for text in then))


def slow_text(chars: int = 4000, delay_ms: float = 2) -> dict[str, Any]:
    """A scripted step that streams one character every `delay_ms`."""
    return {"text": "x" * chars, "chunk_chars": 1, "delay_ms": delay_ms}


PS_HEADER = ["NAME", "STATUS", "PARENT", "TOKENS", "COST", "TEAM", "ENGINE", "SOCKET"]
"""The columns of `capctl ps`."""


async def spawn(capd: CapdProcess, name: str, model: dict[str, Any], **manifest: Any) -> Path:
    async with await Client.connect(capd.socket) as daemon:
        result = await daemon.request(
            {"method": "spawn", "manifest": {"name": name, "model": model, **manifest}}
        )
    return Path(result["socket"])


async def connect_pod(capd: CapdProcess, name: str, subscribe: bool = True) -> Client:
    client = await Client.connect(capd.pod_socket(name))
    if subscribe:
        await client.request({"method": "subscribe"})
    return client


async def wait_for(
    client: Client, predicate: Callable[[Event], bool], timeout: float = EVENT_TIMEOUT_S
) -> tuple[Event, list[Event]]:
    """Read events until one matches; returns it and every event read (it included)."""
    seen: list[Event] = []
    while True:
        event = await client.next_event(timeout)
        seen.append(event)
        if predicate(event):
            return event, seen


def is_event(kind: str, **fields: Any) -> Callable[[Event], bool]:
    return lambda e: e.get("event") == kind and all(e.get(k) == v for k, v in fields.items())


def kinds(events: list[Event], durable_only: bool = False) -> list[str]:
    return [e["event"] for e in events if not durable_only or "seq" in e]


async def daemon_request(capd: CapdProcess, request: dict[str, Any]) -> dict[str, Any]:
    """One request on a fresh connection to the daemon socket."""
    async with await Client.connect(capd.socket) as daemon:
        return await daemon.request(request)


async def full_history(pod: Client) -> list[Event]:
    """The pod's whole durable history, page by page."""
    events: list[Event] = []
    while True:
        after = events[-1]["seq"] if events else 0
        page = await pod.request({"method": "history", "after_seq": after, "limit": 500})
        if not page["events"]:
            return events
        events.extend(page["events"])


def rss_bytes(pid: int) -> int:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def until(predicate: Callable[[], bool], timeout: float = EVENT_TIMEOUT_S) -> None:
    """Poll `predicate` (a process's or a file's state, which offers nothing to await)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def sigkill(capd: CapdProcess) -> None:
    """SIGKILL capd and wait for it to be gone."""
    assert capd.proc is not None
    capd.proc.kill()
    await asyncio.to_thread(capd.proc.wait, 10)


def open_turn(history: list[Event]) -> str | None:
    """The turn that started and has not ended, if any."""
    started = None
    for event in history:
        if event["event"] == "turn_start":
            started = event["turn_id"]
        elif event["event"] == "turn_end":
            started = None
    return started


def pids_with_env(name: str, values: set[str]) -> set[int]:
    """The processes whose environment sets `name` to one of `values`."""
    marks = {f"{name}={value}".encode() for value in values}
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marks.intersection((proc / "environ").read_bytes().split(b"\0")):
                pids.add(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def run_turn(pod: Client, text: str) -> tuple[Event, list[Event]]:
    """`run` a turn and wait for its turn_end; the turn_end and every event seen."""
    await pod.request({"method": "run", "text": text})
    return await wait_for(pod, is_event("turn_end"))


async def pause_turn(pod: Client) -> list[Event]:
    """`pause` the running turn; every event seen until the pod says it is paused."""
    await pod.request({"method": "pause"})
    _, seen = await wait_for(pod, is_event("status", status="paused"))
    return seen


async def resume_turn(pod: Client) -> tuple[Event, list[Event]]:
    """`resume` the paused turn and wait for its turn_end; the turn_end and every event seen."""
    await pod.request({"method": "resume"})
    return await wait_for(pod, is_event("turn_end"))


async def run_tool(name: str, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
    """A built-in tool run in-process, from a toolbox that offers them all."""
    return await Toolbox.builtin(BUILTIN_TOOLS, ctx).run(name, arguments)


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def subscribed_two_ways(
    daemon_socket: Path, own: Client, pod: str
) -> tuple[Event, list[Event], list[Event]]:
    """Subscribe to `pod` from seq 0 through the daemon socket (read as raw lines: frames
    as sent) and on `own`, a connection to its own socket; queue two more turns after the
    one it ran; read both until the third turn_end. Returns the daemon's ack, what `own`
    saw and what came through the daemon; `own` is closed."""
    reader, writer = await asyncio.open_unix_connection(str(daemon_socket), limit=1 << 24)
    try:
        await reader.readline()  # hello
        request = {"method": "subscribe", "pod": pod, "after_seq": 0, "id": "s"}
        writer.write(orjson.dumps(request) + b"\n")
        ack = await read_frame(reader)
        await own.request({"method": "subscribe", "after_seq": 0})
        for text in ("two", "three"):
            await own.request({"method": "run", "text": text, "if_busy": "queue"})
        seen = await _until_turn_end(lambda: own.next_event(EVENT_TIMEOUT_S), 3)
        relayed = await _until_turn_end(lambda: read_frame(reader), 3)
    finally:
        writer.close()
        await own.close()
    return ack, seen, relayed


async def read_frame(reader: asyncio.StreamReader) -> Event:
    return orjson.loads(await asyncio.wait_for(reader.readline(), EVENT_TIMEOUT_S))


async def _until_turn_end(next_event: Callable[[], Awaitable[Event]], turns: int) -> list[Event]:
    """Events until the `turns`-th turn_end, it included."""
    seen: list[Event] = []
    while sum(event["event"] == "turn_end" for event in seen) < turns:
        seen.append(await next_event())
    return seen
