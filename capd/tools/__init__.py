"""The built-in tools by name: what a manifest's `tools` may list (protocol.names.ToolName).
A pod offers them through its own `Toolbox` (toolbox.py)."""

from typing import Any

from capd.tools.base import Tool
from capd.tools.files import EditFileTool, ReadFileTool, WriteFileTool
from capd.tools.pods import (
    ListPodsTool,
    ReadPodOutputTool,
    SendToPodTool,
    SpawnPodTool,
    StopPodTool,
)
from capd.tools.shell import BashTool

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

CHANGE_FILES = frozenset({"bash", "write_file", "edit_file", "spawn_pod", "send_to_pod"})
"""The tools through which a turn can change files in the pod's cwd, itself or through a
child pod (whose cwd lies inside it): a pod with none of them is not checkpointed."""
