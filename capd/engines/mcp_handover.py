"""A pod's MCP servers handed to an external engine, which runs them itself (§12), and
what `status.mcp` says of them (`managed_by: engine`).

Claude Code gets them as `--mcp-config` JSON with `type` always written (an entry with a
`url` and no `type` is read as stdio and rejected). Its `${VAR}`s stay as written: Claude
Code expands them from its own environment, which capd's launcher gives it, so no value
reaches its command line. An ACP agent gets them in `session/new` / `session/load`
`mcpServers`, in ACP's shapes (agent-client-protocol's `McpServerStdio`: an absolute
`command`, `env` as `[{name, value}]`; `HttpMcpServer`: `type: "http"`, `headers` as
`[{name, value}]`), with the values expanded, since ACP defines no expansion: they travel
only over the agent's stdin. An HTTP server goes only to an agent whose `initialize`
result says `agentCapabilities.mcpCapabilities.http`.

A `${VAR}` is read from the engine's environment (capd's, with `engine.env` over it: what
the engine itself sees). A server that cannot be handed over (a `${VAR}` that is not set,
an HTTP server the agent does not take, a stdio command that is not found) is left out and
shown `failed` with the reason; the others are `starting` until the engine's session took
them, then `ready` (or `failed`, as Claude Code reports each one).
"""

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from capd.tools.mcp.secrets import MissingVariable, expand_all
from capd.tools.mcp.transport import CannotStart, resolve_command
from protocol.manifest import McpHttpServer, McpServerConfig, McpStdioServer
from protocol.results import McpServerState

NO_HTTP = (
    "the acp agent does not take http MCP servers (its initialize result has no "
    "agentCapabilities.mcpCapabilities.http)"
)
CLAUDE_READY = "connected"
CLAUDE_STARTING = "pending"


class HandedServers:
    """The pod's MCP servers as handed to its engine: each one's state in `status.mcp`."""

    def __init__(self, servers: Mapping[str, McpServerConfig]) -> None:
        self.servers = dict(servers)
        self._states = {name: _state(name, server) for name, server in servers.items()}

    def status(self) -> list[dict[str, Any]]:
        return [state.model_dump() for state in self._states.values()]

    def starting(self, left_out: Mapping[str, str]) -> None:
        """The engine starts and takes all but `left_out` (name: why), which fail."""
        for name, server in self.servers.items():
            self._states[name] = _state(name, server, error=left_out.get(name))

    def taken(self) -> None:
        """The engine's session took the servers it was handed."""
        for state in self._states.values():
            if state.state == "starting":
                state.state = "ready"

    def claude_code_reported(self, servers: object, tools: object) -> None:
        """Claude Code's `init` message: its `mcp_servers` ([{name, status, error?}];
        status connected, pending, failed, needs-auth or disabled) and `tools` (the
        servers' as `mcp__<server>__<tool>`)."""
        names = [str(t) for t in tools] if isinstance(tools, list) else []
        for entry in servers if isinstance(servers, list) else []:
            if not isinstance(entry, dict) or entry.get("name") not in self._states:
                continue
            state = self._states[entry["name"]]
            status = str(entry.get("status"))
            prefix = f"mcp__{state.name}__"
            state.tools = sum(name.startswith(prefix) for name in names)
            if status == CLAUDE_READY:
                state.state, state.error = "ready", None
            elif status == CLAUDE_STARTING:
                state.state, state.error = "starting", None
            else:
                detail = f": {entry['error']}" if entry.get("error") else ""
                state.state, state.error = "failed", f"claude-code reports it {status}{detail}"


def claude_code_config(
    servers: Mapping[str, McpServerConfig], environ: Mapping[str, str]
) -> tuple[str, dict[str, str]]:
    """`--mcp-config`'s JSON, `${VAR}`s as written, and the servers left out (name: why)."""
    handed: dict[str, Any] = {}
    left_out: dict[str, str] = {}
    for name, server in servers.items():
        try:
            _expanded(server, environ)
        except MissingVariable as exc:
            left_out[name] = str(exc)
            continue
        handed[name] = server.model_dump()
    return orjson.dumps({"mcpServers": handed}).decode(), left_out


def acp_servers(
    servers: Mapping[str, McpServerConfig],
    cwd: Path,
    environ: Mapping[str, str],
    takes_http: bool,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """`mcpServers` for `session/new` and `session/load`, values expanded, and the servers
    left out (name: why)."""
    handed: list[dict[str, Any]] = []
    left_out: dict[str, str] = {}
    for name, server in servers.items():
        try:
            values = _expanded(server, environ)
        except MissingVariable as exc:
            left_out[name] = str(exc)
            continue
        pairs = [{"name": key, "value": value} for key, value in values.items()]
        if isinstance(server, McpHttpServer):
            if not takes_http:
                left_out[name] = NO_HTTP
                continue
            handed.append({"type": "http", "name": name, "url": server.url, "headers": pairs})
            continue
        try:
            command = resolve_command(server.command, cwd, environ)
        except CannotStart:
            where = "an executable file in the pod's cwd" if "/" in server.command else "on PATH"
            left_out[name] = f"command {server.command} is not {where}"
            continue
        handed.append({"name": name, "command": command, "args": server.args, "env": pairs})
    return handed, left_out


def _state(name: str, server: McpServerConfig, error: str | None = None) -> McpServerState:
    return McpServerState(
        name=name,
        state="starting" if error is None else "failed",
        error=error,
        transport="http" if isinstance(server, McpHttpServer) else "stdio",
        managed_by="engine",
    )


def _expanded(server: McpServerConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """A server's env (stdio) or headers (http) with `${VAR}`s read from `environ`."""
    values = server.env if isinstance(server, McpStdioServer) else server.headers
    return expand_all(values, environ)


def _absolute_command(command: str, cwd: Path, environ: Mapping[str, str]) -> str | None:
    """`command` as an absolute path: with a `/` relative to the pod's cwd, else found on
    the engine's PATH; None when there is no such executable."""
    if "/" in command:
        path = cwd / command
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which(command, path=environ.get("PATH", os.defpath))
