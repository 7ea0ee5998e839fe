"""A pod's toolbox: the tools its model is offered, and `run`, which turns every failure
into an outcome.

Each pod has its own, and what it offers may change while the pod lives, so an engine
reads `specs()` at each model call. `run` never raises except asyncio.CancelledError: a
bad call from the model (a tool the pod does not offer, arguments that are not JSON or do
not fit the schema) or a failing tool becomes an error outcome the model can read and act on.
"""

import logging
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from capd.chat import INVALID_JSON_KEY, ToolSpec
from capd.tokens import spec_tokens
from capd.tools import BUILTIN_TOOLS
from capd.tools.base import Tool, ToolContext, ToolFailed, ToolOutcome
from protocol.framing import MAX_NESTING
from protocol.methods import describe_validation_error

log = logging.getLogger(__name__)

INVALID_JSON_SHOWN_CHARS = 200


class Toolbox:
    def __init__(self, context: ToolContext, tools: Iterable[Tool[Any]] = ()) -> None:
        self.context = context
        """Where and for whom the tools run."""
        self._offered: dict[str, tuple[Tool[Any], ToolSpec]] = {}
        self.spec_tokens = 0
        """The estimate of the tool definitions it offers (capd.tokens), kept as they are
        added rather than counted at each model call and `status`."""
        for tool in tools:
            self.add(tool)

    @classmethod
    def builtin(cls, names: Iterable[str], context: ToolContext) -> "Toolbox":
        """The built-in tools `names` lists (a manifest's `tools`), in its order, each once."""
        return cls(context, (BUILTIN_TOOLS[name] for name in names))

    def add(self, tool: Tool[Any]) -> None:
        """Offer `tool` from the next model call on, unless a tool of its name is offered."""
        if tool.name not in self._offered:
            spec = tool.spec()
            self._offered[tool.name] = (tool, spec)
            self.spec_tokens += spec_tokens(spec)

    def specs(self) -> list[ToolSpec]:
        """What the model is offered now."""
        return [spec for _, spec in self._offered.values()]

    async def run(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        offered = self._offered.get(name)
        if offered is None:
            listed = ", ".join(self._offered) or "none"
            return ToolOutcome(f"tool {name} is not enabled for this pod (enabled: {listed})", True)
        tool, _ = offered
        if INVALID_JSON_KEY in arguments:
            raw = str(arguments[INVALID_JSON_KEY])[:INVALID_JSON_SHOWN_CHARS]
            return ToolOutcome(
                f"arguments were not a JSON object, or nested deeper than {MAX_NESTING} levels: "
                f"{raw}",
                is_error=True,
            )
        try:
            args = tool.args_model.model_validate(arguments)
        except ValidationError as exc:
            problems = describe_validation_error(exc)
            return ToolOutcome(f"invalid arguments for {name}: {problems}", is_error=True)
        try:
            return await tool.run(args, self.context)
        except ToolFailed as exc:
            return ToolOutcome(str(exc), is_error=True)
        except Exception as exc:
            log.exception("tool %s failed in pod %s", name, self.context.pod)
            return ToolOutcome(f"tool {name} failed: {type(exc).__name__}: {exc}", is_error=True)

    def mcp_status(self) -> list[dict[str, Any]]:
        """`status.mcp` entries (protocol.results.McpServerState) of the servers whose
        tools it offers."""
        return []

    async def aclose(self) -> None:
        """The pod stops: offer nothing more. A tool that holds something (a server's
        connection) releases it here; the built-in tools hold nothing."""
        self._offered.clear()
        self.spec_tokens = 0
