"""A see-through stdio wrapper around a real MCP server, so that a test can tell when the
server is executing a call before it pauses, cancels, stops or kills something.

    python mcp_tap.py LOG COMMAND [ARG...]

runs COMMAND (in this process group, so whoever kills the group kills both) and copies
JSON lines both ways. Each message from the client is appended to LOG as its method once
it has been written to the server (`tools/call <tool>` for a call). A call without a
progress token gets one of the tap's own; the server's first progress notification for
it is logged as `executing <tool>` and the tap's progress notifications are not passed on:
the client sees the messages it would see without the tap.
"""

import json
import subprocess
import sys
import threading
from typing import IO, Any

TOKEN_PREFIX = "capd-test-tap-"


class Tap:
    def __init__(self, log: IO[str], server: subprocess.Popen[bytes]) -> None:
        self._log = log
        self._server = server
        self._tools: dict[str, str] = {}
        """The tap's progress tokens → the tool called, until its first progress."""
        self._lock = threading.Lock()

    def note(self, line: str) -> None:
        with self._lock:
            self._log.write(line + "\n")
            self._log.flush()

    def to_server(self) -> None:
        assert self._server.stdin is not None
        for raw in sys.stdin.buffer:
            message: dict[str, Any] = json.loads(raw)
            method = message.get("method", "response")
            if method == "tools/call":
                tool = message["params"]["name"]
                method = f"tools/call {tool}"
                meta = message["params"].setdefault("_meta", {})
                if "progressToken" not in meta:
                    token = f"{TOKEN_PREFIX}{message['id']}"
                    meta["progressToken"] = token
                    self._tools[token] = tool
                raw = json.dumps(message).encode() + b"\n"
            try:
                self._server.stdin.write(raw)
                self._server.stdin.flush()
            except BrokenPipeError:  # the server died: from_server sees it and exits
                return
            self.note(method)
        self._server.stdin.close()

    def from_server(self) -> None:
        assert self._server.stdout is not None
        for raw in self._server.stdout:
            message: dict[str, Any] = json.loads(raw)
            if message.get("method") == "notifications/progress":
                token = str(message["params"].get("progressToken"))
                if token.startswith(TOKEN_PREFIX):
                    if (tool := self._tools.pop(token, None)) is not None:
                        self.note(f"executing {tool}")
                    continue
            sys.stdout.buffer.write(raw)
            sys.stdout.buffer.flush()


def main() -> None:
    log_path, *command = sys.argv[1:]
    server = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    with open(log_path, "a") as log:
        tap = Tap(log, server)
        threading.Thread(target=tap.to_server, daemon=True).start()
        tap.from_server()  # until the server's stdout closes: it exited
    sys.exit(server.wait())


if __name__ == "__main__":
    main()
