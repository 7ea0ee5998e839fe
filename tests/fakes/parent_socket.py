"""A stand-in parent for child pods: a Unix socket that takes `pod_event` requests.

A child's parent is just a socket path (it may belong to another capd), so this plays the
parent's side of the parent reports (docs/protocol.md) and lets a test make it go away,
come back, or take a
report and hang up before acking, the way a crashing parent would.
"""

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import orjson


class ParentSocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.deliveries: list[dict[str, Any]] = []
        """Every report received, duplicates included, in arrival order."""
        self.unexpected: list[dict[str, Any]] = []
        """Frames that were not `pod_event` requests; a test asserts there are none."""
        self.hang_up_before_ack = 0
        """How many of the next reports to take and then close the connection unacked."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        """Go away: stop listening, drop every connection, remove the socket file."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def reports(self) -> list[dict[str, Any]]:
        """Deliveries with duplicates dropped by `event_id`, as a parent pod does."""
        unique: dict[str, dict[str, Any]] = {}
        for report in self.deliveries:
            unique.setdefault(report["event_id"], report)
        return list(unique.values())

    async def wait_reports(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            while len(self.reports()) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.reports()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        hello = {"event": "hello", "protocol": 1, "server": "test parent", "pod": None}
        try:
            writer.write(orjson.dumps(hello) + b"\n")
            while line := await reader.readline():
                frame = orjson.loads(line)
                if frame.get("method") != "pod_event":
                    self.unexpected.append(frame)
                    continue
                self.deliveries.append(frame["event"])
                self._changed.set()
                if self.hang_up_before_ack > 0:
                    self.hang_up_before_ack -= 1
                    return
                ack = {"event": "ack", "id": frame.get("id"), "result": {"buffered": 1}}
                writer.write(orjson.dumps(ack) + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
