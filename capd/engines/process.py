"""An external engine's process, and the turn skeleton the external engines share.

The process runs in its own session, so its process group holds everything it starts, in
the pod's cwd, and speaks newline-delimited JSON on stdin and stdout. Its stderr is kept,
bounded: when it dies, the end goes to capd's log and its error names the line that says
why (`capd.proc.stderr`). It is stopped with its whole group (`capd.proc.launcher`) when the pod
stops, is deleted or capd shuts down, and when it exits (what it started would otherwise
hold its output open).

`ExternalEngine` holds one such process per pod. A turn sends one prompt (`_next_prompt`):
the user messages and notifications the engine's session has not seen, followed by
CONTINUE_PROMPT when the turn is resuming; after a rewind, the new session's first prompt
begins with the context the rewind kept (`primer`). An idle pod's process is stopped
when its session survives that (`release`, asked by the pod's actor); the next turn starts
it again and resumes the session, or, when the engine cannot resume it, primes the new
one with the context. A cancelled turn (pause, cancel, stop, timeout) interrupts the
engine the way its protocol says, at once; the next prompt waits until the engine has
wound that turn down. A process that dies mid-turn is started again
once (resuming its session, or with the turn's prompt again in a new one); if it dies
again the turn errors. A session the engine cannot resume is replaced by a new one, never
tried again, and the new session's `engine_session` event says which one it replaces and
why (`_session_lost`, `_record_session`).
"""

import asyncio
import codecs
import contextlib
import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import orjson

from capd.chat import ChatMessage
from capd.compaction import clip, transcript_lines
from capd.context import Context
from capd.engines.base import (
    CompactOrder,
    Engine,
    Turn,
    TurnHost,
    TurnOutcome,
    cannot_compact,
    run_timed,
)
from capd.engines.mcp_handover import HandedServers
from capd.engines.slots import EngineSlot
from capd.proc.groups import KILL_GRACE_S, signal_name
from capd.proc.launcher import close_piped, environment, launch_piped, stop_group
from capd.proc.limits import Leaf, PodLimits
from capd.proc.sandbox import Confinement
from capd.proc.stderr import StderrTail
from protocol.errors import ProtocolError
from protocol.events import EngineSession, ToolResult
from protocol.manifest import AcpEngine as AcpConfig
from protocol.manifest import ClaudeCodeEngine as ClaudeCodeConfig
from protocol.manifest import McpServerConfig

log = logging.getLogger(__name__)

LINE_LIMIT = 64 * 1024 * 1024
"""The longest line an engine may write on stdout."""
STDERR_LOGGED = 8 * 1024
"""Characters of stderr's end written to capd's log when an engine dies."""
INBOX_LIMIT = 1024
"""Engine messages read ahead of the turn; past it the engine waits on its stdout."""
CONTINUE_PROMPT = "You were interrupted. Continue where you left off."
PRIMER = (
    "[capd: {why}, so it goes on in a new session. What was said "
    "before, as a transcript:]\n\n{transcript}\n\n[end of the earlier conversation]"
)
REWOUND = "this conversation was rewound"
LOST = "this conversation's session could not be resumed after its engine stopped"
PRIMER_LINE_TOKENS = 4000
"""Tokens a message of the primer's transcript keeps at most (its start and its end)."""
PRIMER_CHARS = 400_000
"""Characters of transcript a primer carries at most (its start and its end)."""


class EngineError(Exception):
    """The turn cannot go on; the one-line message becomes the turn's error."""


class EngineDied(EngineError):
    """The engine process exited, or broke its protocol and was stopped."""


def check_command(
    kind: str,
    command: Sequence[str],
    env: dict[str, str],
    cwd: Path,
    confine: Confinement | None,
) -> None:
    """Refuse (invalid_request) an engine command that names no executable file."""
    exe = command[0]
    if "/" in exe:
        path = cwd / exe
        found = path.is_file() and os.access(path, os.X_OK)
        where = f"{path} is not an executable file"
    else:
        search = environment(env, confine=confine).get("PATH", os.defpath)
        found = shutil.which(exe, path=search) is not None
        where = f"{exe} is not found on PATH"
    if not found:
        raise ProtocolError("invalid_request", f"engine {kind}: command {where}")


class EngineProcess:
    def __init__(self, proc: asyncio.subprocess.Process, label: str, confined: bool) -> None:
        self._proc = proc
        self.label = label
        self._confined = confined
        self._stderr = StderrTail()
        self._output_deadline: float | None = None
        """Once the process has exited: when to stop waiting for its output to close."""
        self._reading: asyncio.Timeout | None = None
        assert proc.stderr is not None
        self._stderr_task = asyncio.create_task(self._collect_stderr(proc.stderr))
        self._exit_task = asyncio.create_task(self._watch_exit())

    @classmethod
    async def start(
        cls,
        label: str,
        argv: Sequence[str],
        cwd: Path,
        env: dict[str, str],
        confine: Confinement | None,
        leaf: Leaf | None = None,
    ) -> "EngineProcess":
        try:
            proc = await launch_piped(
                argv, cwd=cwd, confine=confine, env=env, limit=LINE_LIMIT, leaf=leaf
            )
        except OSError as exc:
            raise EngineError(f"cannot start {label} ({argv[0]}): {exc.strerror}") from None
        return cls(proc, label, confine is not None)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def exited(self) -> bool:
        return self._proc.returncode is not None

    async def read(self) -> dict[str, Any] | None:
        """The next JSON object on stdout; None once the output has ended. Other lines are
        logged."""
        while True:
            line = await self._readline()
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

    async def _readline(self) -> bytes:
        """A line of stdout; empty at end of file, or when the process has exited and
        something it started still holds stdout open past the group's SIGKILL."""
        assert self._proc.stdout is not None
        try:
            async with asyncio.timeout_at(self._output_deadline) as self._reading:
                return await self._proc.stdout.readline()
        except ValueError:
            self.stop()
            raise EngineDied(f"{self.label} wrote a line longer than {LINE_LIMIT} bytes") from None
        except TimeoutError:
            return b""
        finally:
            self._reading = None

    async def _watch_exit(self) -> None:
        """When the process exits, stop its group: whatever it started would otherwise keep
        its output open and the exit unnoticed."""
        await self._proc.wait()
        stop_group(self._proc)
        self._output_deadline = asyncio.get_running_loop().time() + KILL_GRACE_S + 1
        if self._reading is not None:
            self._reading.reschedule(self._output_deadline)

    def send(self, message: dict[str, Any]) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        if stdin.is_closing() or self._proc.returncode is not None:
            raise EngineDied(f"{self.label} no longer reads its input")
        stdin.write(orjson.dumps(message) + b"\n")

    async def died(self) -> EngineDied:
        """Why the process ended, once its output ended: exit status and stderr's end."""
        try:
            async with asyncio.timeout(KILL_GRACE_S):
                code = await self._proc.wait()
        except TimeoutError:
            self.stop()
            return EngineDied(f"{self.label} closed its output{self._tail()}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_GRACE_S + 1):
                await asyncio.shield(self._stderr_task)
        if stderr := self._stderr.text():
            log.warning(
                "%s (pid %d) ended; its stderr ended with:\n%s",
                self.label,
                self.pid,
                stderr[-STDERR_LOGGED:].rstrip(),
            )
        if code < 0:
            return EngineDied(f"{self.label} was killed by {signal_name(-code)}{self._tail()}")
        return EngineDied(f"{self.label} exited with code {code}{self._tail()}")

    def stop(self) -> None:
        """SIGTERM the process group now, SIGKILL it after KILL_GRACE_S."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        stop_group(self._proc)

    async def aclose(self) -> None:
        await close_piped(self._proc, self._confined)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_GRACE_S + 1):
                await self._proc.wait()
        self._stderr_task.cancel()
        self._exit_task.cancel()

    async def _collect_stderr(self, stream: asyncio.StreamReader) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := await stream.read(4096):
            self._stderr.add(decoder.decode(chunk))

    def _tail(self) -> str:
        summary = self._stderr.summary()
        return f"; stderr: {summary}" if summary else ""


def primer(messages: Sequence[ChatMessage], why: str = REWOUND) -> str:
    """The context a rewind kept, as a transcript for a new session: the session the
    engine had holds what the rewind took back, so it is left behind. Also the context of
    a session lost when its stopped idle engine started again (`why`). A long one keeps
    its start and its end."""
    transcript = "\n\n".join(transcript_lines(messages, PRIMER_LINE_TOKENS))
    return PRIMER.format(why=why, transcript=clip(transcript, PRIMER_CHARS))


class ExternalEngine(ABC):
    """One engine process per pod, started at the pod's first turn."""

    kind: ClassVar[str]
    can_compact: ClassVar[bool] = False
    checks_budget: ClassVar[bool] = False

    def __init__(
        self,
        cwd: Path,
        config: AcpConfig | ClaudeCodeConfig,
        mcp_servers: Mapping[str, McpServerConfig],
        sandbox: Confinement | None,
        pod_limits: PodLimits | None = None,
        slot: EngineSlot | None = None,
    ) -> None:
        self._cwd = cwd
        self._pod_limits = pod_limits
        self._slot = slot
        """Its claim on a process under --max-engine-processes (None: not counted)."""
        self._since = time.time()
        """When the process last started or stopped (`engine_state`)."""
        self._released = False
        """The process was stopped by `release` (or the engine replaced one a reconfigure
        stopped, `take_over`), and no turn has been answered since: a new session that
        replaces the one it could not resume is primed (LOST)."""
        self._env = config.env
        self._sandbox = sandbox
        """How the process is confined (None: not at all)."""
        self._mcp = HandedServers(mcp_servers)
        """The pod's MCP servers, which the engine runs itself."""
        self._settle_timeout_s = config.settle_timeout_s
        self._proc: EngineProcess | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._reaping: set[asyncio.Task[None]] = set()
        self._inbox: asyncio.Queue[dict[str, Any] | EngineDied] = asyncio.Queue(INBOX_LIMIT)
        self._settling: asyncio.Task[None] | None = None
        self._session_id: str | None = None
        self._lost_session: str | None = None
        """A session the engine could not resume: never resumed again."""
        self._lost_reason: str | None = None
        """Why, for the engine_session event of the session that replaces it."""
        self._fresh = False
        """The engine's session is new: it has seen nothing of the pod's context."""
        self._sent: int | None = None
        """The seq of the last context message the engine's session has been given (None:
        unknown, after a capd restart)."""
        self._answered = False
        """Whether the engine said anything since the last prompt."""
        self._primer: str | None = None
        """The session is new after a rewind, or replaces one lost after `release`: its
        first prompt carries the context, saying why (REWOUND or LOST)."""

    async def drive_turn(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        try:
            return await run_timed(host, turn, lambda: self._run(host, turn))
        except EngineError as exc:
            return TurnOutcome("errored", turn.output, str(exc))
        finally:
            self._touch()

    async def compact(self, host: TurnHost, order: CompactOrder) -> None:
        raise cannot_compact(self.kind)

    def mcp_status(self) -> list[dict[str, Any]]:
        return self._mcp.status()

    async def settle(self) -> None:
        await self._settle()

    def engine_state(self) -> dict[str, Any]:
        proc = self._proc
        running = proc is not None and not proc.exited
        return {
            "state": "running" if running else "stopped",
            "pid": proc.pid if running and proc is not None else None,
            "since": self._since,
        }

    def holds_process(self) -> bool:
        return self._proc is not None and not self._proc.exited and self._can_resume()

    def crowded(self) -> bool:
        return self._slot is not None and self._proc is not None and self._slot.crowded()

    async def release(self) -> bool:
        """Stop the process if its session survives it: after an interrupted prompt has
        wound down, unless the engine is still busy or could not resume the session."""
        if self._proc is None:
            return False
        await self._settle()
        if self._proc is None or self._working() or not self._can_resume():
            return False
        await self._discard()
        self._released = True
        return True

    def take_over(self, old: Engine) -> None:
        """The engine a reconfigure replaces stops with its process: a session of its that
        this one cannot resume is primed, as after `release`."""
        if isinstance(old, ExternalEngine) and old._session_id is not None:
            self._released = True

    def _touch(self) -> None:
        """The engine was at work just now: the limit stops the longest idle first."""
        if self._slot is not None:
            self._slot.touch()

    def _working(self) -> bool:
        """Whether the engine works on a prompt of its own (Claude Code's /compact)."""
        return False

    def _can_resume(self) -> bool:
        """Whether a new process can resume the session this one holds."""
        return True

    async def aclose(self) -> None:
        if self._settling is not None:
            self._settling.cancel()
        await self._discard()

    async def forget_session(self, host: TurnHost) -> bool:
        """Stop the process, which holds the session, and forget the session: the next
        start opens a new one, which `_start_or_discard` marks for a primer."""
        had = self._session_id is not None or host.context.engine_session is not None
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        await self._discard()
        self._session_id = self._lost_session = self._lost_reason = None
        self._sent = None
        return had

    async def _run(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        host.check_budget()
        await self._settle()
        self._record_session(host, turn)
        host.inject_notes(turn.turn_id)
        restarted = False
        while True:
            # Reset before starting: an engine that dies while starting has answered nothing.
            self._answered = False
            sent = self._sent
            try:
                if self._proc is None:
                    await self._start_or_discard(host, turn)
                prompt, upto = self._next_prompt(host.context, turn)
                self._send_prompt(prompt)
                self._sent, self._fresh, self._primer = upto, False, None
                outcome = await self._read_turn(host, turn)
                self._released = False  # the session, resumed or primed, answered
                return outcome
            except EngineDied as exc:
                await self._discard()
                if not self._answered:
                    # Its session may never have taken the prompt in: give it again.
                    self._sent = sent
                if restarted:
                    raise EngineError(
                        f"{self.kind} engine died again after a restart: {exc}"
                    ) from None
                log.warning("pod %s: %s; restarting it", host.name, exc)
                restarted = True

    async def _start_or_discard(self, host: TurnHost, turn: Turn | None) -> None:
        # Asked before `_start` records the new session, which makes it no longer due.
        rewound = host.context.primer_due()
        try:
            await self._start(host, turn)
            why = REWOUND if rewound else LOST if self._released else None
            self._primer = why if self._fresh else None
        except asyncio.CancelledError:
            # A pause must not wait for a half-started engine to exit.
            self._abandon()
            raise
        except BaseException:
            await self._discard()
            raise

    def _next_prompt(self, context: Context, turn: Turn) -> tuple[str, int]:
        """The prompt for the turn, and the seq of the last message it brings the engine to.

        It is the user messages and notifications the engine's session has not seen. A
        new session has seen none of the turn (what came before the turn is lost to it);
        after a capd restart a resumed session has seen all but the trailing user
        messages. When the session has seen part of the turn, the turn is resuming:
        CONTINUE_PROMPT follows whatever is new. A compaction's summary heading the
        context is the engine's own (it compacted its session), never part of a prompt."""
        messages = context.messages
        first = max(context.index_after(turn.started_seq), int(context.summary is not None))
        if self._fresh:
            start = first
        elif self._sent is not None:
            start = context.index_after(self._sent)
        else:
            start = len(messages)
            while start > first and messages[start - 1].role == "user":
                start -= 1
        texts = [message.text for message in messages[start:] if message.role == "user"]
        if start > first or not texts:
            texts.append(CONTINUE_PROMPT)
        kept = messages[: context.index_after(turn.started_seq)]
        if self._primer is not None and kept:
            texts.insert(0, primer(kept, self._primer))
        return "\n\n".join(texts), context.last_message_seq()

    def _note_session(self, session_id: object) -> None:
        if isinstance(session_id, str) and session_id:
            self._session_id = session_id

    def _session_to_resume(self, host: TurnHost) -> str | None:
        """The engine's session, else the pod's recorded one unless it could not be resumed."""
        stored = host.context.engine_session
        return self._session_id or (None if stored == self._lost_session else stored)

    def _session_lost(self, session_id: str, reason: str) -> None:
        """The engine cannot resume `session_id` (its store pruned it, or it lives under
        another HOME): the next start opens a new session, whose engine_session event
        records the loss, so that no later turn fails on the same resume."""
        log.warning("%s engine cannot resume session %s: %s", self.kind, session_id, reason)
        self._session_id = None
        self._lost_session, self._lost_reason = session_id, reason

    def _record_session(self, host: TurnHost, turn: Turn | None) -> None:
        """Record a new session id where a restarted capd finds it to resume (`turn` is
        None for an engine started to compact between turns). It says which session it
        replaces only when that one was lost (`_session_lost`): an engine that moves to a
        new id by itself (a forked session) lost nothing."""
        stored = host.context.engine_session
        if self._session_id and self._session_id != stored:
            lost = stored is not None and stored == self._lost_session
            event = EngineSession(
                turn_id=turn.turn_id if turn is not None else None,
                session_id=self._session_id,
                replaced=stored if lost else None,
                reason=self._lost_reason if lost else None,
            )
            host.emit(event)
            self._lost_reason = None

    def _record_late(self, host: TurnHost, turn: Turn, result: ToolResult | None = None) -> None:
        """Record what the engine said while winding an interrupted turn down: its session
        id, and the result of a tool that ran to the end. Only while the turn is still
        the pod's and the call still open (a resume or cancel closes it); otherwise the
        session id waits for the next turn."""
        if host.turn is not turn:
            return
        self._record_session(host, turn)
        if result is not None and result.call_id in {c.id for c in host.context.orphaned_calls()}:
            host.emit(result)

    async def _spawn(self, argv: Sequence[str]) -> EngineProcess:
        if self._reaping:  # one stopped mid-start (`_abandon`) may still hold the session
            await asyncio.wait(self._reaping)
        leaf = self._pod_limits.leaf("engine") if self._pod_limits else None
        if self._slot is not None:
            await self._slot.acquire()
        try:
            proc = await EngineProcess.start(
                f"{self.kind} engine", argv, self._cwd, self._env, self._sandbox, leaf
            )
        except BaseException:
            if self._slot is not None:
                self._slot.release()
            raise
        self._proc, self._since = proc, time.time()
        self._inbox = asyncio.Queue(INBOX_LIMIT)
        self._pump_task = asyncio.create_task(self._pump(proc))
        return proc

    async def _pump(self, proc: EngineProcess) -> None:
        try:
            while (message := await proc.read()) is not None:
                if self._dispatch(message):
                    await self._inbox.put(message)
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
        if self._proc is proc:
            self._since = time.time()
            if self._slot is not None:
                self._slot.exited()
        self._on_death(died)
        await self._inbox.put(died)

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
        within settle_timeout_s costs the engine its process; the next prompt restarts
        it."""
        drain = self._settling
        if drain is None:
            return
        await asyncio.wait([drain], timeout=self._settle_timeout_s)
        self._settling = None
        if not drain.done():
            log.warning("%s engine did not wind its turn down in time; restarting it", self.kind)
            drain.cancel()
            await self._discard()
        elif drain.cancelled() or drain.exception() is not None:
            await self._discard()

    def _abandon(self) -> None:
        """Stop the process and forget it; it is reaped in the background."""
        proc, self._proc = self._proc, None
        if self._pump_task is not None:
            self._pump_task.cancel()
            self._pump_task = None
        if self._slot is not None:
            self._slot.release()
        if proc is not None:
            self._since = time.time()
            reaping = asyncio.create_task(proc.aclose())
            self._reaping.add(reaping)
            reaping.add_done_callback(self._reaping.discard)

    async def _discard(self) -> None:
        """Stop the process and wait until it is gone."""
        self._abandon()
        if self._reaping:
            await asyncio.wait(self._reaping)

    @abstractmethod
    async def _start(self, host: TurnHost, turn: Turn | None) -> None:
        """Start the process (`_spawn`), open or resume the engine's session and set
        `_session_id` and `_fresh`; `turn` is None when it starts to compact."""

    @abstractmethod
    def _send_prompt(self, prompt: str) -> None:
        """Send the prompt; the engine's answer is read by `_read_turn`."""

    @abstractmethod
    async def _read_turn(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        """Turn what the engine says into events until the prompt's turn ends. Cancelled,
        it keeps the partial output, interrupts the engine, sets `_settling` to a task
        that reads until the engine has wound the turn down, and re-raises."""

    @abstractmethod
    def _dispatch(self, message: dict[str, Any]) -> bool:
        """Handle a message from the engine: answers and requests here; True sends it to
        `_inbox` for the turn (or the wind-down) to read."""

    @abstractmethod
    def _on_death(self, died: EngineDied) -> None:
        """The process is gone: fail whatever waits on an answer from it."""
