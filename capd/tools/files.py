"""The file tools: read_file, write_file, edit_file, confined to the pod's working directory
and, in a sandbox, its `sandbox.writable` paths (docs/protocol.md, Sandbox).

A path is taken relative to the working directory (an absolute one must start with it or
with a writable path: its root) and walked one component at a time from the root's
directory fd, never letting the kernel follow a symlink: a symlink's text is walked the
same way, and any `..` that would climb above the root is refused, whether the file exists
or not, even if the path would come back in. The root itself is reached from `/` the same
way, and a symlink on its way refuses the call (roots are stored resolved at spawn). So a
directory swapped for a symlink, mid-call or between calls, cannot lead a tool outside. In a
sandbox no directory or file met on the way may be one the sandbox hides (compared by device
and inode, so another name for it is refused too), and with mode `read-only` nothing is
written. A regular file hard-linked elsewhere is out of a path check's sight: read_file
reads it, write_file and edit_file refuse a file with more than one link. Files are UTF-8
text: read_file shows undecodable bytes as U+FFFD and refuses files that look binary (a NUL byte
in their first 8 KiB); edit_file refuses files that are not valid UTF-8, since writing back
a lossy decoding would corrupt them.

The files are read and written in a worker thread, so a big one never stalls the other
pods. read_file holds a piece of a line at a time, whatever the file's size, and stops at
the output limit; edit_file must hold the whole file, so it refuses files over 8 MiB.
"""

import asyncio
import contextlib
import errno
import io
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

from capd.tools.base import Tool, ToolContext, ToolFailed, ToolOutcome
from protocol.tools import EditFileArgs, ReadFileArgs, WriteFileArgs

BINARY_SNIFF_BYTES = 8192
PIECE_CHARS = 64 * 1024
"""read_file holds at most this many characters of a line at a time."""
_CHANGING = threading.Lock()
"""Held by each write_file and edit_file while it changes a file."""
_Args = TypeVar("_Args", WriteFileArgs, EditFileArgs)
EDIT_LIMIT_BYTES = 8 * 2**20
"""edit_file holds the whole file several times over (bytes, text, edited text): it refuses
larger files."""


def resolve_inside(path: str, cwd: Path) -> Path:
    """The real path of `path` (relative to `cwd`), refused unless it lies inside `cwd`.

    A check of a name, which a rename can change right after: the file tools open through
    `_open_inside` instead."""
    root = cwd.resolve()
    try:
        target = (root / path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ToolFailed(f"cannot resolve path {path}: {exc}") from exc
    if not target.is_relative_to(root):
        raise ToolFailed(f"path {path} resolves outside the working directory {cwd}")
    return target


def _os_failure(action: str, path: str, exc: OSError) -> ToolFailed:
    return ToolFailed(f"cannot {action} {path}: {exc.strerror or exc}")


_DIR_FLAGS = os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)
_MAX_LINKS = 40
"""Symlinks followed in one path before giving up, as the kernel does (ELOOP)."""
_MAX_PATH_BYTES = 4096
"""The longest path taken, as the kernel's PATH_MAX (ENAMETOOLONG)."""
_MAX_DEPTH = 256
"""Directories deep a walk may go: it holds one fd per level, which a path or a chain of
symlinks must not run up (ENAMETOOLONG)."""


@dataclass(frozen=True, slots=True)
class _Bounds:
    """Where a file tool may go: below one of `roots` (the cwd first), never into a
    directory or file of `hidden` (keyed by device and inode)."""

    roots: tuple[Path, ...]
    hidden: dict[tuple[int, int], Path]
    read_only: dict[tuple[int, int], Path] = field(default_factory=dict)
    """For a write: what the sandbox shows read-only, though inside a writable path (a
    work tree's `.git` file, its git directory's config)."""

    def outside(self, path: str) -> ToolFailed:
        where = f"the working directory {self.roots[0]}"
        if len(self.roots) > 1:
            where += f" and the writable paths ({', '.join(map(str, self.roots[1:]))})"
        return ToolFailed(f"path {path} resolves outside {where}")


def _bounds(ctx: ToolContext, *, writing: bool, path: str) -> _Bounds:
    """The bounds of one call; a write in a read-only sandbox is refused here."""
    box = ctx.sandbox
    if box is None:  # mode off
        return _Bounds((ctx.cwd,), {})
    if writing and box.mode == "read-only":
        raise ToolFailed(
            f"cannot write {path}: this pod's sandbox.mode is read-only, so nothing is "
            "writable, not even the working directory"
        )
    writable = box.writable_paths()
    read_only = _identities(p for p in box.shown if p not in writable) if writing else {}
    return _Bounds((ctx.cwd, *map(Path, box.writable)), _identities(box.hidden), read_only)


def _identities(paths: Iterable[Path | str]) -> dict[tuple[int, int], Path]:
    """The device and inode of each path that exists."""
    found = {}
    for path in map(Path, paths):
        with contextlib.suppress(OSError):
            info = path.stat()
            found[(info.st_dev, info.st_ino)] = path
    return found


def _open_inside(path: str, bounds: _Bounds, flags: int) -> int:
    """An fd for the regular file `path` names inside one of `bounds.roots`, opened with
    `flags`.

    The path is walked one component at a time, each opened relative to the directory fd
    before it and never through a symlink (O_NOFOLLOW): a symlink's text is read and
    walked the same way, so the kernel never follows a name we did not check, and a
    directory swapped for a symlink mid-walk cannot lead outside. `..` climbs the fds
    already open and stops at the root. Each fd is checked against the hidden paths before
    it is used. With O_CREAT, missing directories are created. For writing, a file with
    more than one hard link is refused: a path check cannot see where the other links are.
    """
    if "\0" in path:
        raise ToolFailed(f"cannot resolve path {path}: embedded null byte")
    if len(path.encode(errors="surrogateescape")) >= _MAX_PATH_BYTES:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    outside = bounds.outside(path)
    root, parts = _rooted(PurePosixPath(path), bounds.roots, outside)
    pending = deque(parts)
    levels: list[tuple[str, int | None]] = [("", _open_root(root, bounds, path))]
    links = 0
    try:
        while pending:
            name = pending.popleft()
            if name == "..":
                if len(levels) == 1:
                    raise outside
                _close(levels.pop()[1])
                continue
            top = _materialize(levels, bounds, path, creating=bool(flags & os.O_CREAT))
            target = _step(name, top, flags, last=not pending, path=path)
            if len(levels) > _MAX_DEPTH and not isinstance(target, str):
                _close(target)
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
            if isinstance(target, int):
                _unhidden(target, bounds, path)
                if pending:
                    levels.append((name, target))
                    continue
                return target
            if target is None:
                levels.append((name, None))
                continue
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            link = PurePosixPath(target)
            if link.is_absolute():
                for _, fd in levels[1:]:
                    _close(fd)
                del levels[1:]
            pending.extendleft(reversed(_below(link, root, outside)))
        raise ToolFailed(f"{path} is not a regular file")
    finally:
        for _, fd in levels:
            _close(fd)


def _rooted(
    path: PurePosixPath, roots: tuple[Path, ...], outside: ToolFailed
) -> tuple[Path, tuple[str, ...]]:
    """The root `path` is walked from (a relative path: the cwd) and its components
    below it."""
    if not path.is_absolute():
        return roots[0], path.parts
    for root in roots:
        with contextlib.suppress(ToolFailed):
            return root, _below(path, root, outside)
    raise outside


def _below(path: PurePosixPath, root: Path, outside: ToolFailed) -> tuple[str, ...]:
    """The components of `path` below `root`; an absolute path must start with `root`
    as stored (never as it resolves now: a pod may have swapped a component for a symlink)
    or it is outside."""
    if not path.is_absolute():
        return path.parts
    if path.is_relative_to(root):
        return path.relative_to(root).parts
    raise outside


def _open_root(root: Path, bounds: _Bounds, path: str) -> int:
    """An fd for the directory `root`, walked from `/` one component at a time without
    following a symlink. Roots are stored resolved at spawn, so a symlink on the way means
    a component was swapped since (a pod may rename what lies in its own cwd, a parent its
    child's cwd): the call is refused rather than led wherever the symlink points."""
    what = "working directory" if root == bounds.roots[0] else "writable path"
    fd = os.open("/", _DIR_FLAGS)
    try:
        for depth, name in enumerate(root.parts[1:], start=2):
            try:
                below = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise ToolFailed(f"cannot open {path}: the {what} {root} does not exist") from None
            except NotADirectoryError:
                swapped = Path(*root.parts[:depth])
                kind = "a symlink" if swapped.is_symlink() else "not a directory"
                raise ToolFailed(
                    f"cannot open {path}: {swapped} is {kind} now, so the {what} {root} is "
                    "not the directory the pod was given; the file tools do not follow it"
                ) from None
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return _unhidden(fd, bounds, path)


def _unhidden(fd: int, bounds: _Bounds, path: str) -> int:
    """`fd`, unless it is a directory or file the sandbox hides, or keeps read-only for
    a write (then it is closed)."""
    if not bounds.hidden and not bounds.read_only:
        return fd
    info = os.fstat(fd)
    hidden = bounds.hidden.get((info.st_dev, info.st_ino))
    if hidden is not None:
        os.close(fd)
        raise ToolFailed(
            f"{path} leads into {hidden}, which the sandbox hides; the file tools do not open it"
        )
    pinned = bounds.read_only.get((info.st_dev, info.st_ino))
    if pinned is not None:
        os.close(fd)
        raise ToolFailed(
            f"{path} leads into {pinned}, which the sandbox keeps read-only; the file tools "
            "do not write it"
        )
    return fd


def _materialize(
    levels: list[tuple[str, int | None]], bounds: _Bounds, path: str, *, creating: bool
) -> int:
    """The fd of the deepest level, creating the directories that are missing so far when
    `creating` (else a missing one is an error). Missing levels are the last ones: a
    level below a missing one is missing too."""
    first_missing = len(levels)
    while levels[first_missing - 1][1] is None:
        first_missing -= 1
    for index in range(first_missing, len(levels)):
        name = levels[index][0]
        if not creating:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        parent = levels[index - 1][1]
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=parent)
        opened = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent)
        levels[index] = (name, _unhidden(opened, bounds, path))
    fd = levels[-1][1]
    assert fd is not None
    return fd


def _step(name: str, top: int, flags: int, *, last: bool, path: str) -> int | str | None:
    """Open `name` in the directory `top` without following it: an fd (a directory's, or
    the file's when `last`), a symlink's text to walk instead, or None when a directory
    on the way is missing."""
    if not last:
        try:
            return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=top)
        except FileNotFoundError:
            return None
        except OSError:
            link = _link_text(name, top)
            if link is None:
                raise
            return link
    try:
        found = os.stat(name, dir_fd=top, follow_symlinks=False)
    except FileNotFoundError:
        found = None
    if found is not None and stat.S_ISLNK(found.st_mode):
        return _link_text(name, top) or name  # no link any more: walk `name` again
    if found is not None and not stat.S_ISREG(found.st_mode):
        raise ToolFailed(f"{path} is not a regular file")
    # O_NONBLOCK: a FIFO swapped in since the stat must not block the worker thread.
    opening = (flags & ~os.O_TRUNC) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, opening, 0o666, dir_fd=top)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return _link_text(name, top) or name  # a symlink swapped in since the stat
        raise
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise ToolFailed(f"{path} is not a regular file")
        if (flags & os.O_ACCMODE) != os.O_RDONLY and opened.st_nlink > 1:
            raise ToolFailed(
                f"{path} has {opened.st_nlink} hard links, which may lead outside the "
                "working directory; the file tools do not write such files, use bash"
            )
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link_text(name: str, top: int) -> str | None:
    """The text of the symlink `name` in `top`, or None if it is not one (any more)."""
    try:
        return os.readlink(name, dir_fd=top)
    except OSError:
        return None


def _close(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _readable(path: str, ctx: ToolContext) -> int:
    """A file read_file may open: inside the working directory, or one of the pod's own
    spill files (the full output of a long bash command, which the note names)."""
    if ctx.spill_dir is not None and (spilled := _open_spilled(path, ctx.spill_dir)) is not None:
        return spilled
    return _open_inside(path, _bounds(ctx, writing=False, path=path), os.O_RDONLY)


def _open_spilled(path: str, spill_dir: Path) -> int | None:
    """An fd for the spill file `path` names, opened in the spill dir without following a
    symlink; None if it is not one."""
    spilled = PurePosixPath(path)
    if not spilled.is_absolute() or spilled.parent not in (spill_dir, spill_dir.resolve()):
        return None
    try:
        directory = os.open(spill_dir, _DIR_FLAGS)
    except OSError:
        return None
    try:
        fd = os.open(spilled.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
    except OSError:
        return None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


class ReadFileTool(Tool[ReadFileArgs]):
    name = "read_file"
    description = (
        "Read a UTF-8 text file: `limit` lines starting at line `offset` (counting from 1). "
        "Long output is cut; a note at the end says where to read on."
    )
    args_model = ReadFileArgs

    async def run(self, args: ReadFileArgs, ctx: ToolContext) -> ToolOutcome:
        stop = threading.Event()
        try:
            return await asyncio.to_thread(_read_file, args, ctx, stop)
        finally:
            stop.set()  # a cancelled call's thread stops at its next piece


def _read_file(args: ReadFileArgs, ctx: ToolContext, stop: threading.Event) -> ToolOutcome:
    try:
        with os.fdopen(_readable(args.path, ctx), "rb") as raw:
            if b"\0" in raw.read(BINARY_SNIFF_BYTES):
                raise ToolFailed(f"{args.path} looks like a binary file (it holds NUL bytes)")
            raw.seek(0)
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
            return ToolOutcome(_read_lines(_pieces(text, stop), args, ctx.output_limit))
    except OSError as exc:
        raise _os_failure("read", args.path, exc) from exc


def _pieces(text: io.TextIOWrapper, stop: threading.Event) -> Iterator[tuple[int, str]]:
    """The file in pieces of at most PIECE_CHARS characters, each with the number of the
    line it belongs to: a long line comes in several."""
    number, previous = 1, ""
    while not stop.is_set() and (piece := text.readline(PIECE_CHARS)):
        if piece == "\n" and previous.endswith("\r"):
            number -= 1  # the end of a \r\n that the piece size cut in two
        yield number, piece
        if piece.endswith(("\n", "\r")):
            number += 1
        previous = piece


def _read_lines(pieces: Iterator[tuple[int, str]], args: ReadFileArgs, output_limit: int) -> str:
    shown: list[str] = []
    size = 0
    lines_seen = 0
    for number, piece in pieces:
        lines_seen = number
        if number < args.offset:
            continue
        if number >= args.offset + args.limit:
            return _with_note(shown, f"[the file goes on; read on with offset={number}]")
        encoded = piece.encode()
        if size + len(encoded) > output_limit:
            shown.append(encoded[: output_limit - size].decode(errors="ignore"))
            resume = number if number > args.offset else number + 1
            return _with_note(
                shown,
                f"[output truncated at {output_limit} bytes, within line {number}; "
                f"read on with offset={resume}]",
            )
        shown.append(piece)
        size += len(encoded)
    if not shown:
        if lines_seen == 0:
            return "[the file is empty]"
        return f"[offset {args.offset} is past the end of the file, which has {lines_seen} lines]"
    return "".join(shown)


def _with_note(shown: list[str], note: str) -> str:
    body = "".join(shown)
    separator = "" if not body or body.endswith("\n") else "\n"
    return f"{body}{separator}{note}"


class WriteFileTool(Tool[WriteFileArgs]):
    name = "write_file"
    description = "Write a whole file, replacing it if it exists; missing directories are created."
    args_model = WriteFileArgs

    async def run(self, args: WriteFileArgs, ctx: ToolContext) -> ToolOutcome:
        return await _change(_write_file, args, ctx)


async def _change(
    change: Callable[[_Args, ToolContext], ToolOutcome], args: _Args, ctx: ToolContext
) -> ToolOutcome:
    """Run a file change in a worker thread, one at a time (an edit reads, then writes: two
    at once could lose one), and to its end even when the call is cancelled, so that after
    a pause no thread is still changing the file behind the pod's back."""

    def locked() -> ToolOutcome:
        with _CHANGING:
            return change(args, ctx)

    changing = asyncio.ensure_future(asyncio.to_thread(locked))
    try:
        return await asyncio.shield(changing)
    except asyncio.CancelledError:
        await asyncio.wait([changing])
        raise


def _write_file(args: WriteFileArgs, ctx: ToolContext) -> ToolOutcome:
    data = args.content.encode()
    try:
        bounds = _bounds(ctx, writing=True, path=args.path)
        fd = _open_inside(args.path, bounds, os.O_WRONLY | os.O_CREAT)
        with os.fdopen(fd, "wb") as out:
            out.truncate()  # once the file was checked (a read-only one is left whole)
            out.write(data)
    except OSError as exc:
        raise _os_failure("write", args.path, exc) from exc
    return ToolOutcome(f"wrote {len(data)} bytes to {args.path}")


class EditFileTool(Tool[EditFileArgs]):
    name = "edit_file"
    description = (
        "Replace old_text with new_text in a file. old_text must occur exactly once; "
        "include enough surrounding lines to make it unique."
    )
    args_model = EditFileArgs

    async def run(self, args: EditFileArgs, ctx: ToolContext) -> ToolOutcome:
        if not args.old_text:
            raise ToolFailed("old_text is empty; give the exact text to replace")
        return await _change(_edit_file, args, ctx)


def _edit_file(args: EditFileArgs, ctx: ToolContext) -> ToolOutcome:
    """Read and write back through one fd, so that the file edited is the file read."""
    try:
        fd = _open_inside(args.path, _bounds(ctx, writing=True, path=args.path), os.O_RDWR)
    except OSError as exc:
        raise _os_failure("edit", args.path, exc) from exc
    with os.fdopen(fd, "r+b") as file:
        text = _text_to_edit(file, args.path)
        count = text.count(args.old_text)
        if count == 0:
            raise ToolFailed(f"old_text not found in {args.path}")
        if count > 1:
            raise ToolFailed(
                f"old_text occurs {count} times in {args.path}; include more context "
                "so that it occurs exactly once"
            )
        start = text.index(args.old_text)
        edited = text[:start] + args.new_text + text[start + len(args.old_text) :]
        try:
            file.seek(0)
            file.truncate()
            file.write(edited.encode())
        except OSError as exc:
            raise _os_failure("write", args.path, exc) from exc
    line = text.count("\n", 0, start) + 1
    return ToolOutcome(f"edited {args.path}: replaced the text at line {line}")


def _text_to_edit(file: BinaryIO, path: str) -> str:
    try:
        data = file.read(EDIT_LIMIT_BYTES + 1)
    except OSError as exc:
        raise _os_failure("read", path, exc) from exc
    if len(data) > EDIT_LIMIT_BYTES:
        raise ToolFailed(
            f"{path} is larger than {EDIT_LIMIT_BYTES >> 20} MiB, more than edit_file changes; "
            "edit it with bash (sed, or a script) instead"
        )
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ToolFailed(f"{path} is not UTF-8 text; edit_file cannot change it") from exc
