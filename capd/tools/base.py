"""The tool seam: a Tool validates its arguments with a protocol/tools.py model and runs.

A tool returns a ToolOutcome; a failure the model should read is `ToolFailed`. A tool is
cancelled (pause, cancel, stop) by cancelling its coroutine: it must release what it holds
at once — a subprocess tool kills its whole process group.
"""

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from capd.chat import ToolSpec
from capd.proc.limits import PodLimits
from capd.proc.sandbox import Confinement
from capd.tokens import spec_tokens
from protocol.tools import SpawnPodArgs, ToolArgs

DEFAULT_OUTPUT_LIMIT = 64 * 1024


class ChildPodOps(Protocol):
    """What the pod tools ask of the daemon, on behalf of the calling pod. Each returns the
    text the model reads, or raises ToolFailed."""

    async def spawn(self, args: SpawnPodArgs) -> str: ...

    async def send(self, name: str, text: str) -> str: ...

    def read_output(self, name: str, limit: int) -> str: ...

    async def stop(self, name: str) -> str: ...

    def tree(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ToolContext:
    cwd: Path
    pod: str
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    pods: ChildPodOps | None = None
    """Set for pods hosted by a daemon; the pod tools need it."""
    spill_dir: Path | None = None
    """Where output too long to show is written in full (the pod's state dir)."""
    sandbox: Confinement | None = None
    """How the pod's processes are confined; None: not at all (sandbox mode `off`)."""
    limits: PodLimits | None = None
    """The pod's limits.memory_mb and limits.pids; None: none."""


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    output: str
    is_error: bool = False


class ToolFailed(Exception):
    """The tool could not do what was asked; the message goes to the model as an error."""


ArgsT = TypeVar("ArgsT", bound=ToolArgs)


class Tool(ABC, Generic[ArgsT]):
    """`run` receives arguments already validated by `args_model` (see `Toolbox.run`)."""

    name: ClassVar[str]
    description: ClassVar[str]
    args_model: type[ArgsT]

    @classmethod
    def spec(cls) -> ToolSpec:
        """Made once per class, as its schema (shared read-only, `ToolArgs.json_schema`)."""
        return _spec_of(cls)

    @classmethod
    def spec_tokens(cls) -> int:
        """`capd.tokens.spec_tokens` of its spec, counted once per class."""
        return _tokens_of(cls)

    @abstractmethod
    async def run(self, args: ArgsT, ctx: ToolContext) -> ToolOutcome: ...


@functools.cache
def _spec_of(tool: type[Tool[Any]]) -> ToolSpec:
    return ToolSpec(tool.name, tool.description, tool.args_model.json_schema())


@functools.cache
def _tokens_of(tool: type[Tool[Any]]) -> int:
    return spec_tokens(_spec_of(tool))
