"""Every pod's activity over one daemon connection: `subscribe {activity}`, then
`overview`, then the events as they come (docs/protocol.md, Watching many pods).

The connection is read in order, frame by frame, so the overview's snapshot and the
events meet with no gap: events read before its reply are older than it and dropped,
those after it are applied. A `lagged` subscription is resumed the same way.
"""

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protocol.client import LINE_LIMIT
from protocol.errors import ProtocolError
from protocol.framing import decode, encode

Pod = dict[str, Any]


class FeedClosed(Exception):
    """capd closed the connection (it stopped)."""


class Feed:
    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.pods: dict[str, Pod] = {}
        """Each pod's latest pod_activity by name, in creation order."""
        self.resyncs = 0
        """How often the subscription lagged and was resumed with a new overview."""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._lagged = False
        """A `lagged` came while a request waited for its reply."""

    async def connect(self) -> None:
        reader, writer = await asyncio.open_unix_connection(str(self.socket), limit=LINE_LIMIT)
        self._reader, self._writer = reader, writer
        hello = await self._read()
        if hello.get("event") != "hello":
            raise ProtocolError(hello.get("code", "internal"), str(hello.get("message", hello)))
        await self._sync()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    async def follow(self, changed: Callable[[], None]) -> None:
        """Apply events until the connection closes (FeedClosed); `changed` after each."""
        while True:
            event = await self._read()
            if event.get("event") == "lagged":
                self.resyncs += 1
                await self._sync()
            else:
                self.apply(event)
            changed()

    def apply(self, event: dict[str, Any]) -> None:
        name = event.get("pod")
        if not isinstance(name, str):
            return
        pod = self.pods.get(name)
        match event.get("event"):
            case "pod_activity":
                self.pods[name] = event
            case "pod_spawned" if pod is None:
                self.pods[name] = {
                    "pod": name,
                    "status": "idle",
                    "since": time.time(),
                    "socket": event.get("socket"),
                    "parent": event.get("parent"),
                }
            case "pod_status" if pod is not None:
                pod["status"] = event.get("status")
            case "pod_stopped" if pod is not None:
                pod.update(status="stopped", phase=None, tool=None, turn_id=None)
            case "pod_deleted":
                self.pods.pop(name, None)

    async def _sync(self) -> None:
        """Subscribe, then take the overview: what came before its reply is in it. A
        subscription that lags before that reply is taken again."""
        while True:
            self._lagged = False
            await self._request({"method": "subscribe", "activity": True})
            result = await self._request({"method": "overview"})
            if not self._lagged:
                break
            self.resyncs += 1
        self.pods = {pod["pod"]: pod for pod in result.get("pods", [])}

    async def _request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send a request and read up to its reply; the events before it are dropped."""
        assert self._writer is not None
        request_id = f"top{next(self._ids)}"
        self._writer.write(encode({**frame, "id": request_id}))
        await self._writer.drain()
        while True:
            reply = await self._read()
            if reply.get("id") != request_id:
                self._lagged = self._lagged or reply.get("event") == "lagged"
                continue
            if reply.get("event") == "error":
                raise ProtocolError(reply.get("code", "internal"), str(reply.get("message")))
            return reply.get("result") or {}

    async def _read(self) -> dict[str, Any]:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line:
            raise FeedClosed("capd closed the connection")
        frame = decode(line)
        return frame if isinstance(frame, dict) else {}
