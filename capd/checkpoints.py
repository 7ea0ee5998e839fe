"""Workspace checkpoints: a pod's cwd files recorded at each turn start, restored by
`rewind {files: true}` (§11; docs/protocol.md "Rewind and checkpoints").

The store is a private git object store in the pod's state directory (`ck.git` and its own
`index` under `root`) whose work tree is the cwd. Every git call gets that store, that index
and the cwd through its environment, no system or global config, no hooks, no optional
locks and a fixed identity, so the user's own repository (a `.git` in or above the cwd) is
never read for config and never written: not its refs, index, stash or config.

A checkpoint stages what changed since the last one (`ls-files -m -d -o` into
`update-index`, which never embeds a nested repository as `add -A` would), writes a tree
and commits it under `refs/ckpt/<turn id>`. Files ignored by the cwd's `.gitignore` files
or its repository's `.git/info/exclude`, nested repositories, files larger than
`checkpoint_file_max_mb` and the `hidden` paths are not recorded, so a restore leaves
them as they are. A restore first records the current files under `refs/rewound/<n>` (so
nothing unrecorded is lost; a one-off the user asked for, so not held to a checkpoint's
files, MB and time bounds, only to `RESTORE_RECORD_TIMEOUT_S`), then `read-tree -u --reset`
the checkpoint, less any path where something not recorded now (ignored, too large) lies
in its way.

Git keeps only a file's executable bit, and writes what it restores with the umask. So
each checkpoint also keeps its files' permission bits, beside it in `modes/<commit>`: the
umask of the take and the files whose bits differ from what git would write with it
(`.env` at 0600; with umask 022, files at 0644 and 0755 need no entry). A take carries
the previous entries forward and updates those of the paths it stages, which it lstats
anyway (`index.modes` holds the entries of what the index holds); a restore then chmods
the files whose bits are not the checkpoint's (capd/file_modes.py).

One git runs at a time per store. A git cancelled or killed part-way leaves its lock files
behind; they are removed before the next git runs, once the killed one is gone.
"""

import asyncio
import logging
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from capd.file_modes import (
    Modes,
    bits_entry,
    current_umask,
    encode_modes,
    give_bits,
    read_modes,
    scan_bits,
)
from capd.gitenv import IDENTITY, NO_CONFIG, not_git, read_regular
from capd.gitenv import message as _git_message
from capd.proc.groups import KILL_GRACE_S
from capd.proc.launcher import launch, stop_group
from protocol.errors import ProtocolError
from protocol.manifest import Workspace

log = logging.getLogger(__name__)

MB = 1024 * 1024
INLINE_LISTING = 64 * 1024
"""A listing of changed paths shorter than this is sorted on the event loop, a longer
one (a first checkpoint, a big change) in a thread: each path is lstat'ed."""
PACK_FROM = 256
"""A checkpoint that stores this many files or more writes them into one pack rather
than a file each (git's bulk check-in, by a `core.bigFileThreshold` below any file):
creating 10,000 object files took twice as long as the pack on the machine measured.
Smaller checkpoints write loose objects, so packs stay few."""
STREAM_CHUNK = 256 * 1024
"""Bytes of a listing read at a time."""
LEFT_OUT_NAMED = 20
"""At most this many left-out files are named in a `Taken`."""
RESTORE_RECORD_TIMEOUT_S = 600.0
"""How long a restore's record of the current files may take, whatever
`checkpoint_timeout_s` says: a restore is asked for, not part of every turn, and the turn
to undo may have made far more files than a checkpoint would record."""
INLINE_MODES = 256
"""Up to this many files' permission bits are looked at on the event loop, more in a
thread."""
CONFIG = """\
[core]
\tautocrlf = false
\tfsmonitor = false
\tuntrackedCache = false
\tcompression = 1
\tlooseCompression = 1
\thooksPath = /dev/null
\texcludesFile = /dev/null
\tattributesFile = /dev/null
[index]
\tversion = 4
[gc]
\tauto = 0
[advice]
\taddEmbeddedRepo = false
"""
"""Added to what `git init` wrote: nothing converts file contents, nothing runs in the
background, objects are stored with the fastest compression."""
ATTRIBUTES = "* -text -eol -filter -ident -working-tree-encoding\n"
"""Overrides any `.gitattributes` in the cwd: files are recorded byte for byte."""
EXCLUDE_MAX_BYTES = 1024 * 1024
"""The repository's `info/exclude` is left out when bigger."""
_STORE = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")
_PLAIN_REF = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")


@dataclass(frozen=True)
class Taken:
    changed: int
    """Paths that differ from the previous checkpoint."""
    duration_ms: int
    left_out: list[str] = field(default_factory=list)
    """Files larger than `checkpoint_file_max_mb`, not recorded (at most 20 named)."""


@dataclass(frozen=True)
class Skipped:
    reason: str
    """The bound passed (and how to raise it) or what failed, in one line."""


class CheckpointError(Exception):
    """A restore that failed; its message is one line."""


def require_git() -> None:
    """Checkpoints need git on capd's PATH; spawning a pod that takes them checks it."""
    if shutil.which("git") is None:
        raise ProtocolError(
            "invalid_request",
            "workspace checkpoints need git, which is not on capd's PATH:"
            " install git, or set workspace.checkpoints: false in the manifest",
        )


class _Skip(Exception):
    """A checkpoint not taken, for the reason in its message."""


class _GitFailed(_Skip):
    """A git command exited non-zero or could not start."""


@dataclass
class _Plan:
    """What a checkpoint stages, from the paths git lists as changed."""

    update: list[bytes] = field(default_factory=list)
    """Added, modified and deleted paths, for `update-index --add --remove`."""
    drop: list[bytes] = field(default_factory=list)
    """Paths to take out of the index though they exist: too large, or now ignored."""
    left_out: list[str] = field(default_factory=list)
    modes: dict[bytes, int | None] = field(default_factory=dict)
    """The permission-bit entries of the staged paths (None: none needed, or gone)."""
    new_paths: int = 0
    new_bytes: int = 0


@dataclass
class _Recorded:
    commit: str
    changed: int
    left_out: list[str]
    modes: Modes


class CheckpointStore:
    """A pod's checkpoints. Make one per pod and keep it for the pod's life: it alone runs
    git in `root`, one git at a time."""

    def __init__(
        self,
        root: Path,
        cwd: Path,
        workspace: Workspace,
        hidden: Sequence[Path] = (),
        exclude: Path | None = None,
    ) -> None:
        """root: <state>/pods/<name>/checkpoints (created on first use, 0700); cwd: the
        work tree; hidden: absolute paths never recorded nor touched (capd's state and
        runtime dirs when they lie inside cwd); exclude: the repository's `info/exclude`
        (`cwd/.git/info/exclude` when None; a `workspace.git` work tree's is in its own
        git directory)."""
        self.root = root
        self.cwd = cwd
        self.workspace = workspace
        self.hidden = tuple(hidden)
        self._exclude = exclude
        self._index_modes_read: tuple[tuple[int, int, int], Modes] | None = None
        """The last `index.modes` read or written, and which file it was (inode, mtime,
        size): a file is written whole and renamed into place, never changed."""
        self._lock = asyncio.Lock()
        self._child: asyncio.subprocess.Process | None = None
        """The git running, or killed and perhaps not gone yet."""
        self._rules_changed = True
        """What git ignores may have changed since the recorded paths were last checked
        against it (`.gitignore` files are recorded, so a change to one is seen)."""
        self._tidy = False
        """Stale lock files were removed, and no git of ours was stopped or failed since."""

    # Paths and the environment are derived when git runs, not kept: every idle pod holds
    # a store, and making them took a tenth of a spawn.

    @property
    def _user_exclude(self) -> Path:
        return self._exclude or self.cwd / ".git" / "info" / "exclude"

    @property
    def _git_dir(self) -> Path:
        return self.root / "ck.git"

    @property
    def _index(self) -> Path:
        return self.root / "index"

    @property
    def _index_modes(self) -> Path:
        return self.root / "index.modes"

    @property
    def _index_modes_aside(self) -> Path:
        return self.root / "index.modes.aside"

    @property
    def _modes_dir(self) -> Path:
        return self.root / "modes"

    @property
    def _env(self) -> dict[str, str]:
        return {
            "GIT_DIR": str(self._git_dir),
            "GIT_WORK_TREE": str(self.cwd),
            "GIT_INDEX_FILE": str(self._index),
            **NO_CONFIG,
            **IDENTITY,
        }

    async def take(self, turn_id: str) -> Taken | Skipped:
        """Record the cwd's files as they are at the start of `turn_id`. Never raises but
        CancelledError: whatever stops it is a `Skipped`."""
        started = time.monotonic()
        async with self._lock:
            try:
                async with asyncio.timeout(self.workspace.checkpoint_timeout_s):
                    recorded = await self._record()
                    self._write_ref(_turn_ref(turn_id), recorded.commit)
                    self._write_ref("refs/last", recorded.commit)
            except TimeoutError:
                return Skipped(self._timeout_reason())
            except _Skip as skip:
                return Skipped(str(skip))
            except OSError as error:
                return Skipped(f"the checkpoint failed: {error}")
            except Exception as error:
                log.exception("checkpoint of %s failed", self.cwd)
                return Skipped(f"the checkpoint failed: {error!r}")
        duration_ms = round((time.monotonic() - started) * 1000)
        return Taken(changed=recorded.changed, duration_ms=duration_ms, left_out=recorded.left_out)

    def has(self, turn_id: str) -> bool:
        """Whether `turn_id` has a checkpoint (refs are never packed: a file check)."""
        return (self._git_dir / _turn_ref(turn_id)).is_file()

    async def restore(self, turn_id: str) -> None:
        """Bring the cwd's files back to `turn_id`'s checkpoint, after recording the
        current ones under `refs/rewound/<n>`. CheckpointError when it cannot."""
        async with self._lock:
            if not self.has(turn_id):
                raise CheckpointError(f"turn {turn_id} has no checkpoint of the files")
            try:
                async with asyncio.timeout(RESTORE_RECORD_TIMEOUT_S):
                    current = await self._record(bounded=False)
            except TimeoutError:
                reason = f"recording them took longer than {RESTORE_RECORD_TIMEOUT_S:g} s"
                raise CheckpointError(_unsaved(reason)) from None
            except (_Skip, OSError) as error:
                raise CheckpointError(_unsaved(str(error))) from None
            saved = f"refs/rewound/{self._next_rewound()}"
            target = self._read_ref(_turn_ref(turn_id)) or _turn_ref(turn_id)
            try:
                self._write_ref(saved, current.commit)
                tree, in_the_way = await self._tree_to_restore(target)
                self._index_modes.unlink(missing_ok=True)
                await self._git("read-tree", "-u", "--reset", tree)
                self._write_ref("refs/last", target)
                wanted = read_modes(self._modes_dir / target)
                if wanted is not None:
                    kept = {p: m for p, m in wanted.entries.items() if p not in in_the_way}
                    self._write_modes(self._index_modes, Modes(wanted.umask, kept))
                    await self._give_modes_back(wanted, current.modes, tree, in_the_way)
            except (_Skip, OSError) as error:
                raise CheckpointError(
                    f"restoring the files of turn {turn_id} failed: {error}"
                    f" (the files before it are kept as {saved} in {self._git_dir})"
                ) from None

    async def _tree_to_restore(self, target: str) -> tuple[str, set[bytes]]:
        """`target`, less the paths it would write over something not recorded now (an
        ignored or too large file, an ignored directory): those stay as they are. And
        those paths."""
        absent = await self._git(
            "diff-index", "--cached", "-z", "--name-only", "--no-renames", "--diff-filter=D",
            target,
        )  # fmt: skip
        base = os.fsencode(self.cwd)
        in_the_way = [path for path in absent.split(b"\0") if path and _taken(base, path)]
        if not in_the_way:
            return target, set()
        index = {"GIT_INDEX_FILE": str(self.root / "index.restore")}
        await self._git("read-tree", target, env=index)
        await self._git(
            "update-index", "-z", "--force-remove", "--stdin", input=_nul(in_the_way), env=index
        )
        tree = (await self._git("write-tree", env=index)).decode().strip()
        return tree, set(in_the_way)

    async def _give_modes_back(
        self, wanted: Modes, current: Modes, tree: str, in_the_way: set[bytes]
    ) -> None:
        """After `tree` was read into the cwd: chmod the files whose permission bits are
        not `wanted`'s. Under the same umask, read-tree wrote the files without an entry
        as they were, so only those with an entry either side can differ; under another
        umask any file can."""
        if wanted.umask == current.umask:
            paths = set(wanted.entries)
            paths.update(p for p, mode in current.entries.items() if wanted.entries.get(p) != mode)
        else:
            listed = await self._git("ls-tree", "-r", "-z", "--name-only", tree)
            paths = {path for path in listed.split(b"\0") if path}
        paths -= in_the_way
        if len(paths) <= INLINE_MODES:
            give_bits(self.cwd, paths, wanted)
        else:
            await asyncio.to_thread(give_bits, self.cwd, paths, wanted)

    async def _record(self, bounded: bool = True) -> _Recorded:
        """Stage the cwd's changes and commit them. `bounded`: skip it past
        `checkpoint_max_files` or `checkpoint_max_mb` (a restore's record is not)."""
        if not self.cwd.is_dir():
            raise _Skip(f"the cwd {self.cwd} is not a directory")
        await self._prepare()
        umask = current_umask()
        held = _index_entries(self._index)
        base = self._read_index_modes()
        room = self.workspace.checkpoint_max_files - held if bounded else None
        listing = await self._git(
            "ls-files", "-z", "-t", "-m", "-d", "-o", "--exclude-standard", new_paths=room
        )
        ignored = b""
        if self._rules_changed or b".gitignore\0" in listing:
            ignored = await self._git("ls-files", "-z", "-c", "-i", "--exclude-standard")
            self._rules_changed = False
        max_file = self.workspace.checkpoint_file_max_mb * MB
        if len(listing) < INLINE_LISTING:
            plan = _plan(self.cwd, listing, ignored, max_file, umask)
        else:
            plan = await asyncio.to_thread(_plan, self.cwd, listing, ignored, max_file, umask)
        if room is not None and plan.new_paths > room:
            raise self._too_many_files()
        if bounded and plan.new_bytes > self.workspace.checkpoint_max_mb * MB:
            raise _Skip(
                f"{_mb(plan.new_bytes)} MB of changed files is more than"
                f" workspace.checkpoint_max_mb ({self.workspace.checkpoint_max_mb}): raise"
                " it, or .gitignore what need not be restored"
            )
        staged = bool(plan.drop or plan.update)
        if staged:  # set aside until it matches the index again
            with suppress(FileNotFoundError):
                self._index_modes.replace(self._index_modes_aside)
        if plan.drop:
            await self._git(
                "update-index", "-z", "--force-remove", "--stdin", input=_nul(plan.drop)
            )
        if plan.update:
            packed = ("-c", "core.bigFileThreshold=1") if len(plan.update) >= PACK_FROM else ()
            await self._git(
                "update-index",
                "-z",
                "--add",
                "--remove",
                "--replace",
                "--stdin",
                input=_nul(plan.update),
                options=packed,
            )
        if base is not None and base.umask == umask:
            modes = Modes(umask, dict(base.entries))
        elif held:  # not known, or relative to another umask: look at every file once
            modes = await self._scan_modes(umask)
        else:
            modes = Modes(umask)  # all the files are in this listing
        _update(modes, plan)
        if modes == base and staged:
            self._index_modes_aside.replace(self._index_modes)
        elif modes != base:
            self._write_modes(self._index_modes, modes)
        tree = (await self._git("write-tree")).decode().strip()
        parent = self._read_ref("refs/last")
        if parent is None:
            commit = (await self._git("commit-tree", "-m", "checkpoint", tree)).decode().strip()
            self._keep_modes(commit)
            return _Recorded(commit, _index_entries(self._index), plan.left_out, modes)
        diff = await self._git("diff-tree", "-r", "-z", "--name-only", "--no-renames", parent, tree)
        changed = diff.count(b"\0")
        if changed == 0 and self._same_modes(parent, modes):
            return _Recorded(parent, 0, plan.left_out, modes)
        commit = await self._git("commit-tree", "-p", parent, "-m", "checkpoint", tree)
        commit = commit.decode().strip()
        self._keep_modes(commit)
        return _Recorded(commit, changed, plan.left_out, modes)

    def _keep_modes(self, commit: str) -> None:
        """`index.modes` kept as `commit`'s: a second name of the same file."""
        self._modes_dir.mkdir(mode=0o700, exist_ok=True)
        kept = self._modes_dir / commit
        kept.unlink(missing_ok=True)
        os.link(self._index_modes, kept)

    def _same_modes(self, commit: str, modes: Modes) -> bool:
        """Whether `commit`'s kept modes are `modes` (the index's): most often the very
        file `index.modes` is."""
        kept = self._modes_dir / commit
        with suppress(OSError):
            if os.path.samestat(kept.stat(), self._index_modes.stat()):
                return True
        return read_modes(kept) == modes

    def _read_index_modes(self) -> Modes | None:
        """`index.modes`, read again only when it is another file than last time."""
        try:
            info = self._index_modes.stat()
        except FileNotFoundError:
            return None
        which = (info.st_ino, info.st_mtime_ns, info.st_size)
        if self._index_modes_read is None or self._index_modes_read[0] != which:
            modes = read_modes(self._index_modes)
            if modes is None:
                return None
            self._index_modes_read = (which, modes)
        return self._index_modes_read[1]

    async def _scan_modes(self, umask: int) -> Modes:
        """The permission-bit entries of every file the index holds, from the files."""
        listed = await self._git("ls-files", "-z")
        paths = [path for path in listed.split(b"\0") if path]
        return await asyncio.to_thread(scan_bits, self.cwd, paths, umask)

    def _write_modes(self, path: Path, modes: Modes) -> None:
        """Write `modes` whole to `path` (renamed into place)."""
        self._modes_dir.mkdir(mode=0o700, exist_ok=True)
        fresh = self.root / "modes.new"
        _write_private(fresh, encode_modes(modes))
        info = fresh.stat()
        fresh.replace(path)
        if path == self._index_modes:
            self._index_modes_read = ((info.st_ino, info.st_mtime_ns, info.st_size), modes)

    async def _prepare(self) -> None:
        """Before the first git: the killed one gone and its locks removed, the store
        made, its exclude file current."""
        child, self._child = self._child, None
        if child is not None:
            with suppress(TimeoutError):
                async with asyncio.timeout(KILL_GRACE_S + 1):
                    await child.wait()
        if not self._tidy:
            self._remove_stale_locks()
            self._tidy = True
        if not (self._git_dir / "HEAD").is_file():
            await self._create()
        if self._write_exclude():
            self._rules_changed = True

    async def _create(self) -> None:
        """`git init` beside the store, configured, then renamed into place: a store is
        either whole or absent."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        fresh = self.root / "ck.git.new"
        shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(self._git_dir, ignore_errors=True)
        shutil.rmtree(self._modes_dir, ignore_errors=True)
        self._index.unlink(missing_ok=True)
        self._index_modes.unlink(missing_ok=True)
        # --shared=0600: every file git makes in the store is its owner's alone.
        await self._git(
            "init", "-q", "--bare", "--shared=0600", "--template=", str(fresh), bare=True
        )
        config = (fresh / "config").read_text()
        config = config.replace("bare = true", "bare = false")
        (fresh / "config").write_text(config + CONFIG)
        (fresh / "info").mkdir(mode=0o700, exist_ok=True)
        _write_private(fresh / "info" / "attributes", ATTRIBUTES)
        fresh.rename(self._git_dir)

    def _write_exclude(self) -> bool:
        """The repository's own `info/exclude`, then the hidden paths; whether they
        changed."""
        lines: list[str] = []
        user = read_regular(self._user_exclude, EXCLUDE_MAX_BYTES)  # the pod may have made it
        with suppress(UnicodeDecodeError):
            lines += [] if user is None else [user.decode()]
        lines.append("# capd's own directories")
        cwd = self.cwd.resolve()
        for path in self.hidden:
            with suppress(ValueError):
                inside = path.resolve().relative_to(cwd)
                if inside.parts:
                    lines.append("/" + _escape(inside.as_posix()))
        text = "\n".join(lines) + "\n"
        exclude = self._git_dir / "info" / "exclude"
        with suppress(OSError):
            if exclude.read_text() == text:
                return False
        _write_private(exclude, text)
        return True

    def _remove_stale_locks(self) -> None:
        """Lock files and half-written packs a git killed part-way left: at the first git
        of this store (capd may have been killed) and after one of ours was stopped or
        failed (someone else may have killed it). Only then, and only with no git of ours
        running: one store is made per pod, the only one running git in `root`."""
        stale = list(self.root.glob("*.lock"))
        if self._git_dir.is_dir():
            stale += self._git_dir.glob("*.lock")
            stale += (self._git_dir / "refs").rglob("*.lock")
            stale += (self._git_dir / "objects" / "pack").glob("tmp_*")
        for lock in stale:
            with suppress(FileNotFoundError):
                lock.unlink()
                log.info("removed %s, left by a git that was stopped", lock)

    async def _git(
        self,
        *args: str,
        input: bytes | None = None,
        bare: bool = False,
        options: Sequence[str] = (),
        new_paths: int | None = None,
        env: dict[str, str] | None = None,
    ) -> bytes:
        """Run one git command in the store (`bare`: without the store, the index and the
        cwd), `input` on its stdin, git's `options` before the command, `env` over the
        store's; its stdout. `new_paths`: stop it as soon as it lists more paths new to
        the index than that (`ls-files -t`: a cwd far too big is not walked to its end).
        Cancelled: the git's process group is stopped and the cancellation goes on."""
        own = {k: v for k, v in self._env.items() if k not in _STORE} if bare else self._env
        try:
            process = await launch(
                ["git", *options, *args],
                cwd=self.root if bare else self.cwd,
                confine=None,  # capd's own: it writes the store in capd's state dir
                env={**own, **(env or {})},
                inherit=not_git,
                stdin=asyncio.subprocess.DEVNULL if input is None else asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as error:
            raise _GitFailed(f"could not run git {args[0]}: {error.strerror or error}") from None
        except BaseException:
            self._tidy = False  # cancelled as it started: asyncio killed it, maybe part-way
            raise
        self._child = process
        try:
            if new_paths is None:
                out, err = await process.communicate(input)
            else:
                out, err = await self._listing(process, new_paths)
        except BaseException:
            if process.returncode is None:
                stop_group(process)
            self._tidy = False
            raise
        self._child = None
        if process.returncode != 0:
            self._tidy = False
            raise _GitFailed(f"git {args[0]} failed: {_git_message(err)}")
        return out

    async def _listing(
        self, process: asyncio.subprocess.Process, new_paths: int
    ) -> tuple[bytes, bytes]:
        """The stdout and stderr of an `ls-files -z -t`, read as it comes; _Skip once it
        lists more than `new_paths` untracked (`? `) paths."""
        assert process.stdout is not None
        assert process.stderr is not None
        errors = asyncio.ensure_future(process.stderr.read())
        try:
            chunks: list[bytes] = []
            partial = b""
            new = 0
            while chunk := await process.stdout.read(STREAM_CHUNK):
                chunks.append(chunk)
                entries = (partial + chunk).split(b"\0")
                partial = entries.pop()
                new += sum(_is_new(entry) for entry in entries)
                if new > new_paths:
                    raise self._too_many_files()
            await process.wait()
            return b"".join(chunks), await errors
        finally:
            errors.cancel()

    def _write_ref(self, ref: str, commit: str) -> None:
        """Point `ref` at `commit`, as git writes a loose ref: a whole file renamed into
        place (no git runs meanwhile: the store is ours alone)."""
        path = self._git_dir / ref
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fresh = self.root / "ref.new"
        _write_private(fresh, commit + "\n")
        fresh.replace(path)

    def _read_ref(self, ref: str) -> str | None:
        with suppress(OSError):
            value = (self._git_dir / ref).read_text().strip()
            if value:
                return value
        return None

    def _next_rewound(self) -> int:
        numbers = [0]
        with suppress(OSError):
            refs = (self._git_dir / "refs" / "rewound").iterdir()
            numbers += [int(ref.name) for ref in refs if ref.name.isdigit()]
        return max(numbers) + 1

    def _too_many_files(self) -> _Skip:
        return _Skip(
            f"the cwd has more than {self.workspace.checkpoint_max_files} files to record"
            " (workspace.checkpoint_max_files): raise it, or .gitignore what need not be"
            " restored"
        )

    def _timeout_reason(self) -> str:
        seconds = self.workspace.checkpoint_timeout_s
        return (
            f"the checkpoint took longer than {seconds:g} s (workspace.checkpoint_timeout_s):"
            " raise it, or .gitignore what need not be restored"
        )


def _plan(cwd: Path, listing: bytes, ignored: bytes, max_file: int, umask: int) -> _Plan:
    """Sort `ls-files -t -m -d -o` output (`listing`) into what to stage, what to leave
    out and how much, with the permission-bit entries of what is staged; `ignored`:
    recorded paths now ignored, to take out."""
    plan = _Plan(drop=[path for path in ignored.split(b"\0") if path])
    seen = set(plan.drop)
    base = os.fsencode(cwd)
    for entry in listing.split(b"\0"):
        path = entry[2:]  # after its tag and a space
        if not path or path in seen:
            continue
        seen.add(path)
        if path.endswith(b"/"):
            continue  # a nested repository: its own git keeps it
        try:
            info = os.lstat(os.path.join(base, path))
        except (FileNotFoundError, NotADirectoryError):
            plan.update.append(path)
            plan.modes[path] = None
            continue
        if stat.S_ISREG(info.st_mode) and info.st_size > max_file:
            plan.drop.append(path)
            if len(plan.left_out) < LEFT_OUT_NAMED:
                plan.left_out.append(path.decode(errors="backslashreplace"))
            continue
        plan.update.append(path)
        plan.modes[path] = bits_entry(info.st_mode, umask)
        if _is_new(entry):
            plan.new_paths += 1
        if not stat.S_ISDIR(info.st_mode):
            plan.new_bytes += info.st_size
    return plan


def _update(modes: Modes, plan: _Plan) -> None:
    """The entries of `modes` after `plan` was staged."""
    for path in plan.drop:
        modes.entries.pop(path, None)
    for path, mode in plan.modes.items():
        if mode is None:
            modes.entries.pop(path, None)
        else:
            modes.entries[path] = mode


def _taken(base: bytes, path: bytes) -> bool:
    """Whether something is at `path` under `base`, or a file where one of its
    directories should be."""
    if os.path.lexists(os.path.join(base, path)):
        return True
    parent = os.path.dirname(path)
    while parent:
        full = os.path.join(base, parent)
        if os.path.lexists(full):
            return not os.path.isdir(full) or os.path.islink(full)
        parent = os.path.dirname(parent)
    return False


def _is_new(entry: bytes) -> bool:
    """An `ls-files -t` entry of a file not recorded yet (a directory is a nested
    repository)."""
    return entry.startswith(b"? ") and not entry.endswith(b"/")


def _write_private(path: Path, data: str | bytes) -> None:
    """Write `data` to `path`, a file only its owner may read (as git's own are here)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)


def _nul(paths: list[bytes]) -> bytes:
    return b"".join(path + b"\0" for path in paths)


def _turn_ref(turn_id: str) -> str:
    """The ref of a turn's checkpoint; an id git would not take as a ref name is hexed."""
    if _PLAIN_REF.fullmatch(turn_id) and ".." not in turn_id and not turn_id.endswith(".lock"):
        return f"refs/ckpt/{turn_id}"
    return f"refs/ckpt/x-{turn_id.encode().hex()}"


def _index_entries(index: Path) -> int:
    """How many paths an index holds, from its header ("DIRC", version, count)."""
    try:
        with index.open("rb") as file:
            header = file.read(12)
    except FileNotFoundError:
        return 0
    return int.from_bytes(header[8:12], "big") if header[:4] == b"DIRC" else 0


def _escape(path: str) -> str:
    """`path` as a gitignore pattern that matches it alone."""
    escaped = re.sub(r"([\\*?\[!#])", r"\\\1", path)
    stripped = escaped.rstrip(" ")
    return stripped + "\\ " * (len(escaped) - len(stripped))


def _mb(size: int) -> str:
    """`size` in MB, rounded up: more than N MB never reads as N."""
    return f"{math.ceil(size / MB):,}"


def _unsaved(reason: str) -> str:
    return f"the current files could not be recorded first, so none were restored: {reason}"
