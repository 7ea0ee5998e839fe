"""A blocking newline-JSON client: what another process on the machine sees of a socket.

The benchmarks time requests with it rather than with asyncio so that the client adds as
little as possible, and the same for capd and for the baselines.
"""

import socket
import time
from pathlib import Path
from typing import Any

import orjson

RECV_BYTES = 1 << 16


class LineClient:
    def __init__(self, path: Path, timeout_s: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        self._sock.connect(str(path))
        self._buffer = b""
        self.hello = self.read()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "LineClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, frame: dict[str, Any]) -> None:
        self._sock.sendall(orjson.dumps(frame, option=orjson.OPT_APPEND_NEWLINE))

    def send_all(self, frames: list[dict[str, Any]]) -> None:
        """Several requests in one write, as a pipelining client sends them."""
        self._sock.sendall(b"".join(orjson.dumps(f) + b"\n" for f in frames))

    def read_line(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            data = self._sock.recv(RECV_BYTES)
            if not data:
                raise ConnectionError("the server closed the connection")
            self._buffer += data
        line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        return line

    def read(self) -> dict[str, Any]:
        return orjson.loads(self.read_line())

    def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send `frame` and return its reply; events that come first are skipped."""
        self.send(frame)
        while True:
            reply = self.read()
            if reply.get("event") in ("ack", "error") and reply.get("id") == frame.get("id"):
                if reply["event"] == "error":
                    raise RuntimeError(f"{frame['method']}: {reply['code']}: {reply['message']}")
                return reply

    def wait_event(self, kind: str, **fields: Any) -> tuple[dict[str, Any], float]:
        """The next event of `kind` with `fields`, and the perf_counter when it was read."""
        while True:
            event = self.read()
            if event.get("event") == kind and all(event.get(k) == v for k, v in fields.items()):
                return event, time.perf_counter()
