"""The engine seam: what runs a pod's turns.

The pod controller owns the state machine, the durable events and the parent reports; an
engine only drives a turn (`drive_turn`) and reports what happened as events through its
`TurnHost`. The controller interrupts a turn (pause, cancel, stop) by cancelling the task
running `drive_turn`; the engine turns that into its own way of stopping, at once. A
resumed turn is the same `Turn` driven again.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from capd.context import Context, describe_pod_event
from capd.permissions import Grants
from capd.tools.toolbox import Toolbox
from protocol.errors import ProtocolError
from protocol.events import (
    BudgetLimits,
    CompactionTrigger,
    ContextCompacted,
    DurableEvent,
    Invoke,
    PodEventBase,
    Spent,
    TurnResult,
)
from protocol.manifest import Manifest


@dataclass
class Turn:
    """A turn in progress. `steps`, `output` and `partial` follow from its assistant_message
    events; the host updates them as it applies each event, live or at restore."""

    turn_id: str
    invoke: Invoke
    steps: int = 0
    running_s: float = 0.0
    output: str = ""
    partial: str = ""
    started_seq: int = 0
    """The seq of its `turn_start`: the turn's messages are those of later events."""
    checkpointed: bool = False
    """Its workspace checkpoint was made or skipped (an event says which)."""
    traceparent: str | None = None
    """The span that asked for it (`run`'s `traceparent`), kept by its `turn_start`."""


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    result: TurnResult
    output: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PendingNote:
    """A buffered notify or pod_event, waiting to enter the model's context."""

    kind: Invoke
    source: str
    written: str
    """A notify's text; empty for a pod_event, whose `text` is made from its `report`."""
    pod_event_seq: int | None = None
    """For a pod_event: the seq of its `pod_event_received` event."""
    pending_id: int | None = None
    """For a notify: its row in the store's `pending` table, deleted as it is injected."""
    report: dict[str, Any] | None = None
    """For a pod_event: the report, put in words (`text`) only when asked, as the model is
    to read it, not for each report of a burst as it arrives (a tenth of its CPU)."""

    @property
    def text(self) -> str:
        """The text the model reads."""
        return self.written if self.report is None else describe_pod_event(self.report)


class BudgetSpent(Exception):
    """The budget of pod `scope` (the pod itself or an ancestor) is spent by its subtree:
    the turn pauses here, at a step boundary, and goes on after a raise and `resume`."""

    def __init__(self, scope: str, used: Spent, budget: BudgetLimits) -> None:
        super().__init__(f"the budget of pod {scope} is spent")
        self.scope = scope
        self.used = used
        self.budget = budget


@dataclass(frozen=True, slots=True)
class CompactOrder:
    """A compaction to make: why, and the `compact` request's instructions if any."""

    trigger: CompactionTrigger
    instructions: str | None = None


class TurnHost(Protocol):
    """What a turn needs from its pod; the controller provides it."""

    name: str
    manifest: Manifest
    context: Context
    turn: Turn | None
    toolbox: Toolbox
    grants: Grants
    """The `allow_always` answers of the pod's life (`capd.permissions`)."""
    compact_wanted: CompactOrder | None
    """A `compact` request that came while the turn ran; the engine takes it (sets it to
    None) at its next step boundary, else the pod compacts after the turn."""

    def emit(self, event: DurableEvent, *, consumed: Sequence[int] = ()) -> None: ...

    def emit_ephemeral(self, event: PodEventBase) -> None: ...

    def inject_notes(self, turn_id: str) -> None:
        """Move the buffered notifications into the context, each committed as a
        `notification` event of the turn."""
        ...

    def commit_compaction(self, event: ContextCompacted) -> None:
        """Commit a `context_compacted` the engine made, with the fields only the pod
        knows (`restore_from`, `usage`) filled in."""
        ...

    def check_budget(self) -> None:
        """Raise BudgetSpent when the budget of the pod or of an ancestor is spent."""
        ...


class Engine(Protocol):
    can_compact: bool
    """Whether `compact` works: capd summarises the context itself (builtin), or the
    engine compacts its own session on request."""
    checks_budget: bool
    """Whether the engine calls `host.check_budget` at each of its step boundaries
    (builtin); otherwise it checks before each prompt and the pod pauses the turn after a
    step that spent the budget."""

    async def drive_turn(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        """Run the turn until it ends; cancelling the task interrupts it at once."""
        ...

    async def compact(self, host: TurnHost, order: CompactOrder) -> None:
        """Compact the context now (the pod is idle or paused), committing
        `context_compacted` through `host.commit_compaction`; cancelling the task stops it
        and leaves the context as it was. Engines that cannot raise `cannot_compact`."""
        ...

    async def forget_session(self, host: TurnHost) -> bool:
        """The pod was rewound: leave the engine's own session (an external engine's)
        behind, so the next turn starts a new one primed with the context; True when
        there was one. capd's own engine keeps no session and answers False."""
        ...

    def answer_permission(self, request_id: str, option_id: str | None) -> None:
        """A client's answer to a `permission_request` (None cancels it)."""
        ...

    def mcp_status(self) -> list[dict[str, Any]]:
        """`status.mcp` entries (protocol.results.McpServerState) of the MCP servers an
        external engine runs itself; capd's own engine has none (its servers are the
        toolbox's)."""
        ...

    async def settle(self) -> None:
        """Let a turn the engine was interrupted in wind down, so what its prompt still
        reports (an external engine's paused prompt's cost) is recorded before the engine
        is replaced; bounded (settle_timeout_s). capd's own engine has nothing to wait for."""
        ...

    def engine_state(self) -> dict[str, Any] | None:
        """An external engine's process for `status.engine` (`state`, `pid`, `since`; the
        pod adds `reaped`); None for capd's own engine."""
        ...

    def holds_process(self) -> bool:
        """Whether a process runs that `release` may stop (its session survives it)."""
        ...

    def crowded(self) -> bool:
        """Whether its running process is one over `--max-engine-processes`."""
        ...

    async def release(self) -> bool:
        """Stop the process of an idle pod's engine (the actor asks) if its session
        survives it; True when it stopped. The next turn starts it again, resuming."""
        ...

    def take_over(self, old: "Engine") -> None:
        """Carry on from `old`, the engine this one replaces in a reconfigured pod (after
        `old.settle()`): what it knew of its session that the events do not hold."""
        ...

    async def aclose(self) -> None:
        """Release what the engine holds (connections, its process group)."""
        ...


def never_asks(kind: str) -> ProtocolError:
    return ProtocolError("invalid_request", f"this pod's engine ({kind}) never asks for permission")


def cannot_compact(kind: str) -> ProtocolError:
    return ProtocolError(
        "invalid_request", f"this pod's engine ({kind}) manages its own context; it cannot compact"
    )


async def run_timed(
    host: TurnHost, turn: Turn, steps: Callable[[], Awaitable[TurnOutcome]]
) -> TurnOutcome:
    """Run a turn's `steps` within what is left of limits.turn_timeout_s; past it the
    steps are cancelled, as by a pause, and the turn ends `limit_reached`."""
    limit_s = host.manifest.limits.turn_timeout_s
    started = time.monotonic()
    deadline = asyncio.timeout(max(0.0, limit_s - turn.running_s))
    try:
        async with deadline:
            return await steps()
    except TimeoutError:
        if not deadline.expired():
            raise
        return TurnOutcome(
            "limit_reached", turn.output, f"turn ran longer than limits.turn_timeout_s={limit_s:g}"
        )
    finally:
        turn.running_s += time.monotonic() - started
