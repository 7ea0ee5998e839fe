"""The `bash` tool: one shell command in the pod's working directory.

The command runs in its own session, so its process group holds everything it starts. The
group is killed when the command's main process exits, when it times out, and — with
SIGKILL, at once — when the tool call is cancelled: nothing it started outlives the call.

Output goes to a pipe we own (not asyncio's subprocess pipes), so we can stop reading
whenever we choose, even when a process that escaped the group still holds the pipe open.
"""

import asyncio
import contextlib
import os
import signal

from capd.tools.base import Tool, ToolContext, ToolFailed, ToolOutcome
from protocol.tools import BashArgs

DEFAULT_TIMEOUT_S = 120.0
DRAIN_GRACE_S = 1.0
"""How long to read on after the group is killed; only a writer that left the group
(e.g. `setsid cmd &`) keeps the pipe open that long."""


class _OutputCollector(asyncio.Protocol):
    """Keeps the first `limit` bytes of a pipe and counts the rest, so writers never block."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.total = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    def connection_lost(self, exc: Exception | None) -> None:
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
            transport, collector = await loop.connect_read_pipe(
                lambda: _OutputCollector(ctx.output_limit), os.fdopen(read_fd, "rb", buffering=0)
            )
            try:
                proc = await _spawn(args.command, ctx, write_fd)
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
            _kill_group(proc.pid)
            returncode = await proc.wait()
            await asyncio.wait([collector.closed], timeout=DRAIN_GRACE_S)
        except BaseException:
            _kill_group(proc.pid)
            await proc.wait()
            raise
        finally:
            transport.close()
        return _outcome(collector, returncode, timed_out, timeout_s)


async def _spawn(command: str, ctx: ToolContext, output_fd: int) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command,
            cwd=ctx.cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output_fd,
            stderr=output_fd,
            start_new_session=True,
        )
    except OSError as exc:
        raise ToolFailed(f"cannot run bash in {ctx.cwd}: {exc.strerror}") from exc


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _outcome(
    collector: _OutputCollector, returncode: int, timed_out: bool, timeout_s: float
) -> ToolOutcome:
    text = collector.kept.decode("utf-8", errors="replace").removesuffix("\n")
    lines = [text] if text else []
    if collector.total > len(collector.kept):
        lines.append(
            f"[output truncated: {collector.total} bytes in all, first {len(collector.kept)} shown]"
        )
    if timed_out:
        lines.append(f"[command timed out after {timeout_s:g} s and was killed]")
    elif returncode < 0:
        lines.append(f"[killed by signal {_signal_name(-returncode)}]")
    elif returncode > 0:
        lines.append(f"[exit code {returncode}]")
    if not lines:
        lines.append("[no output]")
    return ToolOutcome("\n".join(lines), is_error=timed_out or returncode != 0)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)
