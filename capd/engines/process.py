"""An external engine's process, and the turn skeleton the external engines share.

The process runs in its own session, so its process group holds everything it starts, in
the pod's cwd, and speaks newline-delimited JSON on stdin and stdout. Its stderr is kept,
bounded, so a failure can name its last lines. It is stopped with its whole group
(`capd.groups`) when the pod stops, is deleted or capd shuts down.

`ExternalEngine` holds one such process per pod. A turn sends one prompt: the user
messages and notifications the engine has not seen, or CONTINUE_PROMPT when a paused turn
resumes. A cancelled turn (pause, cancel, stop, timeout) interrupts the engine the way
its protocol says; the next prompt waits until the engine has wound that turn down. A
process that dies mid-turn is started again once (resuming its session); if it dies again
the turn errors.
"""

import asyncio
import contextlib
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import orjson

from capd.context import ChatMessage
from capd.engines.base import Turn, TurnHost, TurnOutcome, inject_notes, run_timed
from capd.groups import KILL_GRACE_S, signal_name, terminate_group
from protocol.errors import ProtocolError

log = logging.getLogger(__name__)

LINE_LIMIT = 64 * 1024 * 1024
"""The longest line an engine may write on stdout."""
STDERR_KEPT = 64 * 1024
"""Bytes of an engine's latest stderr kept for error messages."""
STDERR_SHOWN = 400
"""Characters of stderr's end quoted in an error message."""
SETTLE_TIMEOUT_S = 10.0
"""How long an interrupted engine has to wind its turn down before it is restarted."""
CONTINUE_PROMPT = "You were interrupted. Continue where you left off."


class EngineError(Exception):
    """The turn cannot go on; the one-line message becomes the turn's error."""


class EngineDied(EngineError):
    """The engine process exited, or broke its protocol and was stopped."""


def check_command(kind: str, command: Sequence[str], env: dict[str, str], cwd: Path) -> None:
    """Refuse (invalid_request) an engine command that names no executable file."""
    exe = command[0]
    if "/" in exe:
        path = cwd / exe
        found = path.is_file() and os.access(path, os.X_OK)
        where = f"{path} is not an executable file"
    else:
        search = env.get("PATH", os.environ.get("PATH", os.defpath))
        found = shutil.which(exe, path=search) is not None
        where = f"{exe} is not found on PATH"
    if not found:
        raise ProtocolError("invalid_request", f"engine {kind}: command {where}")


class EngineProcess:
    def __init__(self, proc: asyncio.subprocess.Process, label: str) -> None:
        self._proc = proc
        self.label = label
        self._stderr: deque[bytes] = deque()
        self._stderr_bytes = 0
        assert proc.stderr is not None
        self._stderr_task = asyncio.create_task(self._collect_stderr(proc.stderr))

    @classmethod
    async def start(
        cls, label: str, argv: Sequence[str], cwd: Path, env: dict[str, str]
    ) -> "EngineProcess":
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env={**os.environ, **env},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                limit=LINE_LIMIT,
            )
        except OSError as exc:
            raise EngineError(f"cannot start {label} ({argv[0]}): {exc.strerror}") from None
        return cls(proc, label)

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def read(self) -> dict[str, Any] | None:
        """The next JSON object on stdout; None at end of file. Other lines are logged."""
        assert self._proc.stdout is not None
        while True:
            try:
                line = await self._proc.stdout.readline()
            except ValueError:
                self.stop()
                raise EngineDied(
                    f"{self.label} wrote a line longer than {LINE_LIMIT} bytes"
                ) from None
            if not line:
                return None
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                message = None
            if isinstance(message, dict):
                return message
            if line.strip():
                log.warning("%s wrote a line that is no JSON object: %.200r", self.label, line)

    def send(self, message: dict[str, Any]) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        if stdin.is_closing() or self._proc.returncode is not None:
            raise EngineDied(f"{self.label} no longer reads its input")
        stdin.write(orjson.dumps(message) + b"\n")

    async def died(self) -> EngineDied:
        """Why the process ended, once stdout closed: exit status and stderr's end."""
        try:
            async with asyncio.timeout(KILL_GRACE_S):
                code = await self._proc.wait()
                await self._stderr_task
        except TimeoutError:
            self.stop()
            return EngineDied(f"{self.label} closed its output{self._tail()}")
        if code < 0:
            return EngineDied(f"{self.label} was killed by {signal_name(-code)}{self._tail()}")
        return EngineDied(f"{self.label} exited with code {code}{self._tail()}")

    def stop(self) -> None:
        """SIGTERM the process group now, SIGKILL it after KILL_GRACE_S."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        terminate_group(self._proc.pid)

    async def aclose(self) -> None:
        self.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_GRACE_S + 1):
                await self._proc.wait()
        self._stderr_task.cancel()

    async def _collect_stderr(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            self._stderr.append(chunk)
            self._stderr_bytes += len(chunk)
            while self._stderr_bytes - len(self._stderr[0]) >= STDERR_KEPT:
                self._stderr_bytes -= len(self._stderr.popleft())

    def _tail(self) -> str:
        text = b"".join(self._stderr).decode("utf-8", errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            return ""
        tail = " | ".join(lines)[-STDERR_SHOWN:]
        return f"; stderr: {tail}"


class ExternalEngine(ABC):
    """One engine process per pod, started at the pod's first turn."""

    kind: ClassVar[str]

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self._cwd = cwd
        self._env = env
        self._proc: EngineProcess | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[dict[str, Any] | EngineDied] = asyncio.Queue()
        self._settling: asyncio.Task[None] | None = None
        self._sent: int | None = None
        """How many context messages the engine has been given (unknown after a restart)."""
        self._answered = False
        """Whether the engine said anything since the last prompt."""

    async def drive_turn(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        try:
            return await run_timed(host, turn, lambda: self._run(host, turn))
        except EngineError as exc:
            return TurnOutcome("errored", turn.output, str(exc))

    async def aclose(self) -> None:
        if self._settling is not None:
            self._settling.cancel()
        await self._discard()

    async def _run(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        await self._settle()
        inject_notes(host, turn.turn_id)
        prompt = self._next_prompt(host.context.messages)
        restarted = False
        while True:
            # Reset before starting: an engine that dies while starting has answered nothing.
            self._answered = False
            try:
                if self._proc is None:
                    await self._start_or_discard(host, turn)
                return await self._prompt(host, turn, prompt)
            except EngineDied as exc:
                await self._discard()
                if restarted:
                    raise EngineError(
                        f"{self.kind} engine died again after a restart: {exc}"
                    ) from None
                log.warning("pod %s: %s; restarting it", host.name, exc)
                restarted = True
                if self._answered:
                    prompt = CONTINUE_PROMPT

    async def _start_or_discard(self, host: TurnHost, turn: Turn) -> None:
        try:
            await self._start(host, turn)
        except BaseException:
            await self._discard()
            raise

    def _next_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The user messages and notifications the engine has not been given yet. After a
        capd restart the engine's resumed session has all but the trailing ones."""
        start = self._sent
        if start is None:
            start = len(messages)
            while start and messages[start - 1].role == "user":
                start -= 1
        self._sent = len(messages)
        texts = [message.text for message in messages[start:] if message.role == "user"]
        return "\n\n".join(texts) or CONTINUE_PROMPT

    async def _spawn(self, argv: Sequence[str]) -> EngineProcess:
        proc = await EngineProcess.start(f"{self.kind} engine", argv, self._cwd, self._env)
        self._proc = proc
        self._inbox = asyncio.Queue()
        self._pump_task = asyncio.create_task(self._pump(proc))
        return proc

    async def _pump(self, proc: EngineProcess) -> None:
        try:
            while (message := await proc.read()) is not None:
                self._dispatch(message)
            died = await proc.died()
        except EngineDied as exc:
            died = exc
        except Exception as exc:
            # A message of a shape we did not foresee: stop the engine rather than leave
            # the turn waiting for an answer the dead reader would never deliver.
            log.exception("%s engine sent a message capd cannot handle", self.kind)
            proc.stop()
            died = EngineDied(
                f"{self.kind} engine sent a message capd cannot handle: {type(exc).__name__}: {exc}"
            )
        self._on_death(died)
        self._inbox.put_nowait(died)

    async def _next_message(self) -> dict[str, Any]:
        item = await self._inbox.get()
        if isinstance(item, EngineDied):
            self._inbox.put_nowait(item)
            raise item
        return item

    def _send(self, message: dict[str, Any]) -> None:
        if self._proc is None:
            raise EngineDied(f"{self.kind} engine is not running")
        self._proc.send(message)

    async def _settle(self) -> None:
        """Wait for an interrupted turn to end inside the engine. One that does not end
        within SETTLE_TIMEOUT_S costs the engine its process; the next prompt restarts it."""
        drain = self._settling
        if drain is None:
            return
        await asyncio.wait([drain], timeout=SETTLE_TIMEOUT_S)
        self._settling = None
        if not drain.done():
            drain.cancel()
            await self._discard()
        elif drain.cancelled() or drain.exception() is not None:
            await self._discard()

    async def _discard(self) -> None:
        proc, self._proc = self._proc, None
        if self._pump_task is not None:
            self._pump_task.cancel()
            self._pump_task = None
        if proc is not None:
            await proc.aclose()

    @abstractmethod
    async def _start(self, host: TurnHost, turn: Turn) -> None:
        """Start the process (`_spawn`) and open or resume the engine's session."""

    @abstractmethod
    async def _prompt(self, host: TurnHost, turn: Turn, prompt: str) -> TurnOutcome:
        """Send the prompt and turn what the engine says into events until the turn ends.
        Cancelled, it keeps the partial output, interrupts the engine, sets `_settling` to
        a task that reads until the engine has wound the turn down, and re-raises."""

    @abstractmethod
    def _dispatch(self, message: dict[str, Any]) -> None:
        """Handle a message from the engine: answers and requests here, the rest to
        `_inbox` for the turn (or the drain) to read."""

    @abstractmethod
    def _on_death(self, died: EngineDied) -> None:
        """The process is gone: fail whatever waits on an answer from it."""
