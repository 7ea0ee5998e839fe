"""Metrics: what the hot hooks cost a turn, a model call or a tool call, and what a scrape
costs as the pods grow (capd.metrics).

In process (the hooks' and the writer's own figures):
- `observe`: one histogram observation (a tool call's), against a dict increment (the
  cheapest counter there is), per call.
- `tool call hook`: a tool call through `timed_tool_run` (two clock reads, the label's
  check, the observation), against the same no-op call undecorated.
- `render N pods`: the whole exposition of N pods (every family, each pod with two turn
  results, ten tools, three model series), against formatting as many lines with one
  f-string each and joining them — the least any writer of that text does.
And against a real capd with `pods` idle pods (scripted, `read_file`, a turn each):
- `scrape N pods`: a `metrics` request's round trip on the daemon socket, against an
  `info` request's (the same socket, the same framing, almost no work).
The in-process figures are the best of REPEATS runs, the round trips the median.
"""

import asyncio
import time
from collections.abc import Callable
from typing import Any

from bench import servers
from bench.report import Figure, median
from bench.sizes import Size
from bench.wire import LineClient
from capd.metrics import DaemonSample, Hot, PodSample, render, timed_tool_run
from capd.tools.base import ToolOutcome

REPEATS = 5
TOOLS = ("bash", "read_file", "write_file", "edit_file", "spawn_pod", "send_to_pod", "list_pods")
OUTCOME = ToolOutcome("ok", False)


def _best_ns(loop: Callable[[int], None], n: int) -> float:
    """The fastest of REPEATS runs of `loop(n)`, in ns per iteration."""
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter_ns()
        loop(n)
        best = min(best, (time.perf_counter_ns() - started) / n)
    return best


def _observe(n: int) -> None:
    hist = Hot().tool_calls
    labels = ("bash", "ok")
    for i in range(n):
        hist.observe(labels, i * 1e-4)


def _increment(n: int) -> None:
    counts: dict[tuple[str, str], int] = {}
    key = ("bash", "ok")
    for _ in range(n):
        counts[key] = counts.get(key, 0) + 1


class _Toolbox:
    """What `timed_tool_run` asks of a toolbox."""

    def offers(self, name: str) -> bool:
        return name in TOOLS

    async def run(self, name: str, arguments: dict[str, Any], approve: Any = None) -> ToolOutcome:
        return OUTCOME


def _calls(run: Callable[..., Any]) -> Callable[[int], None]:
    def loop(n: int) -> None:
        async def calls() -> None:
            box = _Toolbox()
            for _ in range(n):
                await run(box, "bash", {})

        asyncio.run(calls())

    return loop


def _fleet(pods: int) -> tuple[DaemonSample, list[PodSample], Hot]:
    hot = Hot()
    samples = []
    for i in range(pods):
        name = f"worker-{i}"
        status = ("idle", "running", "stopped")[i % 3]
        live = status != "stopped"
        samples.append(
            PodSample(
                name,
                status,
                1000 * i,
                300 * i,
                0.01 * i,
                1300 * i,
                0.01 * i,
                *((5000 + i, 200_000, 0, 1, 0) if live else ()),
            )
        )
        hot.turns[(name, "finished")] = i + 1
        hot.turns[(name, "cancelled")] = 1
    for i, tool in enumerate(TOOLS):
        hot.tool_calls.observe((tool, "ok"), 0.001 * i)
        hot.tool_calls.observe((tool, "error"), 0.1 * i)
    for model in ("gpt-a", "gpt-b", "claude-c"):
        hot.model_calls.observe(("openai", model, "ok"), 2.5)
    daemon = DaemonSample("0.1.0", time.time(), {"daemon": 1, "pod": pods}, {}, 0, 0)
    return daemon, samples, hot


def _render(pods: int, rounds: int) -> tuple[float, float]:
    """(ms per render, ms per baseline) for `pods` pods."""
    daemon, samples, hot = _fleet(pods)
    lines = render(daemon, samples, hot).count("\n")
    names = [f"worker-{i % max(pods, 1)}" for i in range(lines)]

    def rendering(n: int) -> None:
        for _ in range(n):
            render(daemon, samples, hot)

    def formatting(n: int) -> None:
        for _ in range(n):
            "\n".join(f'capd_x{{pod="{name}"}} {i}' for i, name in enumerate(names))

    return _best_ns(rendering, rounds) / 1e6, _best_ns(formatting, rounds) / 1e6


def _scrape(pods: int, rounds: int) -> tuple[float, float]:
    """(ms per `metrics` round trip, ms per `info` round trip) with `pods` pods."""
    with servers.capd() as capd, LineClient(capd.socket) as daemon:
        sockets = [
            servers.spawn(daemon, f"idle-{i}", servers.scripted(), tools=["read_file"])
            for i in range(pods)
        ]
        for socket in sockets:
            with LineClient(socket) as pod:
                pod.request({"id": "s", "method": "subscribe"})
                pod.request({"id": "r", "method": "run", "text": "hello there"})
                pod.wait_event("turn_end")
        text = daemon.request({"id": "m", "method": "metrics"})["result"]["text"]
        if f'capd_turns_total{{pod="idle-{pods - 1}",result="finished"}} 1' not in text:
            raise RuntimeError("the scrape misses the last pod's turn")
        took = {}
        for method in ("metrics", "info", "metrics", "info"):  # interleaved against drift
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                daemon.request({"id": method, "method": method})
                times.append(time.perf_counter() - started)
            took[method] = took.get(method, []) + times
    return median(took["metrics"]) * 1000, median(took["info"]) * 1000


def run(size: Size) -> list[Figure]:
    n = size.round_trips * 100
    figures = [
        Figure("metrics", "observe", _best_ns(_observe, n), "ns", "lower", _best_ns(_increment, n))
    ]
    calls = size.round_trips * 10
    hooked = _best_ns(_calls(timed_tool_run(_Toolbox.run)), calls)
    plain = _best_ns(_calls(_Toolbox.run), calls)
    figures.append(Figure("metrics", "tool call hook", hooked, "ns", "lower", plain))
    for pods in (size.pods // 10, size.pods):
        took, baseline = _render(pods, max(3, size.round_trips // max(pods, 1)))
        figures.append(Figure("metrics", f"render {pods} pods", took, "ms", "lower", baseline))
    took, baseline = _scrape(size.pods, max(5, size.round_trips // 100))
    figures.append(Figure("metrics", f"scrape {size.pods} pods", took, "ms", "lower", baseline))
    return figures
