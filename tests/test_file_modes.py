"""What capd writes in its state and runtime dirs is its owner's alone (issue 14,
finding 10): the store and its WAL, the lock files, the owner token, spilled tool output.
Only the sockets are shared, with `--allow-group`'s group (0660 in a 0710 runtime dir)."""

import grp
import os
import signal
import stat
from pathlib import Path

from tests.conftest import CapdProcess
from tests.helpers import connect_pod, run_turn, scripted, spawn

LOUD = {"name": "bash", "arguments": {"command": "seq 1 100000"}}
"""Output past the tool's limit, so it spills to a file in the pod's state dir."""


def _loose(root: Path, allowed_for_sockets: int, allowed_for_dirs: int) -> list[str]:
    """Everything under `root`, itself included, with mode bits beyond those allowed."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISSOCK(mode):
            allowed = allowed_for_sockets
        elif stat.S_ISDIR(mode):
            allowed = allowed_for_dirs
        else:
            allowed = 0o700
        if stat.S_IMODE(mode) & ~allowed:
            found.append(f"{path} {stat.filemode(mode)}")
    return found


async def test_nothing_capd_writes_is_readable_by_others(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    # Sharing with one's own group needs no privileges, and shows which modes it opens.
    capd_dirs.extra_args = ["--allow-group", grp.getgrgid(os.getgid()).gr_name]
    capd_dirs.start()
    model = scripted({"tool_calls": [LOUD]}, {"text": "done"})
    await spawn(capd_dirs, "home", model, tools=["bash"])  # cwd in the state dir
    await spawn(capd_dirs, "away", model, tools=["bash"], cwd=str(tmp_path))
    for name in ("home", "away"):
        async with await connect_pod(capd_dirs, name) as pod:
            end, events = await run_turn(pod, "be loud")
        assert end["result"] == "finished"
        output = next(e["output"] for e in events if e["event"] == "tool_result")
        assert f"/pods/{name}/spill/bash-" in output, "the output spilled to a file"

    state, runtime = capd_dirs.state_dir, capd_dirs.runtime_dir
    names = {p.name for p in state.rglob("*")}
    assert {"capd.db", "capd.db-wal", "capd.db-shm", "capd.lock", "owner"} <= names
    assert (runtime / "capd.lock").exists()
    loose = _loose(state, 0o600, 0o700) + _loose(runtime, 0o660, 0o710)
    assert not loose, "\n".join(loose)


def test_files_an_older_capd_left_readable_are_narrowed(capd_dirs: CapdProcess) -> None:
    capd_dirs.start()
    capd_dirs.signal(signal.SIGKILL)  # as a crash leaves them: the WAL and the owner token
    state, runtime = capd_dirs.state_dir, capd_dirs.runtime_dir
    left = [p for p in [*state.iterdir(), *runtime.iterdir()] if p.is_file()]
    assert {p.name for p in left} >= {"capd.db", "capd.db-wal", "owner", "capd.lock"}
    for path in left:
        path.chmod(0o644)
    capd_dirs.start()
    loose = _loose(state, 0o600, 0o700) + _loose(runtime, 0o600, 0o700)
    assert not loose, "\n".join(loose)
