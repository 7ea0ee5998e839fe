"""The wire's fixed vocabularies that clients offer as choices, kept free of pydantic so a
command line can list them without loading the models."""

from typing import Literal

ToolName = Literal[
    "bash",
    "read_file",
    "write_file",
    "edit_file",
    "spawn_pod",
    "send_to_pod",
    "read_pod_output",
    "stop_pod",
    "list_pods",
]
"""The built-in tools a manifest's `tools` may list. Tools a pod gains while it runs (an MCP
server's) are named by their source, not here."""

IfBusy = Literal["reject", "queue", "interrupt"]
