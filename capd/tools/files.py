"""The file tools: read_file, write_file, edit_file, confined to the pod's working directory.

A path is taken relative to the working directory and resolved, symlinks included; a path
that lands outside it is refused, whether the file exists or not. Files are UTF-8 text:
read_file shows undecodable bytes as U+FFFD and refuses files that look binary (a NUL byte
in their first 8 KiB); edit_file refuses files that are not valid UTF-8, since writing back
a lossy decoding would corrupt them.
"""

import io
from pathlib import Path

from capd.tools.base import Tool, ToolContext, ToolFailed, ToolOutcome
from protocol.tools import EditFileArgs, ReadFileArgs, WriteFileArgs

BINARY_SNIFF_BYTES = 8192


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
    would block the event loop."""
    target = resolve_inside(path, cwd)
    if target.exists() and not target.is_file():
        raise ToolFailed(f"{path} is not a regular file")
    return target


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
        target = _readable(args.path, ctx)
        try:
            with target.open("rb") as raw:
                if b"\0" in raw.read(BINARY_SNIFF_BYTES):
                    raise ToolFailed(f"{args.path} looks like a binary file (it holds NUL bytes)")
                raw.seek(0)
                text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="")
                return ToolOutcome(_read_lines(text, args, ctx.output_limit))
        except OSError as exc:
            raise _os_failure("read", args.path, exc) from exc


def _read_lines(text: io.TextIOWrapper, args: ReadFileArgs, output_limit: int) -> str:
    shown: list[str] = []
    size = 0
    lines_seen = 0
    for number, line in enumerate(text, start=1):
        lines_seen = number
        if number < args.offset:
            continue
        if number >= args.offset + args.limit:
            return _with_note(shown, f"[the file goes on; read on with offset={number}]")
        encoded = line.encode()
        if size + len(encoded) > output_limit:
            shown.append(encoded[: output_limit - size].decode(errors="ignore"))
            resume = number if number > args.offset else number + 1
            return _with_note(
                shown,
                f"[output truncated at {output_limit} bytes, within line {number}; "
                f"read on with offset={resume}]",
            )
        shown.append(line)
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
        target = _file_inside(args.path, ctx.cwd)
        data = args.content.encode()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
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
        target = _file_inside(args.path, ctx.cwd)
        try:
            text = target.read_bytes().decode()
        except OSError as exc:
            raise _os_failure("read", args.path, exc) from exc
        except UnicodeDecodeError as exc:
            raise ToolFailed(f"{args.path} is not UTF-8 text; edit_file cannot change it") from exc
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
            target.write_bytes(edited.encode())
        except OSError as exc:
            raise _os_failure("write", args.path, exc) from exc
        line = text.count("\n", 0, start) + 1
        return ToolOutcome(f"edited {args.path}: replaced the text at line {line}")
