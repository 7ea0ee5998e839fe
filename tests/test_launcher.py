"""The process launcher, in-process: where and how a process starts, and how its group stops."""

import asyncio
import os
import sys
from pathlib import Path

import orjson
import pytest

from capd.proc import leftovers
from capd.proc.launcher import launch, stop_group
from capd.proc.leftovers import OWNER_ENV, OWNER_FILE

REPORT = (
    "import json, os; print(json.dumps([os.getpid(), os.getpgid(0), os.getcwd(),"
    f" os.environ.get({OWNER_ENV!r}), os.environ.get('LAUNCHER_TEST')]))"
)


async def test_a_process_starts_in_its_own_group_in_cwd_marked_as_this_capds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leftovers, "_mark", {})
    leftovers.claim(tmp_path)
    token = (tmp_path / OWNER_FILE).read_text().split()[-1]
    proc = await launch(
        [sys.executable, "-c", REPORT],
        cwd=tmp_path,
        confine=None,
        env={"LAUNCHER_TEST": "1", OWNER_ENV: "not-capd"},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    pid, pgid, cwd, owner, variable = orjson.loads(out)
    assert (pid, pgid) == (proc.pid, proc.pid)
    assert pgid != os.getpgid(0)
    assert Path(cwd) == tmp_path
    assert (owner, variable) == (token, "1")


async def test_stop_group_stops_what_the_process_started(tmp_path: Path) -> None:
    proc = await launch(["sh", "-c", "sleep 60 & exec sleep 60"], cwd=tmp_path, confine=None)
    stop_group(proc)
    assert await asyncio.wait_for(proc.wait(), 5) < 0
    async with asyncio.timeout(5):
        while True:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.02)
