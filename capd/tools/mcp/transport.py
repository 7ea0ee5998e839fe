"""A stdio MCP server's process, started through capd's one launcher.

It runs in the pod's cwd in its own process group with the owner mark (so a crashed capd's
servers are reaped by the next one), in the pod's sandbox unless it has none, and speaks
newline-delimited JSON-RPC on stdin and stdout; lines may be long (results with images
are). Its stderr is appended, with the values of the `${VAR}`s its config reads scrubbed
out, to `mcp-<server>.stderr` in the pod's state dir (at most STDERR_FILE_LIMIT bytes,
then the file starts over, the old one kept as `.1`), and its latest lines are kept to say
why it died. Nothing here knows the
MCP SDK: `client.py` turns this process into the SDK's streams.
"""

import asyncio
import codecs
import contextlib
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from capd.proc.groups import KILL_GRACE_S, signal_name, terminate_group
from capd.proc.launcher import close_piped, environment, launch_piped, stop_group
from capd.proc.limits import Leaf
from capd.proc.sandbox import Confinement
from capd.proc.stderr import StderrTail

LINE_LIMIT = 64 * 1024 * 1024
"""The longest line a server may write on stdout."""
STDERR_FILE_LIMIT = 1024 * 1024
"""Bytes a server's stderr file grows to before it starts over."""
STDERR_LINE = 8 * 1024
"""A longer stderr line is cut into pieces this long (characters)."""


class CannotStart(Exception):
    """The server's command is not there or cannot run; the message names it."""


def resolve_command(
    command: str, cwd: Path, env: Mapping[str, str], confine: Confinement | None = None
) -> str:
    """The executable `command` names, as external engines' commands are found: a name
    with a `/` relative to `cwd`, a bare name on PATH (`env`'s, over what the process
    gets of capd's: all of it, or what `confine` allows)."""
    if "/" in command:
        path = cwd / command
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        raise CannotStart(f"cannot start {command}: {path} is not an executable file")
    path = environment(env, confine=confine).get("PATH", os.defpath)
    found = shutil.which(command, path=path)
    if found is None:
        raise CannotStart(f"cannot start {command}: it is not found on PATH")
    return found


class ServerProcess:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        stderr_path: Path | None,
        scrub: Callable[[str], str],
        secret_chars: int,
        confined: bool,
    ) -> None:
        self._proc = proc
        self._confined = confined
        self._scrub = scrub
        self._held = max(secret_chars - 1, 0)
        """Characters of an unfinished stderr line never cut off: they may begin a secret
        whose rest has not come yet."""
        self._stderr_path = stderr_path
        self._tail = StderrTail()
        self._broken: str | None = None
        assert proc.stderr is not None
        self._stderr_task = asyncio.create_task(self._collect_stderr(proc.stderr))
        self.exited: asyncio.Task[int] = asyncio.create_task(proc.wait())
        """Done with the exit status once the process has exited."""

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path,
        confine: Confinement | None,
        env: Mapping[str, str],
        stderr_path: Path | None,
        scrub: Callable[[str], str],
        secret_chars: int = 0,
        leaf: Leaf | None = None,
    ) -> "ServerProcess":
        """`scrub` takes the secrets out of a text; the longest is `secret_chars` long."""
        try:
            proc = await launch_piped(
                argv, cwd=cwd, confine=confine, env=env, limit=LINE_LIMIT, leaf=leaf
            )
        except OSError as exc:
            raise CannotStart(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        return cls(proc, stderr_path, scrub, secret_chars, confine is not None)

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def readline(self) -> bytes:
        """The next line of stdout; empty at its end, and after a line over LINE_LIMIT,
        which stops the server (the rest of its output cannot be framed)."""
        assert self._proc.stdout is not None
        try:
            return await self._proc.stdout.readline()
        except ValueError:
            self._broken = f"it wrote a line longer than {LINE_LIMIT} bytes on stdout"
            self.stop()
            return b""

    async def write(self, line: bytes) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        stdin.write(line)
        await stdin.drain()

    def stop(self) -> None:
        """SIGTERM the process group now, SIGKILL it after KILL_GRACE_S."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        stop_group(self._proc)

    def kill(self) -> None:
        """SIGKILL the process group now: the server hangs (a stopped process ignores
        SIGTERM)."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        terminate_group(self._proc.pid, grace=0)

    async def aclose(self) -> None:
        """Stop the group and wait for the process (bounded), and for its last stderr."""
        await close_piped(self._proc, self._confined)
        await asyncio.wait([self.exited], timeout=KILL_GRACE_S + 1)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(0.5):
                await asyncio.shield(self._stderr_task)
        self._stderr_task.cancel()
        self.exited.cancel()

    async def exit_reason(self) -> str:
        """How the process ended, with what its stderr last said (waits briefly for it)."""
        code = self._proc.returncode
        if self._broken is not None:
            return self._broken
        if code is None:
            return "its output ended"
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            async with asyncio.timeout(0.5):
                await asyncio.shield(self._stderr_task)
        summary = self._tail.summary()
        return f"{self.exit_status()}; stderr: {summary}" if summary else self.exit_status()

    def exit_status(self) -> str:
        """How the process ended, once it has: its exit code or the signal that killed it."""
        code = self._proc.returncode
        if code is None:
            return "it is running"
        return (
            f"it was killed by {signal_name(-code)}" if code < 0 else f"it exited with code {code}"
        )

    def stderr_said(self) -> str:
        """What its stderr says went wrong, in one line ("" when it said nothing)."""
        return self._tail.summary()

    async def _collect_stderr(self, stream: asyncio.StreamReader) -> None:
        out = self._open_stderr_file()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        try:
            while chunk := await stream.read(64 * 1024):
                *lines, pending = (pending + decoder.decode(chunk)).split("\n")
                for line in lines:
                    out = self._keep(line, out)
                if len(pending) > STDERR_LINE + self._held:
                    # Scrubbed before it is cut, so no cut splits a secret it holds whole;
                    # the last _held characters stay, for a secret that is not all here.
                    pending = self._scrub(pending)
                    while len(pending) > STDERR_LINE + self._held:
                        out = self._keep(pending[:STDERR_LINE], out)
                        pending = pending[STDERR_LINE:]
            pending += decoder.decode(b"", final=True)
            if pending:
                out = self._keep(pending, out)
        finally:
            if out is not None:
                out.close()

    def _keep(self, text: str, out: BinaryIO | None) -> BinaryIO | None:
        line = self._scrub(text) + "\n"
        self._tail.add(line)
        if out is None:
            return None
        try:
            if out.tell() > STDERR_FILE_LIMIT:
                out.close()
                assert self._stderr_path is not None
                os.replace(
                    self._stderr_path, self._stderr_path.with_name(self._stderr_path.name + ".1")
                )
                out = self._open_stderr_file()
                if out is None:
                    return None
            out.write(line.encode())
            out.flush()
        except OSError:
            return None
        return out

    def _open_stderr_file(self) -> BinaryIO | None:
        if self._stderr_path is None:
            return None
        try:
            self._stderr_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
            out = os.fdopen(os.open(self._stderr_path, flags, 0o600), "ab")
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            out.write(f"--- {stamp} pid {self._proc.pid} started ---\n".encode())
            return out
        except OSError:
            return None
