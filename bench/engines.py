"""Idle engines: the memory that stopping idle engine processes gives back, and what the
next turn pays for it.

`engine_pods` pods on the Claude Code stand-in (tests/fakes/claude.py, unconfined), one
short turn each, in one capd with `limits.engine_idle_s` huge (the baseline: every
process kept) and in another with it small, measured once every process there has
stopped. Memory is PSS (shared pages split between their processes), summed over capd's
whole process tree from /proc/<pid>/smaps_rollup: the engines are capd's children. The
first figure is the kept engines alone (each from `status.engine.pid` and its children).
Then the resume cost: a pod's turn on a live engine, and after its engine stopped (the
stand-in starts again with `--resume`), `turns` of each, medians.
"""

import sys
import time
from pathlib import Path
from typing import Any

from bench import servers
from bench.report import Figure, median
from bench.sizes import Size
from bench.wire import LineClient

STAND_IN = Path(__file__).resolve().parent.parent / "tests" / "fakes" / "claude.py"
KEPT_S = 3600.0
STOPPED_S = 0.3
STOP_TIMEOUT_S = 30.0


def _pss_kb(pid: int) -> int:
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:  # gone meanwhile
        return 0
    return sum(int(line.split()[1]) for line in lines if line.startswith("Pss:"))


def _tree(root: int) -> list[int]:
    """`root` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _tree_pss_mb(root: int) -> float:
    return sum(_pss_kb(pid) for pid in _tree(root)) / 1024


def _engines(daemon: LineClient) -> list[dict[str, Any]]:
    pods = daemon.request({"id": "list", "method": "list"})["result"]["pods"]
    return [pod["engine"] for pod in pods]


def _turn_ms(pod: Path, text: str) -> float:
    with LineClient(pod) as client:
        client.request({"id": "sub", "method": "subscribe"})
        start = time.perf_counter()
        client.request({"id": "run", "method": "run", "text": text})
        end, at = client.wait_event("turn_end")
    if end["result"] != "finished":
        raise RuntimeError(f"turn {text!r} ended {end['result']}: {end.get('error')}")
    return (at - start) * 1000


def _stopped(daemon: LineClient, reaped: int, first: int | None = None) -> None:
    """Wait until every pod's engine (or the first `first`'s) has stopped `reaped` times."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(e["state"] != "stopped" or e["reaped"] < reaped for e in _engines(daemon)[:first]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"engines not stopped within {STOP_TIMEOUT_S:g} s")
        time.sleep(0.05)


def _fleet(idle_s: float, size: Size) -> tuple[float, float, list[float]]:
    """Spawn the pods, one turn each; the kept engines' PSS, capd's tree's PSS (once the
    engines stopped, when they do) and the times of `turns` more turns on one pod."""
    with servers.capd() as capd, LineClient(capd.socket) as daemon:
        sockets = []
        for i in range(size.engine_pods):
            state = capd.workdir / f"claude-{i}"
            state.mkdir()
            engine = {
                "kind": "claude-code",
                "command": [sys.executable, str(STAND_IN)],
                "env": {"FAKE_CLAUDE_DIR": str(state)},
            }
            reply = daemon.request(
                {
                    "id": f"spawn-{i}",
                    "method": "spawn",
                    "manifest": {
                        "name": f"e{i}",
                        "engine": engine,
                        "cwd": str(capd.workdir),
                        "sandbox": {"mode": "off"},
                        "limits": {"engine_idle_s": idle_s},
                    },
                }
            )
            sockets.append(Path(reply["result"]["socket"]))
            _turn_ms(sockets[-1], "hello")
        stops = idle_s < KEPT_S
        if stops:
            _stopped(daemon, 1)
        engines_mb = sum(_tree_pss_mb(e["pid"]) for e in _engines(daemon) if e["pid"])
        total_mb = _tree_pss_mb(capd.pid)
        turns = []
        for i in range(size.engine_turns):
            if stops:
                _stopped(daemon, i + 1, first=1)
            turns.append(_turn_ms(sockets[0], f"again {i}"))
    return engines_mb, total_mb, turns


def run(size: Size) -> list[Figure]:
    n = size.engine_pods
    kept_engines_mb, kept_mb, live_ms = _fleet(KEPT_S, size)
    _, stopped_mb, resumed_ms = _fleet(STOPPED_S, size)
    return [
        Figure("engines", f"PSS of {n} idle engines kept", kept_engines_mb, "MB", "lower"),
        Figure(
            "engines",
            f"PSS of capd + {n} idle engines, stopped vs kept",
            stopped_mb,
            "MB",
            "lower",
            kept_mb,
        ),
        Figure(
            "engines",
            "turn after the engine stopped vs live, median",
            median(resumed_ms),
            "ms",
            "lower",
            median(live_ms),
        ),
    ]
