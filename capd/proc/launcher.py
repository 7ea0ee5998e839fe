"""Starting the processes capd runs for its pods (bash commands, external engines), and
stopping them.

A process starts in its own session, so its process group holds everything it starts and
`stop_group` stops all of it (`capd.proc.groups`: SIGTERM now, SIGKILL after the grace).
It runs in the directory it is given, with capd's environment, the caller's variables over
it and the owner mark over both (`capd.proc.leftovers`: the next capd stops it if this one
dies). Its stdin, stdout and stderr are what the caller asks for, never capd's own. How a
process runs is decided here alone, so confining it (a sandbox around the argv, an
environment allow-list, resource limits) changes this module, not its callers.
"""

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from capd.proc.groups import terminate_group
from capd.proc.leftovers import owner_mark
from capd.proc.limits import Leaf

STREAM_LIMIT = 64 * 1024
"""asyncio's default bound on a line read from a piped stream."""


async def launch(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    inherit: Callable[[str], bool] | None = None,
    stdin: int = asyncio.subprocess.DEVNULL,
    stdout: int = asyncio.subprocess.DEVNULL,
    stderr: int = asyncio.subprocess.DEVNULL,
    limit: int = STREAM_LIMIT,
    leaf: Leaf | None = None,
) -> asyncio.subprocess.Process:
    """Start `argv` in `cwd` in a new process group. `env` adds to the environment;
    `inherit`, when given, says which of capd's own variables are passed on; `stdin`,
    `stdout` and `stderr` are each asyncio.subprocess.PIPE, DEVNULL or a file descriptor;
    `limit` bounds a line read from a piped stream; `leaf` (`capd.proc.limits`) is where
    the process and all it starts are limited, closed once it exits. OSError when it
    cannot start."""
    if leaf is not None:
        argv = leaf.wrap(argv)  # outermost: the shim enters the leaf, then execs the rest
    process = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=environment(env, inherit),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        limit=limit,
    )
    if leaf is not None:
        leaf.close_after(process)
    return process


async def launch_piped(
    argv: Sequence[str],
    *,
    cwd: Path,
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
    env: Mapping[str, str] | None = None, inherit: Callable[[str], bool] | None = None
) -> dict[str, str]:
    """The environment of a process started with `env` and `inherit`."""
    own = os.environ if inherit is None else {k: v for k, v in os.environ.items() if inherit(k)}
    return {**own, **(env or {}), **owner_mark()}


def stop_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the group of a process `launch` started, SIGKILL it after the grace unless
    it is gone. Returns at once."""
    terminate_group(process.pid)
