"""The names the model calls an MCP server's tools by: `mcp__<server>__<tool>`.

Model APIs accept `[A-Za-z0-9_-]{1,64}` (OpenAI and Anthropic both), while MCP allows 128
characters and `.`, so a tool's own name may need mending: other characters become `_`,
and a name that is too long, or that two tools would share once mended, ends in `_` and
6 hex digits of the sha256 of the tool's own name. The same list gives the same names on
every start, so the tool calls in a pod's history keep meaning the same tools.
"""

import hashlib
import re
from collections import Counter
from collections.abc import Iterable

PREFIX = "mcp__"
SEPARATOR = "__"
MAX_LENGTH = 64
HASH_HEX = 6
_OUTSIDE = re.compile(r"[^A-Za-z0-9_-]")


def exposed_names(server: str, tools: Iterable[str]) -> dict[str, str]:
    """The exposed name of each of a server's tools: {exposed: the tool's own name}."""
    mended = {tool: _OUTSIDE.sub("_", tool) for tool in tools}
    shared = Counter(mended.values())
    head = f"{PREFIX}{server}{SEPARATOR}"
    names: dict[str, str] = {}
    for tool, part in mended.items():
        name = head + part
        if not part or shared[part] > 1 or len(name) > MAX_LENGTH:
            digest = hashlib.sha256(tool.encode()).hexdigest()[:HASH_HEX]
            name = f"{head}{part[: MAX_LENGTH - len(head) - HASH_HEX - 1]}_{digest}"
        names.setdefault(name, tool)
    return names


def server_of(name: str) -> str | None:
    """The server part of an exposed name, None for a name that is not one. A server's
    name holds no `__` and does not end in `_`, so the first `__` after it ends it."""
    if not name.startswith(PREFIX):
        return None
    server, found, _ = name[len(PREFIX) :].partition(SEPARATOR)
    return server if found and server else None
