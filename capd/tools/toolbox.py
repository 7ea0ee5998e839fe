"""A pod's toolbox: the tools its model is offered, and `run`, which turns every failure
into an outcome.

Each pod has its own, and what it offers may change while the pod lives, so an engine
reads `specs()` at each model call: the built-in tools, then the tools of the pod's MCP
servers as each lists them now (`capd.tools.mcp.server`). `run` never raises except
asyncio.CancelledError: a bad call from the model (a tool the pod does not offer, arguments
that are not JSON or do not fit the schema) or a failing tool becomes an error outcome the
model can read and act on. An engine may pass `approve`, asked before a call runs once
its tool is known and its arguments fit (an MCP tool: once its server is ready and lists
it; the server checks the arguments) — the builtin engine's approvals,
`capd.permissions`: the one place both built-in and MCP calls pass.
"""

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from capd import metrics, tracing
from capd.chat import INVALID_JSON_KEY, ToolSpec
from capd.tools import BUILTIN_TOOLS
from capd.tools.base import Tool, ToolContext, ToolFailed, ToolOutcome
from protocol.framing import MAX_NESTING
from protocol.methods import describe_validation_error
from protocol.names import mcp_server_of

if TYPE_CHECKING:
    from capd.tools.mcp.server import McpServer

log = logging.getLogger(__name__)

INVALID_JSON_SHOWN_CHARS = 200

Approve = Callable[[str, dict[str, Any]], Awaitable[str | None]]
"""Asked with a call's tool name and arguments: None lets it run, a text refuses it (the
call's error result)."""


class Toolbox:
    def __init__(self, context: ToolContext, tools: Iterable[Tool[Any]] = ()) -> None:
        self.context = context
        """Where and for whom the tools run."""
        self._offered: dict[str, tuple[Tool[Any], ToolSpec]] = {}
        self._builtin_tokens = 0
        self._mcp: dict[str, McpServer] = {}
        for tool in tools:
            self.add(tool)

    @classmethod
    def builtin(cls, names: Iterable[str], context: ToolContext) -> "Toolbox":
        """The built-in tools `names` lists (a manifest's `tools`), in its order, each once."""
        return cls(context, (BUILTIN_TOOLS[name] for name in names))

    def add(self, tool: Tool[Any]) -> None:
        """Offer `tool` from the next model call on, unless a tool of its name is offered."""
        if tool.name not in self._offered:
            self._offered[tool.name] = (tool, tool.spec())
            self._builtin_tokens += tool.spec_tokens()

    def add_mcp_servers(self, servers: Iterable["McpServer"]) -> None:
        """Offer the tools of `servers` (not started yet; see `start_mcp_servers`)."""
        for server in servers:
            self._mcp.setdefault(server.name, server)

    def take_mcp_servers(self, other: "Toolbox") -> None:
        """Offer the servers `other` has, which offers them no more (a reconfigured pod
        keeps servers nothing they depend on changed)."""
        self._mcp, other._mcp = other._mcp, {}

    @property
    def has_mcp_servers(self) -> bool:
        return bool(self._mcp)

    def start_mcp_servers(self) -> None:
        """Start the servers' connections; returns at once (a server that cannot start
        leaves the pod working without its tools)."""
        for server in self._mcp.values():
            server.start()

    async def servers_started(self) -> None:
        """Wait for the MCP servers starting for the first time since the pod came up (each
        at most its limits.mcp_startup_timeout_s), so a model call is offered their tools;
        returns at once once each was ready or failed."""
        await asyncio.gather(*(server.first_start() for server in self._mcp.values()))

    @property
    def spec_tokens(self) -> int:
        """The estimate of the tool definitions it offers now (capd.tokens), kept as tools
        are added and as servers list theirs rather than counted at each model call."""
        return self._builtin_tokens + sum(server.spec_tokens for server in self._mcp.values())

    def specs(self) -> list[ToolSpec]:
        """What the model is offered now."""
        specs = [spec for _, spec in self._offered.values()]
        for server in self._mcp.values():
            specs += server.specs
        return specs

    def offers(self, name: str) -> bool:
        """Whether a tool of that name is offered now (the model may call any name)."""
        return name in self._offered or name in self._mcp_names()

    def run(
        self,
        name: str,
        arguments: dict[str, Any],
        approve: Approve | None = None,
        call_id: str | None = None,
    ) -> Awaitable[ToolOutcome]:
        """The call's outcome, in an `execute_tool` span when tracing is on (a plain
        function, so that off it costs no coroutine of its own)."""
        if tracing.TRACER is None:
            return self._run(name, arguments, approve)
        offered = self._offered.get(name)
        kind = "extension" if mcp_server_of(name) in self._mcp else "function"
        description = offered[0].description if offered else None
        run = functools.partial(self._run, name, arguments, approve)
        offers = self.offers(name)
        return tracing.TRACER.tool(name, offers, kind, call_id, description, arguments, run)

    @metrics.timed_tool_run
    async def _run(
        self, name: str, arguments: dict[str, Any], approve: Approve | None
    ) -> ToolOutcome:
        server = self._mcp.get(mcp_server_of(name) or "")
        if server is not None:
            return await self._run_mcp(server, name, arguments, approve)
        offered = self._offered.get(name)
        if offered is None:
            listed = ", ".join([*self._offered, *self._mcp_names()]) or "none"
            return ToolOutcome(f"tool {name} is not enabled for this pod (enabled: {listed})", True)
        tool, _ = offered
        if (refused := _not_an_object(arguments)) is not None:
            return refused
        try:
            args = tool.args_model.model_validate(arguments)
        except ValidationError as exc:
            problems = describe_validation_error(exc)
            return ToolOutcome(f"invalid arguments for {name}: {problems}", is_error=True)
        if approve is not None and (refused := await approve(name, arguments)) is not None:
            return ToolOutcome(refused, is_error=True)
        try:
            return await tool.run(args, self.context)
        except ToolFailed as exc:
            return ToolOutcome(str(exc), is_error=True)
        except Exception as exc:
            log.exception("tool %s failed in pod %s", name, self.context.pod)
            return ToolOutcome(f"tool {name} failed: {type(exc).__name__}: {exc}", is_error=True)

    async def _run_mcp(
        self, server: "McpServer", name: str, arguments: dict[str, Any], approve: Approve | None
    ) -> ToolOutcome:
        """The server checks the arguments against its schema and says what is wrong.
        A call that cannot run now (the server does not list the tool, or is not ready)
        gets that error without asking `approve`: a person is not asked about it."""
        if (refused := _not_an_object(arguments)) is not None:
            return refused
        if approve is not None:
            await server.first_start()
            if (refused := server.refusal(name)) is not None:
                return refused
            if (denied := await approve(name, arguments)) is not None:
                return ToolOutcome(denied, is_error=True)
        try:
            return await server.call(name, arguments, self.context)
        except Exception as exc:
            log.exception("tool %s failed in pod %s", name, self.context.pod)
            return ToolOutcome(f"tool {name} failed: {type(exc).__name__}: {exc}", is_error=True)

    def _mcp_names(self) -> list[str]:
        return [spec.name for server in self._mcp.values() for spec in server.specs]

    def mcp_status(self) -> list[dict[str, Any]]:
        """`status.mcp` entries (protocol.results.McpServerState) of the servers whose
        tools it offers."""
        return [server.status() for server in self._mcp.values()]

    async def aclose(self) -> None:
        """The pod stops: offer nothing more. The MCP servers are stopped (their process
        groups killed); the built-in tools hold nothing."""
        self._offered.clear()
        self._builtin_tokens = 0
        servers, self._mcp = list(self._mcp.values()), {}
        results = await asyncio.gather(
            *(server.aclose() for server in servers), return_exceptions=True
        )
        for server, result in zip(servers, results, strict=True):
            if isinstance(result, Exception):  # a bug: the pod's stop goes on regardless
                log.error(
                    "pod %s: stopping MCP server %s failed",
                    self.context.pod,
                    server.name,
                    exc_info=result,
                )


def _not_an_object(arguments: dict[str, Any]) -> ToolOutcome | None:
    if INVALID_JSON_KEY not in arguments:
        return None
    raw = str(arguments[INVALID_JSON_KEY])[:INVALID_JSON_SHOWN_CHARS]
    return ToolOutcome(
        f"arguments were not a JSON object, or nested deeper than {MAX_NESTING} levels: {raw}",
        is_error=True,
    )
