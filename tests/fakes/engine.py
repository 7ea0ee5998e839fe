"""A scriptable engine at the engine seam, to drive a pod's controller in-process, as httpx
tests drive a client through a `MockTransport`.

Each `drive_turn` is a `Drive` the test awaits (`FakeEngine.next_drive`). By default a
drive reads the buffered notes, as every engine does at a turn's start, and then waits
until the test ends it (`finish`, `fail`); meanwhile the test makes it emit what an engine
would (`say`, `answer`, `read_notes`). A pause, cancel or stop cancels the turn task,
which shows as `Drive.interrupted`. A `script` replaces the default for turns that must
misbehave.
"""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from capd.engines.base import (
    CompactOrder,
    Engine,
    Turn,
    TurnHost,
    TurnOutcome,
    cannot_compact,
)
from protocol.events import AssistantMessage, ToolCall, ToolResult, TurnResult

WAIT_S = 5.0
"""How long a test waits for something the pod is about to do."""

Script = Callable[["Drive"], Awaitable[TurnOutcome]]


@dataclass(eq=False)
class Drive:
    """One call of `drive_turn`: a turn driven from its start or from a resume."""

    host: TurnHost
    turn: Turn
    ending: "asyncio.Future[TurnOutcome]" = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the controller cancelled the turn task (pause, cancel, stop)."""
    over: asyncio.Event = field(default_factory=asyncio.Event)
    """Set as `drive_turn` returns or raises."""

    def say(self, text: str, *calls: str, interrupted: bool = False) -> AssistantMessage:
        """Emit an assistant_message asking for a tool call per name in `calls`, each with
        the id `<name>-<its position>`."""
        tool_calls = [ToolCall(id=f"{name}-{i}", name=name) for i, name in enumerate(calls)]
        message = AssistantMessage(
            turn_id=self.turn.turn_id, text=text, tool_calls=tool_calls, interrupted=interrupted
        )
        self.host.emit(message)
        return message

    def answer(self, call: ToolCall, output: str = "ok") -> None:
        self.host.emit(
            ToolResult(turn_id=self.turn.turn_id, call_id=call.id, name=call.name, output=output)
        )

    def read_notes(self) -> None:
        """Read the notes buffered since, as the builtin engine does before each model call."""
        self.host.inject_notes(self.turn.turn_id)

    def finish(self, result: TurnResult = "finished", error: str | None = None) -> None:
        """End the turn with the output its assistant messages made."""
        self.ending.set_result(TurnOutcome(result, self.turn.output, error))

    def fail(self, exc: BaseException) -> None:
        self.ending.set_exception(exc)

    async def wait_for_end(self) -> TurnOutcome:
        return await self.ending


async def _by_the_test(drive: Drive) -> TurnOutcome:
    drive.read_notes()
    return await drive.wait_for_end()


class FakeEngine:
    can_compact = False
    checks_budget = False

    def __init__(self, script: Script = _by_the_test) -> None:
        self.script = script
        self.drives: list[Drive] = []
        self.answers: list[tuple[str, str | None]] = []
        """Permission answers, as (request_id, option_id)."""
        self.closed = asyncio.Event()
        self._started: asyncio.Queue[Drive] = asyncio.Queue()

    async def drive_turn(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        drive = Drive(host, turn)
        self.drives.append(drive)
        self._started.put_nowait(drive)
        try:
            return await self.script(drive)
        except asyncio.CancelledError:
            drive.interrupted.set()
            raise
        finally:
            drive.over.set()

    async def compact(self, host: TurnHost, order: CompactOrder) -> None:
        raise cannot_compact("fake")

    async def forget_session(self, host: TurnHost) -> bool:
        return False

    async def settle(self) -> None:
        pass

    def take_over(self, old: Engine) -> None:
        pass

    def answer_permission(self, request_id: str, option_id: str | None) -> None:
        self.answers.append((request_id, option_id))

    def mcp_status(self) -> list[dict[str, Any]]:
        return []

    def engine_state(self) -> None:
        return None

    def holds_process(self) -> bool:
        return False

    def crowded(self) -> bool:
        return False

    async def release(self) -> bool:
        return False

    async def aclose(self) -> None:
        self.closed.set()

    async def next_drive(self) -> Drive:
        """The next turn the pod drives, once it starts."""
        async with asyncio.timeout(WAIT_S):
            return await self._started.get()

    def no_drive_waiting(self) -> bool:
        return self._started.empty()

    async def abandon(self) -> None:
        """End every drive still going, as a capd that dies ends them."""
        for drive in self.drives:
            drive.ending.cancel()
        async with asyncio.timeout(WAIT_S):
            for drive in self.drives:
                await drive.over.wait()
