"""The hot hooks' decorators: what a model call and a tool call count, by outcome, and that
a call cut short by a cancel counts nothing."""

import asyncio
from typing import Any

import orjson
import pytest

from capd.metrics import HOT, UNKNOWN_TOOL, pod_deleted, timed_model_call, timed_tool_run
from capd.providers.base import ProviderError
from capd.tools.base import ToolOutcome
from protocol.manifest import ModelConfig

MODEL = ModelConfig(provider="scripted", name="hooked")


def model_count(outcome: str) -> int:
    series = HOT.model_calls.series.get(("scripted", "hooked", outcome))
    return 0 if series is None else sum(int(count) for count in series[:-1])


def tool_count(tool: str, outcome: str) -> int:
    series = HOT.tool_calls.series.get((tool, outcome))
    return 0 if series is None else sum(int(count) for count in series[:-1])


class Engine:
    _model = MODEL

    @timed_model_call
    async def call(self, behaviour: str) -> str:
        if behaviour == "fail":
            raise ProviderError("no", retryable=False)
        if behaviour == "hang":
            await asyncio.Event().wait()
        return "reply"


class Toolbox:
    def offers(self, name: str) -> bool:
        return name == "bash"

    @timed_tool_run
    async def run(self, name: str, arguments: dict[str, Any], approve: Any = None) -> ToolOutcome:
        if arguments.get("hang"):
            await asyncio.Event().wait()
        return ToolOutcome("out", bool(arguments.get("fail")))


async def test_model_calls_count_by_outcome_and_a_cancelled_one_not_at_all() -> None:
    ok, error = model_count("ok"), model_count("error")
    assert await Engine().call("reply") == "reply"
    with pytest.raises(ProviderError):
        await Engine().call("fail")
    hanging = asyncio.create_task(Engine().call("hang"))
    await asyncio.sleep(0)
    hanging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hanging
    assert (model_count("ok") - ok, model_count("error") - error) == (1, 1)
    assert ("scripted", "hooked", "") not in HOT.model_calls.series


async def test_tool_calls_count_by_tool_and_outcome() -> None:
    before = [tool_count("bash", "ok"), tool_count("bash", "error"), tool_count(UNKNOWN_TOOL, "ok")]
    box = Toolbox()
    await box.run("bash", {})
    await box.run("bash", {"fail": True})
    await box.run("made_up", {}, approve=None)
    hanging = asyncio.create_task(box.run("bash", {"hang": True}))
    await asyncio.sleep(0)
    hanging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hanging
    after = [tool_count("bash", "ok"), tool_count("bash", "error"), tool_count(UNKNOWN_TOOL, "ok")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert ("made_up", "ok") not in HOT.tool_calls.series


def test_a_deleted_pods_model_series_go_once_no_pod_uses_the_model() -> None:
    HOT.model_calls.observe(("scripted", "gone", "ok"), 1.0)
    HOT.model_calls.observe(("scripted", "kept", "error"), 1.0)
    kept = orjson.dumps({"name": "k", "model": {"provider": "scripted", "name": "kept"}})
    pod_deleted("g", [kept.decode(), "{not a manifest"])
    assert ("scripted", "gone", "ok") not in HOT.model_calls.series
    assert ("scripted", "kept", "error") in HOT.model_calls.series
