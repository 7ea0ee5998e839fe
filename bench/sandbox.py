"""What the sandbox costs a bash call (issue 19).

`BashTool.run("true")` in-process, confined as a default pod is (mode `workspace-write`,
through the bwrap capd's start-up probe picks) and with mode `off` (the baseline),
alternating call by call in the same run so that a machine busier in one part of it weighs
on both alike. The figures are the confined call's median and p90; the ratio is the cost.
"""

import asyncio
import tempfile
import time
from pathlib import Path

from bench.report import Figure, median, percentile
from bench.sizes import Size
from capd.proc.sandbox import candidates, confinement, probe
from capd.tools.base import ToolContext
from capd.tools.shell import BashTool
from protocol.manifest import Sandbox
from protocol.tools import BashArgs

WARM_UP = 3
"""Calls not counted, of each kind: the first pay for page cache and imports."""


async def _time_calls(contexts: list[ToolContext], calls: int) -> list[list[float]]:
    """Milliseconds of each of `calls` runs of `true` in each context, taken in turn."""
    tool, args = BashTool(), BashArgs(command="true")
    samples: list[list[float]] = [[] for _ in contexts]
    for n in range(WARM_UP + calls):
        for ctx, times in zip(contexts, samples, strict=True):
            start = time.perf_counter()
            outcome = await tool.run(args, ctx)
            elapsed = (time.perf_counter() - start) * 1000
            if outcome.is_error:
                raise RuntimeError(f"bash true failed: {outcome.output}")
            if n >= WARM_UP:
                times.append(elapsed)
    return samples


def run(size: Size) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="capd-bench-sandbox-") as scratch:
        base = Path(scratch)
        state, runtime, cwd = base / "state", base / "run", base / "state/pods/bench/work"
        cwd.mkdir(parents=True)
        runtime.mkdir()
        backend = probe(candidates(None), state)
        if backend.path is None:
            raise RuntimeError(backend.refusal)
        confined = confinement(Sandbox(), bwrap=backend.path, cwd=cwd, capd_dirs=[state, runtime])
        contexts = [
            ToolContext(cwd=cwd, pod="bench", sandbox=confined),
            ToolContext(cwd=cwd, pod="bench"),
        ]
        sandboxed, off = asyncio.run(_time_calls(contexts, size.sandbox_calls))
    return [
        Figure(
            "sandbox", "bash true, confined, median", median(sandboxed), "ms", "lower", median(off)
        ),
        Figure(
            "sandbox",
            "bash true, confined, p90",
            percentile(sandboxed, 0.9),
            "ms",
            "lower",
            percentile(off, 0.9),
        ),
    ]
