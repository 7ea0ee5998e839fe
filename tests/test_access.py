"""Who may connect: SO_PEERCRED is checked on every connection, whatever the file modes."""

import asyncio
import grp
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CapdProcess

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


def _as_nobody(socket_path: Path) -> dict[str, Any]:
    """Connect as uid/gid nobody from a forked child (no exec: the interpreter may live
    where nobody cannot read) and return the hello and the reply to `info`."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, talk, report through the pipe, exit
        code = 0
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(socket_path))
                stream = sock.makefile("rwb")
                hello = json.loads(stream.readline())
                try:
                    stream.write(b'{"method": "info", "id": 1}\n')
                    stream.flush()
                    line = stream.readline()
                except (BrokenPipeError, ConnectionResetError):
                    line = b""  # refused: capd has closed the connection
            seen = {"hello": hello, "reply": json.loads(line) if line else None}
            os.write(write_end, json.dumps(seen).encode())
        except BaseException as exc:
            os.write(write_end, json.dumps({"failed": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        seen = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert "failed" not in seen, seen
    return seen


async def test_another_uid_is_refused_even_when_the_modes_let_it_in(capd: CapdProcess) -> None:
    # Loosen the modes by hand, as a mistaken chmod would: the peer check still holds.
    os.chmod(capd.runtime_dir, 0o755)
    os.chmod(capd.socket, 0o666)
    seen = _as_nobody(capd.socket)
    assert seen["hello"]["event"] == "error"
    assert seen["hello"]["code"] == "forbidden"
    assert f"uid {NOBODY} may not use this capd" in seen["hello"]["message"]
    assert seen["reply"] is None, "the connection is closed"


async def test_allow_group_lets_its_members_in(capd_dirs: CapdProcess) -> None:
    capd_dirs.extra_args = ["--allow-group", grp.getgrgid(NOBODY).gr_name]
    await asyncio.to_thread(capd_dirs.start)
    runtime = capd_dirs.runtime_dir.stat()
    sock = capd_dirs.socket.stat()
    assert (stat.S_IMODE(runtime.st_mode), runtime.st_gid) == (0o710, NOBODY)
    assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, NOBODY)
    seen = _as_nobody(capd_dirs.socket)
    assert seen["hello"]["event"] == "hello"
    assert seen["reply"]["result"]["pid"] == capd_dirs.proc.pid


def test_an_unknown_group_is_refused_at_start(capd_dirs: CapdProcess) -> None:
    capd_dirs.extra_args = ["--allow-group", "no-such-group-here"]
    with pytest.raises(RuntimeError, match="--allow-group no-such-group-here: no such group"):
        capd_dirs.start()
