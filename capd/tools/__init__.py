"""The built-in tools by name, and `run_tool`, which turns every failure into an outcome.

`run_tool` never raises except asyncio.CancelledError: a bad call from the model (unknown
tool, arguments that are not JSON or do not fit the schema) or a failing tool becomes an
error outcome the model can read and act on.
"""

import logging
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from capd.chat import INVALID_JSON_KEY, ToolSpec
from capd.tools.base import Tool, ToolContext, ToolFailed, ToolOutcome
from capd.tools.files import EditFileTool, ReadFileTool, WriteFileTool
from capd.tools.pods import (
    ListPodsTool,
    ReadPodOutputTool,
    SendToPodTool,
    SpawnPodTool,
    StopPodTool,
)
from capd.tools.shell import BashTool
from protocol.framing import MAX_NESTING
from protocol.methods import describe_validation_error

log = logging.getLogger(__name__)

BUILTIN_TOOLS: dict[str, Tool[Any]] = {
    tool.name: tool
    for tool in (
        BashTool(),
        ReadFileTool(),
        WriteFileTool(),
        EditFileTool(),
        SpawnPodTool(),
        SendToPodTool(),
        ReadPodOutputTool(),
        StopPodTool(),
        ListPodsTool(),
    )
}

INVALID_JSON_SHOWN_CHARS = 200


def tool_specs(names: Iterable[str]) -> list[ToolSpec]:
    """Specs of the tools a manifest allows, in its order, each once."""
    return [BUILTIN_TOOLS[name].spec() for name in dict.fromkeys(names)]


async def run_tool(name: str, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
    tool = BUILTIN_TOOLS.get(name)
    if tool is None:
        return ToolOutcome(f"unknown tool {name!r}", is_error=True)
    if INVALID_JSON_KEY in arguments:
        raw = str(arguments[INVALID_JSON_KEY])[:INVALID_JSON_SHOWN_CHARS]
        return ToolOutcome(
            f"arguments were not a JSON object, or nested deeper than {MAX_NESTING} levels: {raw}",
            is_error=True,
        )
    try:
        args = tool.args_model.model_validate(arguments)
    except ValidationError as exc:
        problems = describe_validation_error(exc)
        return ToolOutcome(f"invalid arguments for {name}: {problems}", is_error=True)
    try:
        return await tool.run(args, ctx)
    except ToolFailed as exc:
        return ToolOutcome(str(exc), is_error=True)
    except Exception as exc:
        log.exception("tool %s failed in pod %s", name, ctx.pod)
        return ToolOutcome(f"tool {name} failed: {type(exc).__name__}: {exc}", is_error=True)
