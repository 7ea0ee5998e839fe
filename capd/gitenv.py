"""Running git from capd: on a directory a pod can write (hostile), and on the user's own
repository (trusted).

A work tree or git directory a pod can write is hostile to git: its `.git` file, a fake
submodule's `.git`, `.gitattributes` naming a filter, the git directory's config and
hooks can all make a plain `git status` run the pod's code (docs/protocol.md,
"Worktrees"). capd's own git there is told where its git directory and work tree are
(never discovers them), reads no system or global config, runs no hook, no fsmonitor, no
external diff or textconv, does not recurse into submodules and takes no optional locks
(`hostile_env`, `HARDENED`). The user's own repository is trusted: its git runs with the
user's config, only without capd's `GIT_*` variables and without a terminal prompt
(`user_env`).

`run` runs one git command with a timeout, stopping its process group when it is cut
short; a failure is a `GitFailed` whose message is git's own line. `read_regular` reads
a file of such a directory without letting it block or flood capd.
"""

import asyncio
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from capd.proc.launcher import launch, stop_group

IDENTITY = {
    "GIT_AUTHOR_NAME": "capd",
    "GIT_AUTHOR_EMAIL": "capd@localhost",
    "GIT_COMMITTER_NAME": "capd",
    "GIT_COMMITTER_EMAIL": "capd@localhost",
}
"""The identity of capd's own commits (checkpoints)."""
NO_CONFIG = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_OPTIONAL_LOCKS": "0",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_NO_REPLACE_OBJECTS": "1",
    "LC_ALL": "C",
}
"""No system or global config, no optional locks (a `status` does not write the index),
no prompt, no `refs/replace` rewriting what is shown, messages in English."""
HARDENED = (
    "-c", "core.fsmonitor=false",
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.untrackedCache=false",
    "-c", "submodule.recurse=false",
    "-c", "diff.external=",
    "-c", "status.submoduleSummary=false",
    "-c", "core.pager=cat",
)  # fmt: skip
"""Options before the command: what a git directory's config could otherwise turn on."""
GIT_TIMEOUT_S = 30.0
"""How long one git command of capd's may take by default."""


class GitFailed(Exception):
    """A git command exited non-zero, could not start or took too long; the message is
    one line."""


def hostile_env(git_dir: Path, work_tree: Path | None = None) -> dict[str, str]:
    """The environment of a git on `git_dir` (and `work_tree`) that a pod can write."""
    env = {**NO_CONFIG, "GIT_DIR": str(git_dir)}
    if work_tree is not None:
        env["GIT_WORK_TREE"] = str(work_tree)
    return env


def user_env() -> dict[str, str]:
    """The environment of a git on the user's own repository (with the user's config)."""
    return {"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}


def not_git(name: str) -> bool:
    """capd's own variables a git gets: none of GIT_* (GIT_DIR and the like would point it
    elsewhere)."""
    return not name.startswith("GIT_")


async def run(
    args: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    input: bytes | None = None,
    timeout: float = GIT_TIMEOUT_S,
    limit: int | None = None,
) -> bytes:
    """Run `git args` unconfined in `cwd` with `env` over capd's environment (less its
    GIT_* variables), `input` on its stdin; its stdout. GitFailed when it fails. With
    `limit` (and no `input`), a stdout longer than that is cut after `limit` + 1 bytes
    and the git stopped: capd never holds more."""
    try:
        process = await launch(
            ["git", *args],
            cwd=cwd,
            confine=None,  # capd's own git; a hostile directory's is hardened by `env`
            env=env,
            inherit=not_git,
            stdin=asyncio.subprocess.DEVNULL if input is None else asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as error:
        raise GitFailed(f"could not run git: {error.strerror or error}") from None
    try:
        async with asyncio.timeout(timeout):
            if limit is None:
                out, err = await process.communicate(input)
            else:
                out, err = await _at_most(process, limit)
    except TimeoutError:
        stop_group(process)
        raise GitFailed(f"git {_command(args)} took longer than {timeout:g} s") from None
    except BaseException:
        if process.returncode is None:
            stop_group(process)
        raise
    if process.returncode != 0 and (limit is None or len(out) <= limit):
        raise GitFailed(message(err))
    return out


async def _at_most(process: asyncio.subprocess.Process, limit: int) -> tuple[bytes, bytes]:
    """The stdout (at most `limit` + 1 bytes: then the process is stopped) and stderr of
    `process`, once it has exited."""
    assert process.stdout is not None
    assert process.stderr is not None
    errors = asyncio.ensure_future(process.stderr.read())
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= limit and (chunk := await process.stdout.read(limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            stop_group(process)
            while await process.stdout.read(1 << 16):  # what it wrote before it died:
                pass  # Python 3.11's wait() waits for its pipes to close too
        await process.wait()
        return b"".join(chunks), await errors
    finally:
        errors.cancel()


def message(stderr: bytes) -> str:
    """The line of git's stderr that says what went wrong: its first `fatal:` or
    `error:`, else its last."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    said = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return (said or lines or ["no message"])[0 if said else -1]


def _command(args: Sequence[str]) -> str:
    """The git command's name in `args` (after its `-c` options)."""
    rest = list(args)
    while rest and rest[0] == "-c":
        rest = rest[2:]
    return rest[0] if rest else ""


def read_regular(path: Path, limit: int, *, follow: bool = True) -> bytes | None:
    """The content of `path`, a file a pod may have made: None when it is missing, not a
    regular file (opening a FIFO would block capd's event loop, a device never ends),
    bigger than `limit` bytes, or a symlink and not `follow`."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        data = file.read(limit + 1)  # a file that grew meanwhile is still bounded
    return data if len(data) <= limit else None
