"""A minimal stdio MCP server whose tool list changes while it runs (handshake era,
revision 2025-11-25), for the test that a changed list is picked up at the next step.

Real servers announce their changes too early to see (server-everything adds its
conditional tools before the client's first `tools/list`). This one starts with the tool
`add-tool`; calling it adds `added` and sends `notifications/tools/list_changed`.
Plain JSON lines on stdin/stdout, no SDK: it starts in milliseconds.
"""

import json
import sys
from typing import Any

PROTOCOL_VERSION = "2025-11-25"
EMPTY_SCHEMA = {"type": "object", "properties": {}}
METHOD_NOT_FOUND = -32601


def _tool(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "description": description, "inputSchema": EMPTY_SCHEMA}


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
    sys.stdout.flush()


def _text(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": False}


def main() -> None:
    tools = [_tool("add-tool", "Adds the tool `added` to this server's list")]
    for line in sys.stdin:
        request = json.loads(line)
        method, rid = request.get("method"), request.get("id")
        if rid is None:  # a notification: nothing to answer
            continue
        if method == "initialize":
            result: dict[str, Any] = {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "list-changer", "version": "1.0.0"},
            }
        elif method == "ping":
            result = {}
        elif method == "tools/list":
            result = {"tools": tools}
        elif method == "tools/call" and request["params"]["name"] == "add-tool":
            if len(tools) == 1:
                tools.append(_tool("added", "Says hello; listed only after add-tool ran"))
                _send({"method": "notifications/tools/list_changed"})
            result = _text("added the tool `added`")
        elif method == "tools/call" and request["params"]["name"] == "added" and len(tools) > 1:
            result = _text("hello from added")
        else:
            _send({"id": rid, "error": {"code": METHOD_NOT_FOUND, "message": f"no {method}"}})
            continue
        _send({"id": rid, "result": result})


if __name__ == "__main__":
    main()
