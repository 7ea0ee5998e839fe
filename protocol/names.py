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

MCP_PREFIX = "mcp__"
MCP_SEPARATOR = "__"
"""An MCP server's tools are offered as `mcp__<server>__<tool>` (§12)."""


def mcp_server_of(name: str) -> str | None:
    """The server part of an exposed name, None for a name that is not one. A server's
    name holds no `__` and does not end in `_`, so the first `__` after it ends it."""
    if not name.startswith(MCP_PREFIX):
        return None
    server, found, _ = name[len(MCP_PREFIX) :].partition(MCP_SEPARATOR)
    return server if found and server else None
