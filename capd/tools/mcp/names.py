"""The names the model calls an MCP server's tools by: `mcp__<server>__<tool>`.

Model APIs accept `[A-Za-z0-9_-]{1,64}` (OpenAI and Anthropic both), while MCP allows 128
characters and `.`, so a tool's own name may need mending: other characters become `_`,
and a name that had to be mended or cut to 64 characters ends in `_` and 6 hex digits of
the sha256 of the tool's own name. A name that needs neither is kept as it is. So each
tool's exposed name depends on the server's name and its own alone, never on the rest of
the list: a tool the server adds (a list change, an upgrade) renames no other, and the
tool calls in a pod's history keep meaning the same tools.
"""

import hashlib
import logging
import re
from collections.abc import Iterable

from protocol.names import MCP_PREFIX, MCP_SEPARATOR

MAX_LENGTH = 64
HASH_HEX = 6
_OUTSIDE = re.compile(r"[^A-Za-z0-9_-]")
_PLAIN = re.compile(r"[A-Za-z0-9_-]+")

log = logging.getLogger(__name__)


def exposed_names(server: str, tools: Iterable[str]) -> dict[str, str]:
    """The exposed name of each of a server's tools: {exposed: the tool's own name}, in
    the server's order. Should a mended name equal another tool's (a literal name that
    happens to end in the same hash, or two hashes alike), the literal name, else the
    first own name in sorted order, keeps it and the other tool is left out and logged."""
    head = f"{MCP_PREFIX}{server}{MCP_SEPARATOR}"
    wanted = {tool: _exposed(head, tool) for tool in tools}
    owners: dict[str, str] = {}
    for tool in sorted(wanted, key=lambda tool: (wanted[tool] != head + tool, tool)):
        name = wanted[tool]
        if name in owners:
            log.warning(
                "MCP server %s: tools %r and %r would both be offered as %s; %r is left out",
                server,
                owners[name],
                tool,
                name,
                tool,
            )
            continue
        owners[name] = tool
    return {name: tool for tool, name in wanted.items() if owners[name] == tool}


def _exposed(head: str, tool: str) -> str:
    name = head + tool
    if _PLAIN.fullmatch(tool) and len(name) <= MAX_LENGTH:
        return name
    part = _OUTSIDE.sub("_", tool)[: MAX_LENGTH - len(head) - HASH_HEX - 1]
    return f"{head}{part}_{hashlib.sha256(tool.encode()).hexdigest()[:HASH_HEX]}"
