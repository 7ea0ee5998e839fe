"""What a program capd runs (an external engine, an MCP server) says on stderr: its latest
output, kept bounded, and the one line of it that says what went wrong."""

import re
from collections import deque

STDERR_KEPT = 64 * 1024
"""Characters of a program's latest stderr kept for error messages."""
STDERR_SHOWN = 500
"""Characters of stderr quoted in an error message."""
FAILURE_LINE = re.compile(
    r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)\b(?::|$)"
    r"|(?:Error|error|fatal|FATAL|panic)(?:\[\w+\])?: )"
)
"""A line that says why a program failed: Python's last exception line, a Node or Rust
`Error: ...`, `TypeError: ...`, `fatal: ...`."""
FRAME_LINE = re.compile(r"^(?:at |File \"|\d+: |Traceback \(|stack backtrace:|note: |\^+$)")
"""A line of a stack trace or its furniture, not a message."""


class StderrTail:
    """The latest STDERR_KEPT characters or so of a program's stderr, in the pieces it
    came in (whole pieces are dropped from the front)."""

    def __init__(self) -> None:
        self._pieces: deque[str] = deque()
        self._size = 0

    def add(self, piece: str) -> None:
        self._pieces.append(piece)
        self._size += len(piece)
        while self._size - len(self._pieces[0]) >= STDERR_KEPT:
            self._size -= len(self._pieces.popleft())

    def text(self) -> str:
        return "".join(self._pieces)

    def summary(self) -> str:
        return stderr_summary(self.text())


def stderr_summary(text: str) -> str:
    """What a dead program's stderr says went wrong, in one line: the last Rust panic
    (with its message, on the next line since Rust 1.73), else the last line that names
    an error (Python's exception, Node's or Rust's `Error: ...`), else its last lines
    without stack frames. A trace's end says nothing, but is most of what is there."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        line = lines[i]
        if "panicked at" in line:
            if line.endswith(":") and i + 1 < len(lines):
                line = f"{line} {lines[i + 1]}"
            return line[:STDERR_SHOWN]
        if FAILURE_LINE.match(line):
            return line[:STDERR_SHOWN]
    messages = [line for line in lines if not FRAME_LINE.match(line)]
    return " | ".join(messages)[-STDERR_SHOWN:]
