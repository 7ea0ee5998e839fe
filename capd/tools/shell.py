"""The `bash` tool: one shell command in the pod's working directory.

The command runs in its own process group (`capd.proc.launcher`), which holds everything it
starts. The group is stopped when the command's main process exits, when it times out, and
when the tool call is cancelled (pause, cancel, stop, shutdown), so nothing it started
outlives the call. A cancelled call returns at once.

Output goes to a pipe we own (not asyncio's subprocess pipes), so we can stop reading
whenever we choose, even when a process that escaped the group still holds the pipe open.
"""

import asyncio
import os
import secrets
import time
from pathlib import Path
from typing import BinaryIO

from capd.proc.groups import signal_name
from capd.proc.launcher import launch, stop_group
from capd.proc.limits import Leaf, Outcome
from capd.proc.sandbox import PathMoved
from capd.tools.base import Tool, ToolContext, ToolFailed, ToolOutcome
from protocol.tools import BashArgs

DEFAULT_TIMEOUT_S = 120.0
SPILL_LIMIT = 64 * 1024 * 1024
"""Most bytes of one command's output kept in its spill file."""
SPILL_FILES = 20
"""Spill files kept per pod, newest first."""
DRAIN_GRACE_S = 1.0
"""How long to read on after the group is killed; only a writer that left the group
(e.g. `setsid cmd &`) keeps the pipe open that long."""


class _OutputCollector(asyncio.Protocol):
    """Keeps the first `limit` bytes of a pipe and counts the rest, so writers never block.
    Once the output outgrows `limit`, all of it (up to SPILL_LIMIT bytes) also goes to
    `spill_path`, so the model can read what it was not shown."""

    def __init__(self, limit: int, spill_path: Path | None) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.total = 0
        self.spill_path = spill_path
        self.spilled = 0
        self._spill: BinaryIO | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += data[:room]
        if self.total > self.limit and self.spill_path is not None:
            if self._spill is None:
                self._open_spill()
                data = data[max(room, 0) :]
            self._write_spill(data)

    def _open_spill(self) -> None:
        assert self.spill_path is not None
        try:
            _prune_spills(self.spill_path.parent, self.spill_path.name.partition("-")[0])
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._spill = os.fdopen(os.open(self.spill_path, flags, 0o600), "wb")
        except OSError:
            self.spill_path = None
            return
        self._write_spill(bytes(self.kept))

    def _write_spill(self, data: bytes) -> None:
        if self._spill is None or self.spilled >= SPILL_LIMIT:
            return
        data = data[: SPILL_LIMIT - self.spilled]
        try:
            self._spill.write(data)
        except OSError:
            return
        self.spilled += len(data)

    def finish(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish()
        if not self.closed.done():
            self.closed.set_result(None)


class BashTool(Tool[BashArgs]):
    name = "bash"
    description = (
        "Run a shell command with bash in the working directory. stdout and stderr are "
        "returned together; stdin is empty. Background processes are killed when the command "
        f"ends. The command is killed after timeout_s seconds (default {DEFAULT_TIMEOUT_S:g})."
    )
    args_model = BashArgs

    async def run(self, args: BashArgs, ctx: ToolContext) -> ToolOutcome:
        timeout_s = DEFAULT_TIMEOUT_S if args.timeout_s is None else args.timeout_s
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        try:
            spill = _spill_path(ctx)
            transport, collector = await loop.connect_read_pipe(
                lambda: _OutputCollector(ctx.output_limit, spill),
                os.fdopen(read_fd, "rb", buffering=0),
            )
            try:
                leaf = _leaf(ctx)
                proc = await _spawn(args.command, ctx, write_fd, leaf)
            except BaseException:
                transport.close()
                raise
        finally:
            os.close(write_fd)

        timed_out = False
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    await proc.wait()
            except TimeoutError:
                timed_out = True
            stop_group(proc)
            returncode = await proc.wait()
            if leaf is not None:
                await leaf.close()  # what is left in it dies now, setsid escapees too
            await asyncio.wait([collector.closed], timeout=DRAIN_GRACE_S)
        except BaseException:
            stop_group(proc)
            raise
        finally:
            transport.close()
            collector.finish()
        limited = leaf.outcome() if leaf is not None else None
        return _outcome(collector, returncode, timed_out, timeout_s, limited)


def _leaf(ctx: ToolContext) -> Leaf | None:
    """The call's own leaf of the pod's limits, if it has any."""
    try:
        return ctx.limits.leaf("bash") if ctx.limits else None
    except OSError as exc:
        raise ToolFailed(f"cannot set up limits.memory_mb and limits.pids: {exc}") from exc


async def _spawn(
    command: str, ctx: ToolContext, output_fd: int, leaf: Leaf | None
) -> asyncio.subprocess.Process:
    try:
        return await launch(
            ["bash", "-c", command],
            cwd=ctx.cwd,
            confine=ctx.sandbox,
            stdout=output_fd,
            stderr=output_fd,
            leaf=leaf,
        )
    except PathMoved as exc:
        raise ToolFailed(str(exc)) from exc
    except OSError as exc:
        raise ToolFailed(f"cannot run bash in {ctx.cwd}: {exc.strerror}") from exc


def _outcome(
    collector: _OutputCollector,
    returncode: int,
    timed_out: bool,
    timeout_s: float,
    limited: Outcome | None,
) -> ToolOutcome:
    """The result's text and whether it is an error; `limited` is what the pod's limits
    did (`Leaf.outcome`)."""
    text = collector.kept.decode("utf-8", errors="replace").removesuffix("\n")
    lines = [text] if text else []
    if note := _truncation_note(collector):
        lines.append(note)
    if timed_out:
        lines.append(f"[command timed out after {timeout_s:g} s and was killed]")
    elif returncode < 0:
        lines.append(f"[killed by signal {signal_name(-returncode)}]")
    elif returncode > 0:
        lines.append(f"[exit code {returncode}]")
    if limited is not None:
        lines.append(limited.text)
    if not lines:
        lines.append("[no output]")
    failed = timed_out or returncode != 0 or (limited is not None and limited.failed)
    return ToolOutcome("\n".join(lines), is_error=failed)


def _truncation_note(collector: _OutputCollector) -> str | None:
    if collector.total <= len(collector.kept):
        return None
    shown = len(collector.kept)
    note = f"output truncated: {collector.total} bytes in all, first {shown} shown"
    if collector.spill_path is not None and collector.spilled == collector.total:
        note += f"; all of it is in {collector.spill_path}"
    elif collector.spill_path is not None:
        note += f"; the first {collector.spilled} bytes are in {collector.spill_path}"
    return f"[{note}]"


def clip_output(data: bytes, ctx: ToolContext, kind: str) -> str:
    """Output of another tool (`kind`, e.g. `mcp`) cut as bash output is: the first
    `ctx.output_limit` bytes, then a note saying how much there was and in which file of
    the pod's spill dir all of it was saved. Call it on the event loop."""
    collector = _OutputCollector(ctx.output_limit, _spill_path(ctx, kind))
    collector.data_received(data)
    collector.finish()
    text = collector.kept.decode("utf-8", errors="replace")
    note = _truncation_note(collector)
    return f"{text}\n{note}" if note else text


def _prune_spills(spill_dir: Path, kind: str) -> None:
    """Make the directory (0700) and keep room for one more file of `kind`: the newest
    SPILL_FILES - 1 stay, so a looping agent cannot fill the disk the store is on."""
    spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = sorted(spill_dir.glob(f"{kind}-*.out"))
    for path in old[: max(0, len(old) - SPILL_FILES + 1)]:
        path.unlink(missing_ok=True)


def _spill_path(ctx: ToolContext, kind: str = "bash") -> Path | None:
    if ctx.spill_dir is None:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return ctx.spill_dir / f"{kind}-{stamp}-{secrets.token_hex(3)}.out"
