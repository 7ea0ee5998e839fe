"""What capd keeps of a server's side without the SDK (which `client.py` alone imports):
its tools, and the ways a call can fail that the supervisor acts on."""

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RemoteTool:
    name: str
    """The tool's own name on its server."""
    description: str
    input_schema: dict[str, Any]


class CallTimedOut(Exception):
    """The call did not answer in time; the SDK sent the server a cancellation."""


class ConnectionLost(Exception):
    """The connection closed under the call (the server exited, or its HTTP stream ended)."""


class ServerError(Exception):
    """The server answered the call with a JSON-RPC error; the message is its own."""
