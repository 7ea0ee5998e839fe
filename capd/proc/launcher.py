"""Starting the processes capd runs for its pods (bash commands, external engines), and
stopping them.

A process starts in its own session, so its process group holds everything it starts and
`stop_group` stops all of it (`capd.proc.groups`: SIGTERM now, SIGKILL after the grace).
It runs in the directory it is given, with capd's environment, the caller's variables over
it and the owner mark over both (`capd.proc.leftovers`: the next capd stops it if this one
dies). A confined process (`capd.proc.sandbox`) runs inside bwrap instead, with only the
variables its confinement allows and the caller's: bwrap alone keeps the owner mark (it
leads the group, and what runs inside dies with it). Its stdin, stdout and
stderr are what the caller asks for, never capd's own. How a process runs is decided here
alone, so its callers do not change when confining it does.
"""

import asyncio
import contextlib
import errno
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from capd.proc.groups import KILL_GRACE_S, terminate_group
from capd.proc.leftovers import owner_mark
from capd.proc.limits import Leaf
from capd.proc.sandbox import Confinement, PathMoved

STREAM_LIMIT = 64 * 1024
"""asyncio's default bound on a line read from a piped stream."""


async def launch(
    argv: Sequence[str],
    *,
    cwd: Path,
    confine: Confinement | None,
    env: Mapping[str, str] | None = None,
    inherit: Callable[[str], bool] | None = None,
    stdin: int = asyncio.subprocess.DEVNULL,
    stdout: int = asyncio.subprocess.DEVNULL,
    stderr: int = asyncio.subprocess.DEVNULL,
    limit: int = STREAM_LIMIT,
    leaf: Leaf | None = None,
) -> asyncio.subprocess.Process:
    """Start `argv` in `cwd` in a new process group, confined by `confine` (None: capd's
    own processes, and pods with sandbox mode `off`). `env` adds to the environment;
    `inherit`, when given, says which of capd's own variables are passed on (unconfined);
    `stdin`, `stdout` and `stderr` are each asyncio.subprocess.PIPE, DEVNULL or a file
    descriptor; `limit` bounds a line read from a piped stream; `leaf`
    (`capd.proc.limits`) is where the process and all it starts are limited, closed once
    it exits. OSError when it cannot start: `capd.proc.sandbox.PathMoved`, whose text is
    the whole story, when its confinement cannot be set up (bwrap gone, a bound path
    renamed)."""
    starting = _start(argv, cwd, confine, env, inherit, leaf, (stdin, stdout, stderr), limit)
    return await (leaf.start(starting) if leaf is not None else starting)  # closes the leaf


async def _start(
    argv: Sequence[str],
    cwd: Path,
    confine: Confinement | None,
    env: Mapping[str, str] | None,
    inherit: Callable[[str], bool] | None,
    leaf: Leaf | None,
    streams: tuple[int, int, int],
    limit: int,
) -> asyncio.subprocess.Process:
    """`launch`'s start, inside the leaf's `start` (which closes the leaf when it fails,
    a confinement refused included)."""
    fds: tuple[int, ...] = ()
    if confine is not None:
        if not os.access(confine.bwrap, os.X_OK):
            raise PathMoved(
                errno.ENOENT,
                f"sandbox: bwrap {confine.bwrap} is gone since capd started; reinstall it "
                "or restart capd",
            )
        wrapped = confine.wrap(argv)
        argv, fds, outer = wrapped.argv, wrapped.fds, {**confine.environment(env), **owner_mark()}
    else:
        outer = environment(env, inherit)
    if leaf is not None:
        argv = leaf.wrap(argv)  # outermost: the shim enters the leaf, then execs bwrap
    stdin, stdout, stderr = streams
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,  # bwrap itself enters the cwd it bound by fd (--chdir)
            env=outer,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
            limit=limit,
            pass_fds=fds,
        )
    finally:
        for fd in fds:  # bwrap has its own copies
            os.close(fd)


async def launch_piped(
    argv: Sequence[str],
    *,
    cwd: Path,
    confine: Confinement | None,
    env: Mapping[str, str],
    limit: int,
    leaf: Leaf | None = None,
) -> asyncio.subprocess.Process:
    """`launch` with stdin, stdout and stderr piped: a long-lived process capd talks to
    (an engine, an MCP server). A caller cancelled while it starts gets CancelledError and
    the process's whole group is stopped once it has started: a start cut halfway would
    kill only the process, not what it started in its group."""
    launching = asyncio.ensure_future(
        launch(
            argv,
            cwd=cwd,
            confine=confine,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=limit,
            leaf=leaf,
        )
    )
    try:
        return await asyncio.shield(launching)
    except asyncio.CancelledError:
        launching.add_done_callback(_stop_launched)
        raise


def _stop_launched(launching: "asyncio.Future[asyncio.subprocess.Process]") -> None:
    if not launching.cancelled() and launching.exception() is None:
        stop_group(launching.result())


def environment(
    env: Mapping[str, str] | None = None,
    inherit: Callable[[str], bool] | None = None,
    confine: Confinement | None = None,
) -> dict[str, str]:
    """The environment of a process started with `env` and `inherit` (or `confine`),
    without the owner mark when it is confined: what the process itself sees."""
    if confine is not None:
        return confine.environment(env)
    own = os.environ if inherit is None else {k: v for k, v in os.environ.items() if inherit(k)}
    return {**own, **(env or {}), **owner_mark()}


def stop_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the group of a process `launch` started, SIGKILL it after the grace unless
    it is gone. Returns at once."""
    terminate_group(process.pid)


async def close_piped(process: asyncio.subprocess.Process, confined: bool) -> None:
    """Close the stdin of a process `launch_piped` started, then stop its group. A
    confined one first gets up to KILL_GRACE_S to exit on its own: a signal to its group
    tears its sandbox down at once, SIGTERM's grace included."""
    if process.stdin is not None:
        process.stdin.close()
    if confined and process.returncode is None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_GRACE_S):
                await process.wait()
    stop_group(process)
