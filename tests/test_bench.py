"""The benchmarks run: `python -m bench --size tiny` measures every figure.

Only that they run is tested; their figures mean something at full size (README:
Performance), and no timing is asserted here. Each benchmark runs on its own
(`--only NAME`), so the suite's workers share them out.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS
from bench.report import Figure
from tests import pg

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {
    "control": 2,
    "fanout": 1,
    "pause": 2,
    "density": 3,
    "durable": 3,
    "pgstore": 3,
    "capctl": 1,
    "restore": 4,
    "soak": 1,
    "checkpoint": 2,
    "mcp": 3,
    "sandbox": 2,
    "metrics": 5,
    "tracing": 2,
    "engines": 3,
}


def test_every_benchmark_is_run_below() -> None:
    assert FIGURES.keys() == BENCHMARKS.keys()


@pytest.mark.parametrize("name", FIGURES)
def test_the_benchmark_runs_at_tiny_size(name: str) -> None:
    if name == "pgstore" and (why := pg.unavailable()):
        pytest.skip(why)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--size", "tiny", "--json", "--only", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    figures = [json.loads(line) for line in done.stdout.splitlines()]
    assert [fig["bench"] for fig in figures] == [name] * FIGURES[name], done.stdout
    for fig in figures:
        assert fig["value"] > 0, fig
        assert fig["baseline"] is None or fig["baseline"] > 0, fig


def test_a_figure_is_judged_against_its_target() -> None:
    latency = Figure(
        "b", "latency", 3.0, "ms", "lower", baseline=2.0, target=1.5, target_is_ratio=True
    )
    assert latency.ratio == 1.5
    assert latency.met is True
    slow = Figure(
        "b", "latency", 3.1, "ms", "lower", baseline=2.0, target=1.5, target_is_ratio=True
    )
    assert slow.met is False
    rate = Figure("b", "rate", 19_999, "ev/s", "higher", target=20_000)
    assert rate.met is False
    assert Figure("b", "info", 1.0, "ms", "lower").met is None
