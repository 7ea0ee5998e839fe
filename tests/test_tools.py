"""The built-in tools, run for real: bash subprocesses and files under tmp_path."""

import asyncio
import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import get_args

import orjson
import pytest

from capd.chat import INVALID_JSON_KEY
from capd.proc.groups import KILL_GRACE_S
from capd.tools import BUILTIN_TOOLS
from capd.tools.base import Tool, ToolContext, ToolOutcome
from capd.tools.toolbox import Toolbox
from protocol.names import ToolName
from protocol.tools import NoArgs, ToolArgs
from tests.helpers import alive, run_tool

WAIT_S = 5.0


async def until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Polls `condition` until it holds; fails the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def reaped(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def read_pids(path: Path) -> list[int]:
    return [int(word) for word in path.read_text().split()]


async def wait_for_pids(path: Path) -> list[int]:
    """PIDs a command wrote to `path` (it writes a temp file and renames it, so reads are whole)."""
    await until(path.exists)
    return read_pids(path)


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    work = tmp_path / "work"
    work.mkdir()
    return ToolContext(cwd=work, pod="test")


async def bash(ctx: ToolContext, command: str, **extra: object) -> ToolOutcome:
    return await run_tool("bash", {"command": command, **extra}, ctx)


# bash


async def test_bash_returns_output_and_success(ctx: ToolContext) -> None:
    outcome = await bash(ctx, "echo hello; echo oops >&2")
    assert outcome == ToolOutcome("hello\noops")


async def test_bash_reports_nonzero_exit(ctx: ToolContext) -> None:
    outcome = await bash(ctx, "echo failing; exit 3")
    assert outcome.is_error
    assert outcome.output == "failing\n[exit code 3]"
    killed = await bash(ctx, "kill -TERM $$")
    assert killed == ToolOutcome("[killed by signal SIGTERM]", is_error=True)


async def test_bash_reports_no_output(ctx: ToolContext) -> None:
    assert await bash(ctx, "true") == ToolOutcome("[no output]")


async def test_bash_runs_in_cwd_with_empty_stdin(ctx: ToolContext) -> None:
    outcome = await bash(ctx, "pwd; cat; echo end")
    assert outcome.output == f"{ctx.cwd}\nend"


async def test_bash_missing_cwd_is_an_error(tmp_path: Path) -> None:
    outcome = await bash(ToolContext(cwd=tmp_path / "missing", pod="test"), "true")
    assert outcome.is_error
    assert "cannot run bash" in outcome.output


async def test_bash_timeout_kills_the_process_group(ctx: ToolContext) -> None:
    command = "sleep 1000 & echo $! $$ > pids.tmp && mv pids.tmp pids; echo started; sleep 1000"
    started = time.monotonic()
    outcome = await bash(ctx, command, timeout_s=0.5)
    assert time.monotonic() - started < 3
    assert outcome.is_error
    assert outcome.output == "started\n[command timed out after 0.5 s and was killed]"
    background, main = await wait_for_pids(ctx.cwd / "pids")
    await until(lambda: not alive(background) and not group_members(main))
    assert reaped(main)


async def test_bash_kills_background_processes_when_the_command_ends(ctx: ToolContext) -> None:
    command = "sleep 1000 & echo $! $$ > pids.tmp && mv pids.tmp pids; echo done"
    outcome = await asyncio.wait_for(bash(ctx, command), WAIT_S)
    assert outcome == ToolOutcome("done")
    background, main = await wait_for_pids(ctx.cwd / "pids")
    await until(lambda: not alive(background) and not group_members(main))


async def test_bash_stops_reading_when_an_escaped_process_holds_the_pipe(
    ctx: ToolContext,
) -> None:
    command = "setsid sleep 1000 & echo $! > pids.tmp && mv pids.tmp pids; echo done"
    try:
        outcome = await asyncio.wait_for(bash(ctx, command), WAIT_S)
        assert outcome == ToolOutcome("done")
    finally:
        (escaped,) = await wait_for_pids(ctx.cwd / "pids")
        os.kill(escaped, 9)


async def test_bash_truncates_big_output_quickly(ctx: ToolContext) -> None:
    started = time.monotonic()
    outcome = await bash(ctx, "yes | head -c 10000000")
    assert time.monotonic() - started < 5
    assert not outcome.is_error
    body, note = outcome.output.rsplit("\n", 1)
    assert note == f"[output truncated: 10000000 bytes in all, first {ctx.output_limit} shown]"
    assert len(body) == ctx.output_limit - 1
    assert set(body.split("\n")) == {"y"}


async def test_bash_decodes_invalid_utf8_with_replacement(ctx: ToolContext) -> None:
    outcome = await bash(ctx, r"printf 'a\377b'")
    assert outcome.output == "a\ufffdb"


async def test_bash_cancellation_kills_the_whole_group(ctx: ToolContext) -> None:
    command = "sleep 1000 & echo $! $$ > pids.tmp && mv pids.tmp pids; sleep 1000"
    task = asyncio.create_task(bash(ctx, command))
    background, main = await wait_for_pids(ctx.cwd / "pids")
    assert alive(background)
    assert alive(main)
    cancelled = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)
    assert time.monotonic() - cancelled < 1
    await until(lambda: not group_members(main), timeout_s=1)
    await until(lambda: reaped(main), timeout_s=1)
    assert not alive(background)


async def test_a_group_that_ignores_sigterm_gets_sigkill_after_the_grace(
    ctx: ToolContext,
) -> None:
    command = "trap '' TERM; sleep 1000 & echo $! $$ > pids.tmp && mv pids.tmp pids; wait"
    task = asyncio.create_task(bash(ctx, command))
    background, main = await wait_for_pids(ctx.cwd / "pids")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)
    assert alive(main), "bash ignores SIGTERM, so it outlives the cancel for a while"
    await until(lambda: not group_members(main), timeout_s=KILL_GRACE_S + 2)
    assert not alive(background)


# path confinement


def untouched(outside: Path) -> bool:
    files = sorted(p.name for p in outside.iterdir())
    return files == ["secret.txt"] and (outside / "secret.txt").read_text() == "secret\n"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret.txt").write_text("secret\n")
    return directory


@pytest.mark.parametrize(
    ("tool", "extra"),
    [
        ("read_file", {}),
        ("write_file", {"content": "x"}),
        ("edit_file", {"old_text": "secret", "new_text": "x"}),
    ],
)
async def test_file_tools_refuse_paths_outside_cwd(
    ctx: ToolContext, outside: Path, tool: str, extra: dict[str, str]
) -> None:
    (ctx.cwd / "link.txt").symlink_to(outside / "secret.txt")
    (ctx.cwd / "linkdir").symlink_to(outside)
    (ctx.cwd / "dangling.txt").symlink_to(outside / "new.txt")
    paths = [
        "../outside/secret.txt",
        "sub/../../outside/secret.txt",
        str(outside / "secret.txt"),
        "link.txt",
        "linkdir/secret.txt",
        "linkdir/new.txt",
        "dangling.txt",
    ]
    for path in paths:
        outcome = await run_tool(tool, {"path": path, **extra}, ctx)
        assert outcome == ToolOutcome(
            f"path {path} resolves outside the working directory {ctx.cwd}", is_error=True
        )
    assert untouched(outside)


async def test_file_tools_accept_absolute_paths_and_symlinks_inside_cwd(ctx: ToolContext) -> None:
    (ctx.cwd / "real.txt").write_text("inside\n")
    (ctx.cwd / "link.txt").symlink_to(ctx.cwd / "real.txt")
    absolute = await run_tool("read_file", {"path": str(ctx.cwd / "real.txt")}, ctx)
    assert absolute == ToolOutcome("inside\n")
    assert await run_tool("read_file", {"path": "link.txt"}, ctx) == ToolOutcome("inside\n")


async def test_file_tools_walk_symlinks_inside_cwd_but_never_above_it(
    ctx: ToolContext, outside: Path
) -> None:
    """A symlink is walked by its text, as if typed; a `..` above the cwd is refused even
    when the path would come back in."""
    (ctx.cwd / "real").mkdir()
    (ctx.cwd / "dir").symlink_to("real")
    written = await run_tool("write_file", {"path": "dir/new/f.txt", "content": "x"}, ctx)
    assert written == ToolOutcome("wrote 1 bytes to dir/new/f.txt")
    assert (ctx.cwd / "real/new/f.txt").read_text() == "x"
    assert await run_tool("read_file", {"path": "dir/../dir/new/f.txt"}, ctx) == ToolOutcome("x")
    (ctx.cwd / "back").symlink_to(f"../{ctx.cwd.name}/real")
    back = await run_tool("read_file", {"path": "back/new/f.txt"}, ctx)
    assert back == ToolOutcome(
        f"path back/new/f.txt resolves outside the working directory {ctx.cwd}", True
    )
    (ctx.cwd / "loop").symlink_to("loop")
    loop = await run_tool("read_file", {"path": "loop"}, ctx)
    assert loop == ToolOutcome("cannot read loop: Too many levels of symbolic links", True)
    edit = {"path": "no/such/f.txt", "old_text": "a", "new_text": "b"}
    missing = await run_tool("edit_file", edit, ctx)
    assert missing == ToolOutcome("cannot edit no/such/f.txt: No such file or directory", True)
    assert not (ctx.cwd / "no").exists(), "edit_file made directories"


async def test_file_tools_write_no_file_with_other_hard_links(
    ctx: ToolContext, outside: Path
) -> None:
    """A hard link to an outside file looks like any file inside: the writing tools refuse
    every file with more than one link; read_file reads it."""
    (ctx.cwd / "hard.txt").hardlink_to(outside / "secret.txt")
    refusal = (
        "hard.txt has 2 hard links, which may lead outside the working directory; "
        "the file tools do not write such files, use bash"
    )
    write = await run_tool("write_file", {"path": "hard.txt", "content": "x"}, ctx)
    edit = {"path": "hard.txt", "old_text": "secret", "new_text": "x"}
    assert write == ToolOutcome(refusal, True)
    assert await run_tool("edit_file", edit, ctx) == ToolOutcome(refusal, True)
    assert untouched(outside)
    assert await run_tool("read_file", {"path": "hard.txt"}, ctx) == ToolOutcome("secret\n")


async def test_file_tools_refuse_paths_too_long_or_deep_to_walk(ctx: ToolContext) -> None:
    """A walk holds an fd per directory level: a path must not make one call hold
    thousands of them (while the daemon's other pods wait)."""
    deep = "d/" * 300 + "f.txt"
    refused = await run_tool("write_file", {"path": deep, "content": "x"}, ctx)
    assert refused == ToolOutcome(f"cannot write {deep}: File name too long", True)
    assert len(list(ctx.cwd.rglob("*"))) <= 257, "it stopped at the depth limit"
    long_path = "x" * 4100
    too_long = await run_tool("read_file", {"path": long_path}, ctx)
    assert too_long == ToolOutcome(f"cannot read {long_path}: File name too long", True)


# read_file


async def test_read_file_offset_and_limit(ctx: ToolContext) -> None:
    (ctx.cwd / "f.txt").write_text("".join(f"line {n}\n" for n in range(1, 11)))
    outcome = await run_tool("read_file", {"path": "f.txt", "offset": 3, "limit": 2}, ctx)
    assert outcome == ToolOutcome("line 3\nline 4\n[the file goes on; read on with offset=5]")
    tail = await run_tool("read_file", {"path": "f.txt", "offset": 9}, ctx)
    assert tail == ToolOutcome("line 9\nline 10\n")


async def test_read_file_offset_past_the_end(ctx: ToolContext) -> None:
    (ctx.cwd / "f.txt").write_text("a\nb\nc")
    outcome = await run_tool("read_file", {"path": "f.txt", "offset": 10}, ctx)
    assert outcome == ToolOutcome("[offset 10 is past the end of the file, which has 3 lines]")
    (ctx.cwd / "empty.txt").write_text("")
    empty = await run_tool("read_file", {"path": "empty.txt"}, ctx)
    assert empty == ToolOutcome("[the file is empty]")


async def test_read_file_caps_output(tmp_path: Path) -> None:
    ctx = ToolContext(cwd=tmp_path, pod="test", output_limit=25)
    (tmp_path / "f.txt").write_text("0123456789\n" * 5)
    outcome = await run_tool("read_file", {"path": "f.txt"}, ctx)
    assert outcome == ToolOutcome(
        "0123456789\n0123456789\n012\n"
        "[output truncated at 25 bytes, within line 3; read on with offset=3]"
    )
    (tmp_path / "long.txt").write_text("x" * 100)
    long_line = await run_tool("read_file", {"path": "long.txt"}, ctx)
    assert long_line.output.endswith("within line 1; read on with offset=2]")


async def test_read_file_refuses_binary_and_replaces_bad_utf8(ctx: ToolContext) -> None:
    (ctx.cwd / "bin").write_bytes(b"\x7fELF\0\0\1")
    binary = await run_tool("read_file", {"path": "bin"}, ctx)
    assert binary == ToolOutcome("bin looks like a binary file (it holds NUL bytes)", True)
    (ctx.cwd / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert await run_tool("read_file", {"path": "latin1.txt"}, ctx) == ToolOutcome("caf\ufffd\n")


async def test_read_file_missing_file(ctx: ToolContext) -> None:
    missing = await run_tool("read_file", {"path": "nope.txt"}, ctx)
    assert missing == ToolOutcome("cannot read nope.txt: No such file or directory", True)
    bad = await run_tool("read_file", {"path": "a\0b"}, ctx)
    assert bad == ToolOutcome("cannot resolve path a\0b: embedded null byte", True)


@pytest.mark.parametrize(
    ("tool", "extra"),
    [
        ("read_file", {}),
        ("write_file", {"content": "x"}),
        ("edit_file", {"old_text": "a", "new_text": "b"}),
    ],
)
async def test_file_tools_refuse_directories_and_fifos(
    ctx: ToolContext, tool: str, extra: dict[str, str]
) -> None:
    os.mkfifo(ctx.cwd / "fifo")
    for path in (".", "fifo"):
        outcome = await run_tool(tool, {"path": path, **extra}, ctx)
        assert outcome == ToolOutcome(f"{path} is not a regular file", True)


# write_file and edit_file


async def test_write_file_creates_directories_and_reports_bytes(ctx: ToolContext) -> None:
    outcome = await run_tool("write_file", {"path": "a/b/c.txt", "content": "é\n"}, ctx)
    assert outcome == ToolOutcome("wrote 3 bytes to a/b/c.txt")
    assert (ctx.cwd / "a/b/c.txt").read_text() == "é\n"
    await run_tool("write_file", {"path": "a/b/c.txt", "content": "new"}, ctx)
    assert (ctx.cwd / "a/b/c.txt").read_text() == "new"


async def test_edit_file(ctx: ToolContext) -> None:
    path = ctx.cwd / "f.py"
    path.write_text("a = 1\nb = 1\nc = 2\n")
    edit = {"path": "f.py", "new_text": "x"}

    missing = await run_tool("edit_file", {**edit, "old_text": "zzz"}, ctx)
    assert missing == ToolOutcome("old_text not found in f.py", True)
    twice = await run_tool("edit_file", {**edit, "old_text": " = 1"}, ctx)
    assert twice.is_error
    assert "occurs 2 times in f.py; include more context" in twice.output
    empty = await run_tool("edit_file", {**edit, "old_text": ""}, ctx)
    assert empty.is_error
    assert path.read_text() == "a = 1\nb = 1\nc = 2\n"

    done = await run_tool(
        "edit_file", {"path": "f.py", "old_text": "b = 1", "new_text": "b = 5"}, ctx
    )
    assert done == ToolOutcome("edited f.py: replaced the text at line 2")
    assert path.read_text() == "a = 1\nb = 5\nc = 2\n"


async def test_edit_file_refuses_non_utf8(ctx: ToolContext) -> None:
    (ctx.cwd / "latin1.txt").write_bytes(b"caf\xe9\n")
    outcome = await run_tool(
        "edit_file", {"path": "latin1.txt", "old_text": "caf", "new_text": "x"}, ctx
    )
    assert outcome.is_error
    assert "not UTF-8" in outcome.output
    assert (ctx.cwd / "latin1.txt").read_bytes() == b"caf\xe9\n"


# the toolbox


async def test_toolbox_refuses_tools_it_does_not_offer(ctx: ToolContext) -> None:
    toolbox = Toolbox.builtin(["bash", "read_file"], ctx)
    refused = ToolOutcome("tool rm_rf is not enabled for this pod (enabled: bash, read_file)", True)
    assert await toolbox.run("rm_rf", {}) == refused
    assert (await toolbox.run("write_file", {})).output.startswith("tool write_file is not enabled")


async def test_run_tool_reports_invalid_json(ctx: ToolContext) -> None:
    outcome = await run_tool("bash", {INVALID_JSON_KEY: '{"command": "ls'}, ctx)
    assert outcome.is_error
    assert outcome.output.endswith('JSON object, or nested deeper than 100 levels: {"command": "ls')


async def test_run_tool_reports_bad_arguments_on_one_line(ctx: ToolContext) -> None:
    outcome = await run_tool("bash", {"timeout_s": 0, "extra": 1}, ctx)
    assert outcome.is_error
    assert "\n" not in outcome.output
    assert outcome.output.startswith("invalid arguments for bash: ")
    for part in ("command: Field required", "timeout_s: Input should be greater than 0", "extra:"):
        assert part in outcome.output


class _Broken(Tool):
    name = "broken"
    description = "Always fails unexpectedly."
    args_model = NoArgs

    async def run(self, args: ToolArgs, ctx: ToolContext) -> ToolOutcome:
        raise KeyError("boom")


async def test_run_tool_turns_unexpected_exceptions_into_errors(ctx: ToolContext) -> None:
    outcome = await Toolbox(ctx, [_Broken()]).run("broken", {})
    assert outcome == ToolOutcome("tool broken failed: KeyError: 'boom'", True)


async def test_a_toolbox_offers_what_is_added_until_it_closes(ctx: ToolContext) -> None:
    toolbox = Toolbox.builtin(["bash"], ctx)
    toolbox.add(_Broken())
    assert [spec.name for spec in toolbox.specs()] == ["bash", "broken"]
    await toolbox.aclose()
    assert toolbox.specs() == []
    refused = ToolOutcome("tool bash is not enabled for this pod (enabled: none)", True)
    assert await toolbox.run("bash", {"command": "true"}) == refused


def test_every_manifest_tool_name_is_built_in() -> None:
    assert set(get_args(ToolName)) == set(BUILTIN_TOOLS)


def test_tool_specs_keep_manifest_order_once_each(ctx: ToolContext) -> None:
    specs = Toolbox.builtin(["edit_file", "spawn_pod", "bash", "bash"], ctx).specs()
    assert [spec.name for spec in specs] == ["edit_file", "spawn_pod", "bash"]
    assert specs[1].parameters["required"] == ["name", "task"]
    bash_schema = specs[2].parameters
    assert bash_schema["required"] == ["command"]
    assert set(bash_schema["properties"]) == {"command", "timeout_s"}


def test_pods_share_a_tool_schema_that_no_pod_can_change(ctx: ToolContext) -> None:
    mine = Toolbox.builtin(["bash"], ctx).specs()[0].parameters
    theirs = Toolbox.builtin(["bash"], replace(ctx, pod="other")).specs()[0].parameters
    assert mine is theirs  # made once, not by pydantic at every spawn
    before = orjson.dumps(theirs)
    with pytest.raises(TypeError):
        mine["properties"]["command"]["type"] = "integer"
    with pytest.raises(TypeError):
        mine["required"].append("timeout_s")
    with pytest.raises(TypeError):
        mine.pop("properties")
    copied = copy.deepcopy(mine)
    copied["properties"]["command"]["type"] = "integer"
    copied["required"].append("timeout_s")
    assert orjson.dumps(theirs) == before
    assert json.loads(json.dumps(theirs)) == json.loads(before)


async def test_bash_spills_output_too_long_to_show(ctx: ToolContext, tmp_path: Path) -> None:
    spilling = replace(ctx, spill_dir=tmp_path / "spill")
    outcome = await bash(spilling, "seq 1 200000")
    note = outcome.output.rsplit("\n", 1)[1]
    assert note.startswith("[output truncated: 1288895 bytes in all, first 65536 shown; ")
    path = Path(note.split("all of it is in ")[1].rstrip("]"))
    assert path.parent == tmp_path / "spill"
    assert path.read_text() == "".join(f"{i}\n" for i in range(1, 200001))
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    read = await run_tool("read_file", {"path": str(path), "offset": 199999}, spilling)
    assert read == ToolOutcome("199999\n200000\n")
