"""What tracing costs when it is off (issue 20): the wrappers at the hot call sites.

With tracing off, `Toolbox.run` and `BuiltinEngine._call_model` check `tracing.TRACER`
and return the unwrapped call's coroutine (`Toolbox._run`, `BuiltinEngine._retrying`),
which is the baseline, timed in alternating blocks in the same run. The tool is a no-op
and the model call returns a ready reply, so the wrapper is all that differs; a real tool
call or model call costs milliseconds more. The figures are nanoseconds per call, median
of the blocks.
"""

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.report import Figure, median
from bench.sizes import Size
from capd import tracing
from capd.engines.builtin import BuiltinEngine
from capd.providers.base import ModelReply
from capd.tools.base import Tool, ToolContext, ToolOutcome
from capd.tools.toolbox import Toolbox
from protocol.manifest import ModelConfig, Permissions
from protocol.tools import ToolArgs

BLOCKS = 20
DONE = ToolOutcome("done")
REPLY = ModelReply("done")


class _NoArgs(ToolArgs):
    pass


class _Noop(Tool[_NoArgs]):
    name = "noop"
    description = "does nothing"
    args_model = _NoArgs

    async def run(self, args: _NoArgs, ctx: ToolContext) -> ToolOutcome:
        return DONE


async def _reply() -> ModelReply:
    return REPLY


async def _per_call_ns(call: Callable[[], Awaitable[object]], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        await call()
    return (time.perf_counter_ns() - start) / calls


async def _pair(
    wrapped: Callable[[], Awaitable[object]], plain: Callable[[], Awaitable[object]], calls: int
) -> tuple[float, float]:
    """Median ns per call of each, in alternating blocks (the first pair a warm-up)."""
    values: list[float] = []
    baselines: list[float] = []
    for block in range(BLOCKS + 1):
        value, baseline = await _per_call_ns(wrapped, calls), await _per_call_ns(plain, calls)
        if block:
            values.append(value)
            baselines.append(baseline)
    return median(values), median(baselines)


async def _measure(calls: int) -> list[Figure]:
    assert tracing.TRACER is None
    toolbox = Toolbox(ToolContext(cwd=Path.cwd(), pod="bench"), [_Noop()])
    engine = BuiltinEngine(ModelConfig(provider="scripted"), Permissions())
    host = None  # a call that succeeds never reaches the host
    tool = await _pair(
        lambda: toolbox.run("noop", {}, None, "c1"), lambda: toolbox._run("noop", {}, None), calls
    )
    model = await _pair(
        lambda: engine._call_model(host, None, _reply),  # type: ignore[arg-type]
        lambda: engine._retrying(host, None, _reply),  # type: ignore[arg-type]
        calls,
    )
    await engine.aclose()
    if "capd.otel" in sys.modules or any(n.startswith("opentelemetry.sdk") for n in sys.modules):
        raise RuntimeError("tracing is off, yet capd loaded the OpenTelemetry SDK")
    return [
        Figure("tracing", "Toolbox.run, tracing off", tool[0], "ns", "lower", tool[1], 1.2, True),
        Figure(
            "tracing",
            "model call wrapper, tracing off",
            model[0],
            "ns",
            "lower",
            model[1],
            1.2,
            True,
        ),
    ]


def run(size: Size) -> list[Figure]:
    return asyncio.run(_measure(max(size.round_trips, 100)))
