"""`capctl status POD`: the whole process, start to exit, as a person typing it waits.

Baseline: `python -c pass` with the same interpreter, the floor of any Python command.
Runs alternate between the two.
"""

import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import servers
from bench.report import Figure, median
from bench.sizes import Size
from bench.wire import LineClient


def _wall_ms(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1000


def _capctl() -> list[str]:
    """The installed `capctl` script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("capctl")
    if script.exists():
        return [str(script)]
    found = shutil.which("capctl")
    return [found] if found else [sys.executable, "-m", "capctl"]


def run(size: Size) -> list[Figure]:
    capctl_ms: list[float] = []
    python_ms: list[float] = []
    with servers.capd() as capd:
        with LineClient(capd.socket) as daemon:
            servers.spawn(daemon, "w1", servers.scripted())
        status = [*_capctl(), "--runtime-dir", str(capd.socket.parent), "status", "w1"]
        for _ in range(size.capctl_runs + 1):
            capctl_ms.append(_wall_ms(status))
            python_ms.append(_wall_ms([sys.executable, "-c", "pass"]))
    # The first run of each warms the page cache; it is not what a person waits for.
    return [
        Figure(
            "capctl",
            "capctl status, median",
            median(capctl_ms[1:]),
            "ms",
            "lower",
            median(python_ms[1:]),
            150,
        )
    ]
