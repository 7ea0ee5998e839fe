"""The file tools: read_file, write_file, edit_file, confined to the pod's working directory.

A path is taken relative to the working directory and resolved, symlinks included; a path
that lands outside it is refused, whether the file exists or not. Files are UTF-8 text:
read_file shows undecodable bytes as U+FFFD and refuses files that look binary (a NUL byte
in their first 8 KiB); edit_file refuses files that are not valid UTF-8, since writing back
a lossy decoding would corrupt them.

The files are read and written in a worker thread, so a big one never stalls the other
pods. read_file holds a piece of a line at a time, whatever the file's size, and stops at
the output limit; edit_file must hold the whole file, so it refuses files over 8 MiB.
"""

import asyncio
import io
import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
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
    """The real path of `path` (relative to `cwd`), refused unless it lies inside `cwd`."""
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


def _file_inside(path: str, cwd: Path) -> Path:
    """`resolve_inside`, refusing directories, FIFOs and devices as well: opening a FIFO
    would block."""
    target = resolve_inside(path, cwd)
    if target.exists() and not target.is_file():
        raise ToolFailed(f"{path} is not a regular file")
    return target


def _open_regular(target: Path, path: str, flags: int) -> BinaryIO:
    """Open `target`, refusing what is not a regular file. O_NONBLOCK keeps a FIFO swapped
    in since `_file_inside` looked from blocking the worker thread (and shutdown) forever."""
    fd = os.open(target, flags | os.O_NONBLOCK, 0o666)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ToolFailed(f"{path} is not a regular file")
    return os.fdopen(fd, "rb" if (flags & os.O_ACCMODE) == os.O_RDONLY else "wb")


def _readable(path: str, ctx: ToolContext) -> Path:
    """A file read_file may open: inside the working directory, or one of the pod's own
    spill files (the full output of a long bash command, which the note names)."""
    if ctx.spill_dir is not None and Path(path).is_absolute():
        spilled = Path(path).resolve()
        if spilled.parent == ctx.spill_dir.resolve() and spilled.is_file():
            return spilled
    return _file_inside(path, ctx.cwd)


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
    target = _readable(args.path, ctx)
    try:
        with _open_regular(target, args.path, os.O_RDONLY) as raw:
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
    target = _file_inside(args.path, ctx.cwd)
    data = args.content.encode()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _write(target, args.path, data)
    except OSError as exc:
        raise _os_failure("write", args.path, exc) from exc
    return ToolOutcome(f"wrote {len(data)} bytes to {args.path}")


def _write(target: Path, path: str, data: bytes) -> None:
    with _open_regular(target, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as out:
        out.write(data)


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
    target = _file_inside(args.path, ctx.cwd)
    text = _text_to_edit(target, args.path)
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
        _write(target, args.path, edited.encode())
    except OSError as exc:
        raise _os_failure("write", args.path, exc) from exc
    line = text.count("\n", 0, start) + 1
    return ToolOutcome(f"edited {args.path}: replaced the text at line {line}")


def _text_to_edit(target: Path, path: str) -> str:
    try:
        with _open_regular(target, path, os.O_RDONLY) as raw:
            data = raw.read(EDIT_LIMIT_BYTES + 1)
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
