"""Workspace checkpoints with real git on real files (capd.checkpoints): what a rewind
brings back, what it leaves alone, the user's repository untouched, the bounds, and a
store that survives a git killed part-way."""

import asyncio
import contextlib
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from capd.checkpoints import CheckpointError, CheckpointStore, Skipped, Taken, require_git
from protocol.errors import ProtocolError
from protocol.manifest import Workspace

USER_GIT_ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_OPTIONAL_LOCKS": "0",
    "GIT_AUTHOR_NAME": "user",
    "GIT_AUTHOR_EMAIL": "user@example.com",
    "GIT_COMMITTER_NAME": "user",
    "GIT_COMMITTER_EMAIL": "user@example.com",
}
"""How the test plays the user's git: never taking optional locks, so that looking at the
repository does not change its index either."""


def user_git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=repo, env=USER_GIT_ENV, capture_output=True, text=True, check=True
    )
    return done.stdout


def store_git(checkpoints: CheckpointStore, *args: str) -> str:
    """A git command on the checkpoint store itself, as a user recovering files would."""
    return user_git(checkpoints.root, "--git-dir", str(checkpoints.root / "ck.git"), *args)


def store(tmp_path: Path, cwd: Path, **bounds: float) -> CheckpointStore:
    return CheckpointStore(tmp_path / "state" / "checkpoints", cwd, Workspace(**bounds))


def files(cwd: Path) -> dict[str, str]:
    """Every path under `cwd` but a .git: file contents, symlink targets, dirs."""
    found: dict[str, str] = {}
    for path in sorted(cwd.rglob("*")):
        relative = path.relative_to(cwd)
        if ".git" in relative.parts:
            continue
        if path.is_symlink():
            found[str(relative)] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[str(relative)] = "dir"
        else:
            found[str(relative)] = path.read_text()
    return found


def git_dir_bytes(git_dir: Path) -> dict[str, str]:
    """sha256 of every file in a .git."""
    return {
        str(path.relative_to(git_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(git_dir.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "main.py").write_text("print('one')\n")
    (work / "notes.txt").write_text("notes\n")
    (work / "run.sh").write_text("#!/bin/sh\necho run\n")
    (work / "run.sh").chmod(0o755)
    (work / "link").symlink_to("notes.txt")
    return work


async def test_a_rewind_brings_back_edited_and_deleted_files_and_removes_new_ones(
    tmp_path: Path, cwd: Path
) -> None:
    checkpoints = store(tmp_path, cwd)
    before = files(cwd)
    taken = await checkpoints.take("t-1")
    assert isinstance(taken, Taken)
    assert (taken.changed, taken.left_out) == (4, [])
    assert checkpoints.has("t-1")
    assert oct(checkpoints.root.stat().st_mode & 0o777) == "0o700"

    (cwd / "src" / "main.py").write_text("print('two')\n")
    (cwd / "notes.txt").unlink()
    (cwd / "run.sh").chmod(0o644)
    (cwd / "link").unlink()
    (cwd / "link").symlink_to("src/main.py")
    (cwd / "made").mkdir()
    (cwd / "made" / "new.txt").write_text("new\n")
    second = await checkpoints.take("t-2")
    assert isinstance(second, Taken)
    assert second.changed == 5

    await checkpoints.restore("t-1")
    assert files(cwd) == before
    assert os.access(cwd / "run.sh", os.X_OK)

    await checkpoints.restore("t-2")
    assert (cwd / "made" / "new.txt").read_text() == "new\n"
    assert not (cwd / "notes.txt").exists()
    assert not os.access(cwd / "run.sh", os.X_OK)
    assert os.readlink(cwd / "link") == "src/main.py"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """The process umask set to `mask` for a while: the one git writes files with."""
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def bits(path: Path) -> str:
    return oct(stat.S_IMODE(path.lstat().st_mode))


async def test_a_rewind_gives_files_their_permission_bits_back(tmp_path: Path, cwd: Path) -> None:
    """Git keeps only the executable bit and writes with the umask: a private file (a
    .env, a key) the turn changed or deleted must not come back readable by everyone."""
    for name in ("secret.env", "id_key", "chmodded"):
        (cwd / name).write_text(f"{name} v1\n")
        (cwd / name).chmod(0o600)
    (cwd / "tool").write_text("#!/bin/sh\n")
    (cwd / "tool").chmod(0o750)
    checkpoints = store(tmp_path, cwd)
    with umask(0o022):
        await checkpoints.take("t-1")
        (cwd / "notes.txt").write_text("the next checkpoint carries the bits forward\n")
        await checkpoints.take("t-2")
        (cwd / "secret.env").write_text("secret.env v2\n")
        (cwd / "secret.env").chmod(0o644)
        (cwd / "id_key").unlink()
        (cwd / "chmodded").chmod(0o644)  # the bits alone: git sees no change
        (cwd / "tool").write_text("#!/bin/sh\necho\n")
        (cwd / "made").write_text("new\n")
        (cwd / "made").chmod(0o600)
        await checkpoints.take("t-3")
        (cwd / "made").write_text("changed\n")
        (cwd / "made").chmod(0o644)
        await checkpoints.restore("t-2")
        assert (cwd / "secret.env").read_text() == "secret.env v1\n"
        assert [bits(cwd / name) for name in ("secret.env", "id_key", "chmodded", "tool")] == [
            "0o600", "0o600", "0o600", "0o750"
        ]  # fmt: skip
        assert bits(cwd / "notes.txt") == "0o644"
        assert not (cwd / "made").exists()
        await checkpoints.restore("t-3")
        assert [bits(cwd / name) for name in ("secret.env", "made", "tool")] == [
            "0o644", "0o600", "0o750"
        ]  # fmt: skip


async def test_a_rewind_under_another_umask_gives_the_bits_of_the_checkpoint(
    tmp_path: Path, cwd: Path
) -> None:
    """Taken under umask 077 a 0600 file is what git would write; restored under 022 it
    would be 0644."""
    checkpoints = store(tmp_path, cwd)
    with umask(0o077):
        (cwd / "secret.env").write_text("v1\n")
        await checkpoints.take("t-1")
    with umask(0o022):
        (cwd / "secret.env").write_text("v2\n")
        await checkpoints.restore("t-1")
    assert (cwd / "secret.env").read_text() == "v1\n"
    assert bits(cwd / "secret.env") == "0o600"
    assert bits(cwd / "notes.txt") == "0o644"  # as it was, though 077 would make it 0600


async def test_a_store_that_does_not_know_its_files_bits_looks_at_them_all_once(
    tmp_path: Path, cwd: Path
) -> None:
    """Checkpoints taken before capd kept the bits, or a take stopped part-way: the next
    take cannot carry them forward."""
    (cwd / "secret.env").write_text("v1\n")
    (cwd / "secret.env").chmod(0o600)
    checkpoints = store(tmp_path, cwd)
    with umask(0o022):
        await checkpoints.take("t-1")
        (checkpoints.root / "index.modes").unlink()
        shutil.rmtree(checkpoints.root / "modes")
        (cwd / "notes.txt").write_text("changed\n")
        assert isinstance(
            await CheckpointStore(checkpoints.root, cwd, Workspace()).take("t-2"), Taken
        )
        (cwd / "secret.env").write_text("v2\n")
        await checkpoints.restore("t-2")
    assert bits(cwd / "secret.env") == "0o600"


async def test_a_turn_that_changed_nothing_records_no_change(tmp_path: Path, cwd: Path) -> None:
    checkpoints = store(tmp_path, cwd)
    await checkpoints.take("t-1")
    again = await checkpoints.take("t-2")
    assert isinstance(again, Taken)
    assert again.changed == 0


async def test_the_files_a_rewind_replaced_are_kept_in_the_store(tmp_path: Path, cwd: Path) -> None:
    checkpoints = store(tmp_path, cwd)
    await checkpoints.take("t-1")
    (cwd / "notes.txt").write_text("written after the last checkpoint\n")
    await checkpoints.restore("t-1")
    assert (cwd / "notes.txt").read_text() == "notes\n"
    kept = store_git(checkpoints, "show", "refs/rewound/1:notes.txt")
    assert kept == "written after the last checkpoint\n"


async def test_the_users_repository_is_left_byte_for_byte_untouched(
    tmp_path: Path, cwd: Path
) -> None:
    user_git(cwd, "init", "-q")
    (cwd / ".gitignore").write_text("*.log\n")
    user_git(cwd, "add", "-A")
    user_git(cwd, "commit", "-qm", "first")
    (cwd / "notes.txt").write_text("stashed\n")
    user_git(cwd, "stash", "-q")
    (cwd / "src" / "main.py").write_text("print('staged')\n")
    user_git(cwd, "add", "src/main.py")
    (cwd / "untracked.txt").write_text("untracked\n")
    (cwd / "build.log").write_text("ignored\n")
    (cwd / ".git" / "info" / "exclude").write_text("secret.txt\n")
    (cwd / "secret.txt").write_text("excluded by the user\n")
    user_git(cwd, "status")

    def seen() -> dict[str, object]:
        return {
            "HEAD": user_git(cwd, "rev-parse", "HEAD"),
            "refs": user_git(cwd, "for-each-ref"),
            "stash": user_git(cwd, "stash", "list"),
            "index": hashlib.sha256((cwd / ".git" / "index").read_bytes()).hexdigest(),
            "status": user_git(cwd, "status", "--porcelain", "--ignored"),
            ".git": git_dir_bytes(cwd / ".git"),
        }

    before = seen()
    checkpoints = store(tmp_path, cwd)
    taken = await checkpoints.take("t-1")
    assert isinstance(taken, Taken)
    (cwd / "untracked.txt").write_text("changed by the agent\n")
    (cwd / "src" / "main.py").unlink()
    await checkpoints.take("t-2")
    await checkpoints.restore("t-1")
    assert seen() == before
    assert (cwd / "src" / "main.py").read_text() == "print('staged')\n"
    assert (cwd / "secret.txt").read_text() == "excluded by the user\n"
    recorded = store_git(checkpoints, "ls-tree", "-r", "--name-only", "refs/ckpt/t-1").split()
    assert "build.log" not in recorded
    assert "secret.txt" not in recorded
    assert not any(name.startswith(".git/") for name in recorded)


async def test_a_rewind_leaves_ignored_files_nested_repositories_and_capds_own_dirs_alone(
    tmp_path: Path, cwd: Path
) -> None:
    (cwd / ".gitignore").write_text("node_modules/\n")
    (cwd / "node_modules" / "pkg").mkdir(parents=True)
    (cwd / "node_modules" / "pkg" / "index.js").write_text("v1\n")
    nested = cwd / "vendor" / "lib"
    nested.mkdir(parents=True)
    user_git(nested, "init", "-q")
    (nested / "lib.c").write_text("v1\n")
    user_git(nested, "add", "lib.c")
    user_git(nested, "commit", "-qm", "lib")
    own = cwd / ".capd"
    own.mkdir()
    (own / "state.db").write_text("v1\n")
    checkpoints = CheckpointStore(own / "checkpoints", cwd, Workspace(), hidden=[own])
    await checkpoints.take("t-1")
    nested_git = git_dir_bytes(nested / ".git")

    (cwd / "node_modules" / "pkg" / "index.js").write_text("v2\n")
    (cwd / "node_modules" / "added.js").write_text("new\n")
    (nested / "lib.c").write_text("v2\n")
    (nested / "more.c").write_text("new\n")
    (own / "state.db").write_text("v2\n")
    (cwd / "notes.txt").write_text("changed\n")
    await checkpoints.restore("t-1")

    assert (cwd / "notes.txt").read_text() == "notes\n"
    assert (cwd / "node_modules" / "pkg" / "index.js").read_text() == "v2\n"
    assert (cwd / "node_modules" / "added.js").exists()
    assert (nested / "lib.c").read_text() == "v2\n"
    assert (nested / "more.c").exists()
    assert git_dir_bytes(nested / ".git") == nested_git
    assert (own / "state.db").read_text() == "v2\n"


async def test_a_file_over_the_size_limit_is_left_out_named_and_left_as_it_is(
    tmp_path: Path, cwd: Path
) -> None:
    (cwd / "big.bin").write_bytes(b"a" * (1024 * 1024 + 1))
    (cwd / "grows.bin").write_bytes(b"small")
    checkpoints = store(tmp_path, cwd, checkpoint_file_max_mb=1)
    taken = await checkpoints.take("t-1")
    assert isinstance(taken, Taken)
    assert taken.left_out == ["big.bin"]
    (cwd / "big.bin").write_bytes(b"b" * (2 * 1024 * 1024))
    (cwd / "grows.bin").write_bytes(b"g" * (2 * 1024 * 1024))
    later = await checkpoints.take("t-2")
    assert isinstance(later, Taken)
    assert sorted(later.left_out) == ["big.bin", "grows.bin"]
    await checkpoints.restore("t-1")
    assert (cwd / "big.bin").read_bytes() == b"b" * (2 * 1024 * 1024)
    assert (cwd / "grows.bin").read_bytes() == b"g" * (2 * 1024 * 1024)


@pytest.mark.parametrize(
    ("bounds", "said"),
    [
        ({"checkpoint_max_files": 3}, "more than 3 files to record"),
        ({"checkpoint_max_mb": 1}, "3 MB of changed files is more than"),
        ({"checkpoint_timeout_s": 0.001}, "took longer than 0.001 s"),
    ],
)
async def test_a_checkpoint_past_a_bound_is_skipped_saying_which_and_how_to_raise_it(
    tmp_path: Path, cwd: Path, bounds: dict[str, float], said: str
) -> None:
    (cwd / "data.bin").write_bytes(b"d" * (2 * 1024 * 1024))
    checkpoints = store(tmp_path, cwd, **bounds)
    skipped = await checkpoints.take("t-1")
    assert isinstance(skipped, Skipped)
    assert said in skipped.reason
    assert f"workspace.{next(iter(bounds))}" in skipped.reason
    assert "raise it" in skipped.reason
    assert "\n" not in skipped.reason
    assert not checkpoints.has("t-1")
    with pytest.raises(CheckpointError, match="has no checkpoint"):
        await checkpoints.restore("t-1")
    checkpoints.workspace = Workspace()
    assert isinstance(await checkpoints.take("t-2"), Taken)


async def test_a_turn_that_made_more_than_a_checkpoint_may_hold_can_still_be_rewound(
    tmp_path: Path, cwd: Path
) -> None:
    """The turn to undo made many files or big ones (an `npm install` without a
    .gitignore): the restore's own record of them is not held to the checkpoint bounds,
    but for the size of one file, and a file past it stays where it is."""
    checkpoints = store(tmp_path, cwd)
    await checkpoints.take("t-1")
    before = files(cwd)
    checkpoints.workspace = Workspace(
        checkpoint_max_files=3,
        checkpoint_max_mb=1,
        checkpoint_timeout_s=0.001,
        checkpoint_file_max_mb=2,
    )
    (cwd / "node_modules").mkdir()
    for n in range(10):
        (cwd / "node_modules" / f"junk{n}.js").write_bytes(b"j" * 200_000)
    (cwd / "download.bin").write_bytes(b"d" * (3 * 1024 * 1024))
    (cwd / "src" / "main.py").write_text("broken\n")
    await checkpoints.restore("t-1")
    assert files(cwd) == {**before, "download.bin": "d" * (3 * 1024 * 1024)}
    kept = store_git(checkpoints, "ls-tree", "-r", "--name-only", "refs/rewound/1").split()
    assert "node_modules/junk9.js" in kept
    assert "download.bin" not in kept


async def test_a_stale_index_lock_from_a_killed_git_does_not_block_the_next_checkpoint(
    tmp_path: Path, cwd: Path
) -> None:
    await store(tmp_path, cwd).take("t-1")
    root = tmp_path / "state" / "checkpoints"
    (root / "index.lock").write_bytes(b"")
    (root / "ck.git" / "refs" / "last.lock").write_bytes(b"")
    (root / "ck.git" / "refs" / "ckpt" / "t-2.lock").write_bytes(b"")
    (cwd / "notes.txt").write_text("changed\n")
    restarted = store(tmp_path, cwd)
    taken = await restarted.take("t-2")
    assert isinstance(taken, Taken), taken
    assert taken.changed == 1


async def test_a_checkpoint_git_refuses_is_skipped_with_gits_reason_and_the_next_is_taken(
    tmp_path: Path, cwd: Path
) -> None:
    checkpoints = store(tmp_path, cwd)
    await checkpoints.take("t-1")
    (checkpoints.root / "index.lock").write_bytes(b"")
    (cwd / "notes.txt").write_text("changed\n")
    skipped = await checkpoints.take("t-2")
    assert isinstance(skipped, Skipped)
    assert skipped.reason.startswith("git update-index failed: fatal: Unable to create")
    assert "index.lock" in skipped.reason
    assert isinstance(await checkpoints.take("t-3"), Taken)


async def test_a_file_ignored_after_it_was_recorded_leaves_the_next_checkpoints(
    tmp_path: Path, cwd: Path
) -> None:
    (cwd / "out").mkdir()
    (cwd / "out" / "build.bin").write_text("v1\n")
    checkpoints = store(tmp_path, cwd)
    await checkpoints.take("t-1")
    (cwd / ".gitignore").write_text("out/\n")
    taken = await checkpoints.take("t-2")
    assert isinstance(taken, Taken)
    assert taken.changed == 2
    recorded = store_git(checkpoints, "ls-tree", "-r", "--name-only", "refs/ckpt/t-2").split()
    assert "out/build.bin" not in recorded
    (cwd / "out" / "build.bin").write_text("v2\n")
    await checkpoints.restore("t-1")
    assert (cwd / "out" / "build.bin").read_text() == "v2\n"
    assert not (cwd / ".gitignore").exists()


async def test_a_rewind_does_not_replace_an_ignored_directory_with_a_recorded_file(
    tmp_path: Path, cwd: Path
) -> None:
    (cwd / "cache").write_text("a file, recorded\n")
    checkpoints = store(tmp_path, cwd)
    await checkpoints.take("t-1")
    (cwd / "cache").unlink()
    (cwd / "cache").mkdir()
    (cwd / "cache" / "blob").write_text("ignored\n")
    (cwd / ".gitignore").write_text("cache/\n")
    (cwd / "notes.txt").write_text("changed\n")
    await checkpoints.restore("t-1")
    assert (cwd / "cache" / "blob").read_text() == "ignored\n"
    assert (cwd / "notes.txt").read_text() == "notes\n"


async def test_a_checkpoint_cancelled_part_way_stops_its_git_and_the_store_goes_on(
    tmp_path: Path, cwd: Path
) -> None:
    for n in range(300):
        (cwd / "src" / f"m{n}.py").write_bytes(os.urandom(20_000))
    checkpoints = store(tmp_path, cwd)
    task = asyncio.create_task(checkpoints.take("t-1"))
    index_lock = checkpoints.root / "index.lock"
    async with asyncio.timeout(10):
        while not (index_lock.exists() and checkpoints._child):
            await asyncio.sleep(0.001)
    child = checkpoints._child
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.wait_for(child.wait(), 3) == -signal.SIGTERM
    taken = await checkpoints.take("t-2")
    assert isinstance(taken, Taken)
    (cwd / "src" / "main.py").write_text("print('two')\n")
    await checkpoints.restore("t-2")
    assert (cwd / "src" / "main.py").read_text() == "print('one')\n"


async def test_a_turn_id_git_would_refuse_as_a_ref_name_still_gets_its_checkpoint(
    tmp_path: Path, cwd: Path
) -> None:
    checkpoints = store(tmp_path, cwd)
    odd = "turn ../x.lock"
    assert isinstance(await checkpoints.take(odd), Taken)
    assert checkpoints.has(odd)
    (cwd / "notes.txt").write_text("changed\n")
    await checkpoints.restore(odd)
    assert (cwd / "notes.txt").read_text() == "notes\n"


async def test_rewinding_to_a_turn_without_a_checkpoint_says_so(tmp_path: Path, cwd: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^turn t-7 has no checkpoint of the files$"):
        await store(tmp_path, cwd).restore("t-7")


async def test_a_cwd_that_is_gone_skips_the_checkpoint_saying_so(tmp_path: Path) -> None:
    skipped = await store(tmp_path, tmp_path / "gone").take("t-1")
    assert skipped == Skipped(f"the cwd {tmp_path / 'gone'} is not a directory")


def test_without_git_a_pod_with_checkpoints_is_refused_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ProtocolError) as refused:
        require_git()
    assert refused.value.code == "invalid_request"
    assert "install git" in refused.value.message
    assert "workspace.checkpoints: false" in refused.value.message


async def test_a_fifo_or_device_as_the_repositorys_exclude_never_blocks_capd(
    tmp_path: Path, cwd: Path
) -> None:
    user_git(cwd, "init", "-q")
    exclude = cwd / ".git" / "info" / "exclude"
    exclude.unlink()
    os.mkfifo(exclude)
    opened = threading.Event()
    done = threading.Event()

    def watch() -> None:
        """Whether anyone opens the FIFO to read: a writer can open it only then (and
        lets that reader go on)."""
        while not done.is_set():
            with contextlib.suppress(OSError):
                os.close(os.open(exclude, os.O_WRONLY | os.O_NONBLOCK))
                opened.set()
            done.wait(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        taken = await store(tmp_path, cwd).take("t-1")
    finally:
        done.set()
        watcher.join()
    assert isinstance(taken, Taken)
    assert not opened.is_set()
    exclude.unlink()
    exclude.symlink_to("/dev/zero")  # never ends
    assert isinstance(await store(tmp_path, cwd).take("t-2"), Taken)
