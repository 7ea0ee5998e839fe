"""Workspace checkpoints: the time of a checkpoint (`capd.checkpoints.CheckpointStore.take`)
of a cwd of `checkpoint_files` files holding `checkpoint_mb` MB, beside `git add -A && git
commit` of the same tree into a throwaway repository, in the same run.

Both record the same work tree: the store into its private object store and index, the
baseline into a repository of its own whose work tree is the same directory (the user's
`.gitignore` and the like would apply to both alike; the tree has none). The first
checkpoint of the whole tree is timed twice each (capd first, then git first, each into
a fresh store); then, round after round, one file is changed and each records it in
turn, and the figure is the median of `checkpoint_rounds` rounds.
"""

import asyncio
import base64
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.report import Figure
from bench.sizes import Size
from capd.checkpoints import CheckpointStore, Taken
from protocol.manifest import Workspace

FIRST_PAIRS = 2
"""First checkpoints of the whole tree, each into a fresh store and a fresh repository,
in turn capd first and git first; the figure is their mean."""
PER_DIR = 100
"""Files to a directory."""
GIT_ENV = {
    **{name: value for name, value in os.environ.items() if not name.startswith("GIT_")},
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@localhost",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
}


def run(size: Size) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="capd-bench-checkpoint-", dir="/tmp") as tmp:
        return asyncio.run(_measure(Path(tmp), size))


async def _measure(tmp: Path, size: Size) -> list[Figure]:
    cwd = tmp / "work"
    _fill(cwd, size.checkpoint_files, size.checkpoint_mb)
    firsts_capd: list[float] = []
    firsts_git: list[float] = []
    for order in range(FIRST_PAIRS):
        store = CheckpointStore(tmp / f"checkpoints-{order}", cwd, Workspace())
        baseline = tmp / f"baseline-{order}.git"
        _git(cwd, baseline, "init", "-q")
        if order % 2 == 0:
            firsts_capd.append(await _take(store, "t-first"))
            firsts_git.append(_add_and_commit(cwd, baseline))
        else:
            firsts_git.append(_add_and_commit(cwd, baseline))
            firsts_capd.append(await _take(store, "t-first"))
    changed = sorted(cwd.rglob("*.txt"))
    capd_ms: list[float] = []
    git_ms: list[float] = []
    for round_ in range(size.checkpoint_rounds):
        _change(changed[round_ * 2 % len(changed)])
        capd_ms.append(await _take(store, f"t-{round_}"))
        _change(changed[(round_ * 2 + 1) % len(changed)])
        git_ms.append(_add_and_commit(cwd, baseline))

    tree = f"{size.checkpoint_files:,} files / {size.checkpoint_mb} MB"
    return [
        Figure(
            "checkpoint",
            f"first checkpoint, {tree}",
            statistics.mean(firsts_capd),
            "ms",
            "lower",
            statistics.mean(firsts_git),
            target=1.0,
            target_is_ratio=True,
        ),
        Figure(
            "checkpoint",
            f"checkpoint, {tree}, one file changed, median",
            statistics.median(capd_ms),
            "ms",
            "lower",
            statistics.median(git_ms),
            # Five short gits (ls-files, update-index, write-tree, diff-tree, commit-tree)
            # against `git add` and `git commit`: git's own start-up, 15-20 ms each, is most
            # of both.
            target=1.25,
            target_is_ratio=True,
        ),
    ]


async def _take(store: CheckpointStore, turn_id: str) -> float:
    started = time.perf_counter()
    taken = await store.take(turn_id)
    elapsed = (time.perf_counter() - started) * 1000
    if not isinstance(taken, Taken):
        raise RuntimeError(f"checkpoint {turn_id} skipped: {taken.reason}")
    return elapsed


def _add_and_commit(cwd: Path, git_dir: Path) -> float:
    started = time.perf_counter()
    _git(cwd, git_dir, "add", "-A")
    _git(cwd, git_dir, "commit", "-q", "--allow-empty", "-m", "bench")
    return (time.perf_counter() - started) * 1000


def _git(cwd: Path, git_dir: Path, *args: str) -> None:
    env = {**GIT_ENV, "GIT_DIR": str(git_dir), "GIT_WORK_TREE": str(cwd)}
    # No automatic gc: after 10,000 loose objects a commit starts one in the background,
    # which competes with what is timed next and writes into the repository as it is
    # removed. The store never runs one either.
    subprocess.run(
        ["git", "-c", "gc.auto=0", *args], cwd=cwd, env=env, check=True, capture_output=True
    )


def _fill(cwd: Path, files: int, mb: int) -> None:
    """`files` files of text-like (compressible) content, `mb` MB in all."""
    shutil.rmtree(cwd, ignore_errors=True)
    each = mb * 1024 * 1024 // files
    chance = random.Random(17)
    for n in range(files):
        folder = cwd / f"d{n // PER_DIR:03}"
        folder.mkdir(parents=True, exist_ok=True)
        raw = chance.randbytes(each * 3 // 4 + 1)
        (folder / f"f{n:05}.txt").write_bytes(base64.b64encode(raw)[:each])


def _change(path: Path) -> None:
    with path.open("ab") as file:
        file.write(os.urandom(16).hex().encode() + b"\n")
