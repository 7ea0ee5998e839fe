"""The terminal helper the TUI tests stand on: it types, sees, waits and reads exit codes."""

import sys
from pathlib import Path

from tests.tmux import Screen

ECHO = """
import sys
print("ready>", flush=True)
for line in sys.stdin:
    if line.strip() == "bye":
        sys.exit(3)
    print("got " + line.strip().upper(), flush=True)
"""


def test_screen_types_waits_and_reads_the_exit_status(tmp_path: Path) -> None:
    with Screen([sys.executable, "-c", ECHO], conf_dir=tmp_path, width=60, height=10) as screen:
        screen.wait_for("ready>")
        screen.type("hello 'quoted' world")
        screen.keys("Enter")
        assert "got HELLO 'QUOTED' WORLD" in screen.wait_for("got HELLO")
        screen.type("bye")
        screen.keys("Enter")
        assert screen.wait_exit() == 3
