"""A stdio MCP server's process: how its command is found, and what its stderr leaves."""

import asyncio
import contextlib
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from capd.proc import launcher
from capd.proc.groups import KILL_GRACE_S
from capd.proc.launcher import launch
from capd.tools.mcp.transport import CannotStart, ServerProcess, resolve_command


def test_a_command_with_a_slash_is_taken_relative_to_the_cwd(tmp_path: Path) -> None:
    server = tmp_path / "bin" / "server"
    server.parent.mkdir()
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    assert resolve_command("bin/server", tmp_path, {}) == str(server)
    with pytest.raises(CannotStart, match=r"cannot start bin/nope: .* is not an executable file"):
        resolve_command("bin/nope", tmp_path, {})


def test_a_bare_name_is_looked_up_on_path_the_servers_env_may_set(tmp_path: Path) -> None:
    (tmp_path / "my-server").write_text("#!/bin/sh\n")
    (tmp_path / "my-server").chmod(0o755)
    assert resolve_command("sh", tmp_path, {}).endswith("/sh")
    assert resolve_command("my-server", Path("/"), {"PATH": str(tmp_path)}) == str(
        tmp_path / "my-server"
    )
    with pytest.raises(CannotStart, match="cannot start no-such-server: it is not found on PATH"):
        resolve_command("no-such-server", tmp_path, {})


async def test_stderr_is_kept_scrubbed_in_a_private_file_and_says_why_it_ended(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state" / "mcp-s.stderr"
    script = (
        "echo 'token s3cr3t-value rejected' >&2; echo 'Error: bad token s3cr3t-value' >&2; exit 3"
    )
    process = await ServerProcess.start(
        ["sh", "-c", script],
        cwd=tmp_path,
        confine=None,
        env={},
        stderr_path=path,
        scrub=lambda text: text.replace("s3cr3t-value", "${TOKEN}"),
    )
    await process.exited
    reason = await process.exit_reason()
    await process.aclose()
    assert reason == "it exited with code 3; stderr: Error: bad token ${TOKEN}"
    text = path.read_text()
    assert "token ${TOKEN} rejected" in text
    assert "s3cr3t-value" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_a_secret_in_a_long_unfinished_line_is_scrubbed_where_it_is_cut(
    tmp_path: Path,
) -> None:
    path = tmp_path / "mcp-s.stderr"
    secret = "s3cr3t-value-0123456789"
    # 8182 + 23 characters are more than a piece (8192): the cut falls inside the secret
    # while the line is unfinished.
    script = (
        "import sys, time; "
        f"sys.stderr.write('x' * 8182 + {secret!r}); sys.stderr.flush(); time.sleep(0.3); "
        "sys.stderr.write('\\n'); sys.exit(3)"
    )
    process = await ServerProcess.start(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        confine=None,
        env={},
        stderr_path=path,
        scrub=lambda text: text.replace(secret, "${TOKEN}"),
        secret_chars=len(secret),
    )
    await process.exited
    reason = await process.exit_reason()
    await process.aclose()
    text = path.read_text()
    assert "${TOKEN}" in text
    assert not any(secret[:3] in piece for piece in (text, reason, process.stderr_said()))


def _running_in_group(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not zombies."""
    running = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                running.append(int(stat_file.parent.name))
    return running


async def test_a_start_cut_short_while_launching_stops_the_servers_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    go_on = asyncio.Event()

    async def slow_launch(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await launch(*args, **kwargs)  # its child is about to start in its group
        launched.set_result(proc.pid)
        await go_on.wait()
        return proc

    monkeypatch.setattr(launcher, "launch", slow_launch)
    starting = asyncio.create_task(
        ServerProcess.start(
            ["sh", "-c", "sleep 60 & wait"],
            cwd=tmp_path,
            confine=None,
            env={},
            stderr_path=None,
            scrub=str,
        )
    )
    pgid = await launched
    starting.cancel()
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await starting
    async with asyncio.timeout(KILL_GRACE_S + 2):
        while _running_in_group(pgid):
            await asyncio.sleep(0.05)
