"""The file tools on huge files: capd's memory stays small and its event loop keeps turning."""

import asyncio
import ctypes
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE

import pytest

from capd.proc.sandbox import Confinement
from capd.tools.base import DEFAULT_OUTPUT_LIMIT, ToolContext, ToolOutcome
from capd.tools.files import EDIT_LIMIT_BYTES, PIECE_CHARS
from protocol.client import Client
from protocol.manifest import SandboxMode
from tests.conftest import CapdProcess
from tests.helpers import connect_pod, is_event, run_tool, scripted, spawn, wait_for

HUGE_BYTES = 128 * 2**20
GROWTH_LIMIT = 32 * 2**20
STALL_LIMIT_S = 1.0
"""The old code stalled every pod 2.8 to 3.5 s; the new one about 20 ms (loose for a busy CI)."""


@pytest.fixture(scope="module")
def huge_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory holding `huge.txt`: 128 MiB without a newline (removed afterwards)."""
    directory = tmp_path_factory.mktemp("huge")
    chunk = b"x" * 2**20
    with (directory / "huge.txt").open("wb") as out:
        for _ in range(HUGE_BYTES // len(chunk)):
            out.write(chunk)
    yield directory
    (directory / "huge.txt").unlink()


def _peak_growth_start(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) and return its RSS now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kib(pid, "VmRSS") * 1024


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


async def _longest_status_wait(client: Client, done: asyncio.Event) -> float:
    """Ask for a pod's status over and over until `done`; the longest an answer took."""
    longest = 0.0
    while not done.is_set():
        asked = time.monotonic()
        await client.request({"method": "status"})
        longest = max(longest, time.monotonic() - asked)
    return longest


def _read(**args: object) -> dict[str, object]:
    return {"tool_calls": [{"name": "read_file", "arguments": {"path": "huge.txt", **args}}]}


async def test_read_file_on_a_huge_line_keeps_capd_small_and_responsive(
    capd: CapdProcess, huge_dir: Path
) -> None:
    """From the start the output limit ends the read; past the end of a file that is one
    128 MiB line, all of it has to be scanned. Neither holds the line in memory, and
    another pod answers at once meanwhile."""
    script = scripted(_read(), _read(offset=2), {"text": "read"})
    await spawn(capd, "reader", script, cwd=str(huge_dir), tools=["read_file"])
    await spawn(capd, "other", scripted())
    assert capd.proc is not None
    async with (
        await connect_pod(capd, "reader") as pod,
        await connect_pod(capd, "other", subscribe=False) as other,
    ):
        baseline = _peak_growth_start(capd.proc.pid)
        done = asyncio.Event()
        watcher = asyncio.create_task(_longest_status_wait(other, done))
        await pod.request({"method": "run", "text": "go"})
        first, _ = await wait_for(pod, is_event("tool_result"))
        second, _ = await wait_for(pod, is_event("tool_result"))
        done.set()
        longest = await watcher
    growth = _status_kib(capd.proc.pid, "VmHWM") * 1024 - baseline
    assert first["output"] == (
        "x" * DEFAULT_OUTPUT_LIMIT + "\n"
        f"[output truncated at {DEFAULT_OUTPUT_LIMIT} bytes, within line 1; read on with offset=2]"
    )
    assert second["output"] == "[offset 2 is past the end of the file, which has 1 lines]"
    assert growth < GROWTH_LIMIT, f"capd grew {growth >> 20} MiB reading a 128 MiB line"
    assert longest < STALL_LIMIT_S, f"another pod waited {longest:.2f} s for its status"


# the same at the tool seam: a line longer than a piece, the edit limit


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return ToolContext(cwd=tmp_path, pod="test", output_limit=2 * PIECE_CHARS)


async def test_read_file_counts_lines_longer_than_a_piece_once(ctx: ToolContext) -> None:
    """Lines that take several pieces, and a \r\n that a piece boundary cuts in two, are
    still one line each."""
    long = "y" * (3 * PIECE_CHARS)
    cut_crlf = "z" * (PIECE_CHARS - 1) + "\r\n"
    (ctx.cwd / "f.txt").write_text(f"{long}\n{cut_crlf}third\r\n", newline="")
    third = await run_tool("read_file", {"path": "f.txt", "offset": 3}, ctx)
    assert third == ToolOutcome("third\r\n")
    past = await run_tool("read_file", {"path": "f.txt", "offset": 5}, ctx)
    assert past == ToolOutcome("[offset 5 is past the end of the file, which has 3 lines]")
    second = await run_tool("read_file", {"path": "f.txt", "offset": 2, "limit": 1}, ctx)
    assert second == ToolOutcome(f"{cut_crlf}[the file goes on; read on with offset=3]")


async def test_edit_file_refuses_files_beyond_its_limit(ctx: ToolContext) -> None:
    big = ctx.cwd / "big.txt"
    big.write_bytes(b"a\n" * (EDIT_LIMIT_BYTES // 2) + b"needle\n")
    outcome = await run_tool(
        "edit_file", {"path": "big.txt", "old_text": "needle", "new_text": "pin"}, ctx
    )
    assert outcome == ToolOutcome(
        "big.txt is larger than 8 MiB, more than edit_file changes; "
        "edit it with bash (sed, or a script) instead",
        True,
    )
    assert big.stat().st_size == EDIT_LIMIT_BYTES + len(b"needle\n")


async def test_edits_of_one_file_at_once_both_land(ctx: ToolContext) -> None:
    """Each edit reads the file, then writes it: two in worker threads at once lost one."""
    lines = [f"line {n}\n" for n in range(700_000)]  # about 7 MiB
    (ctx.cwd / "big.txt").write_text("".join(lines))
    edits = [
        run_tool("edit_file", {"path": "big.txt", "old_text": old, "new_text": "edited\n"}, ctx)
        for old in ("line 10\n", "line 699990\n")
    ]
    outcomes = await asyncio.gather(*edits)
    assert [outcome.is_error for outcome in outcomes] == [False, False]
    assert (ctx.cwd / "big.txt").read_text().count("edited\n") == 2


async def test_a_cancelled_write_has_finished_when_the_call_ends(ctx: ToolContext) -> None:
    """A pause cancels the call; the file must not change behind the paused pod."""
    content = "y" * (64 * 2**20)
    call = asyncio.ensure_future(run_tool("write_file", {"path": "w.txt", "content": content}, ctx))
    await asyncio.sleep(0)  # the call starts; its write is on its way to a thread
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    size = (ctx.cwd / "w.txt").stat().st_size
    assert size == len(content)


# the bounds under a race: a directory swapped with a symlink to the outside

RACE_CALLS = 70
SWAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
print(flush=True)
while True:  # AT_FDCWD, RENAME_EXCHANGE
    if libc.renameat2(-100, a, -100, b, 2) != 0:
        sys.exit(os.strerror(ctypes.get_errno()))
"""
"""Swaps two names over and over with renameat2(RENAME_EXCHANGE); a process of its own,
so that the tools' threads do not wait for it to let go of the GIL."""


@pytest.mark.parametrize("where", ["cwd", "writable", "hidden"])
async def test_file_tools_stay_inside_while_a_directory_is_swapped(
    tmp_path: Path, where: str
) -> None:
    """A process swaps `d` (in the cwd, or in a writable path) over and over with a symlink
    to an outside directory, or to a hidden one beside it, while the tools read, write and
    edit under `d/`. Checking the path and then opening it by name again let
    about a quarter of the reads return the outside file and of the writes land outside."""
    if not hasattr(ctypes.CDLL(None), "renameat2"):
        pytest.skip("no renameat2 in this libc")
    cwd = tmp_path / "cwd"
    root = tmp_path / "shared" if where == "writable" else cwd
    forbidden = cwd / "h" if where == "hidden" else tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    cwd.mkdir(exist_ok=True)
    forbidden.mkdir()
    for directory, text in ((root / "d", "inside\n"), (forbidden, "OUTSIDE\n")):
        (directory / "f.txt").write_text(text)
        (directory / "e.txt").write_text(text)
    (root / "swap").symlink_to(forbidden)
    ctx = {
        "cwd": ToolContext(cwd=cwd, pod="test"),
        "writable": _sandboxed(cwd, writable=[root]),
        "hidden": _sandboxed(cwd, hidden=[forbidden]),
    }[where]
    d = "d" if root == cwd else str(root / "d")
    swapper = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SWAPPER, str(root / "d"), str(root / "swap"), stdout=PIPE
    )
    try:
        assert swapper.stdout is not None
        await swapper.stdout.readline()  # it is swapping
        reads = [
            await run_tool("read_file", {"path": f"{d}/f.txt"}, ctx) for _ in range(RACE_CALLS)
        ]
        for n in range(RACE_CALLS):
            await run_tool("write_file", {"path": f"{d}/w{n}.txt", "content": "x"}, ctx)
            edit = {"path": f"{d}/e.txt", "old_text": "SIDE", "new_text": "side"}
            await run_tool("edit_file", edit, ctx)
        assert swapper.returncode is None, "the swapper failed"
    finally:
        swapper.kill()
        await swapper.wait()
    leaked = sum("OUTSIDE" in outcome.output for outcome in reads)
    landed = sorted(path.name for path in forbidden.iterdir())
    assert (leaked, landed) == (0, ["e.txt", "f.txt"]), (
        f"{leaked} of {RACE_CALLS} reads returned the outside file; "
        f"{len(landed) - 2} writes landed outside"
    )
    assert (forbidden / "e.txt").read_text() == "OUTSIDE\n", "an edit changed the outside file"
    assert any(outcome.output == "inside\n" for outcome in reads), "no read got through"


# the bounds of a sandbox: writable paths, mode read-only, hidden paths


def _sandboxed(
    cwd: Path, mode: SandboxMode = "workspace-write", **paths: list[Path]
) -> ToolContext:
    """A pod's tool context with a sandbox of `mode` and `writable` and `hidden` paths."""
    writable, hidden = (tuple(paths.get(key, ())) for key in ("writable", "hidden"))
    box = Confinement("bwrap", mode, True, cwd, writable=writable, hidden=hidden)
    return ToolContext(cwd=cwd, pod="test", sandbox=None if mode == "off" else box)


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """A cwd, a writable path and a hidden directory beside it, and one outside all."""
    dirs = {name: tmp_path / name for name in ("cwd", "shared", "secret", "outside")}
    for name, directory in dirs.items():
        directory.mkdir()
        (directory / "f.txt").write_text(f"{name}\n")
    return dirs


async def test_file_tools_write_in_writable_paths_by_absolute_path_only(
    tree: dict[str, Path],
) -> None:
    cwd, shared, outside = tree["cwd"], tree["shared"], tree["outside"]
    ctx = _sandboxed(cwd, writable=[shared])
    wrote = await run_tool("write_file", {"path": str(shared / "new/n.txt"), "content": "n"}, ctx)
    assert wrote == ToolOutcome(f"wrote 1 bytes to {shared / 'new/n.txt'}")
    assert (shared / "new/n.txt").read_text() == "n"
    edit = {"path": str(shared / "f.txt"), "old_text": "shared", "new_text": "edited"}
    assert not (await run_tool("edit_file", edit, ctx)).is_error
    assert await run_tool("read_file", {"path": str(shared / "f.txt")}, ctx) == ToolOutcome(
        "edited\n"
    )
    (shared / "out").symlink_to(outside)
    for path in ("../shared/f.txt", str(outside / "f.txt"), str(shared / "out/f.txt")):
        refused = await run_tool("write_file", {"path": path, "content": "x"}, ctx)
        assert refused == ToolOutcome(
            f"path {path} resolves outside the working directory {cwd} and the writable "
            f"paths ({shared})",
            True,
        )
    assert (outside / "f.txt").read_text() == "outside\n"
    unconfined = _sandboxed(cwd, "off", writable=[shared])
    off = await run_tool("write_file", {"path": str(shared / "f.txt"), "content": "x"}, unconfined)
    assert off.is_error, "with mode off the file tools work as without a sandbox"


async def test_file_tools_write_nothing_in_a_read_only_sandbox(tree: dict[str, Path]) -> None:
    cwd, shared = tree["cwd"], tree["shared"]
    ctx = _sandboxed(cwd, "read-only", writable=[shared])
    for tool, args in (
        ("write_file", {"path": "new.txt", "content": "x"}),
        ("edit_file", {"path": "f.txt", "old_text": "cwd", "new_text": "x"}),
        ("write_file", {"path": str(shared / "f.txt"), "content": "x"}),
    ):
        refused = await run_tool(tool, args, ctx)
        assert refused == ToolOutcome(
            f"cannot write {args['path']}: this pod's sandbox.mode is read-only, so nothing "
            "is writable, not even the working directory",
            True,
        )
    assert (cwd / "f.txt").read_text() == "cwd\n"
    assert not (cwd / "new.txt").exists()
    assert (shared / "f.txt").read_text() == "shared\n"
    assert await run_tool("read_file", {"path": "f.txt"}, ctx) == ToolOutcome("cwd\n")


async def test_file_tools_never_open_a_hidden_path_by_any_name(tree: dict[str, Path]) -> None:
    """A hidden directory inside the cwd (or one a bind mount puts there), a symlink to it,
    and a hard link to a hidden file are all refused."""
    cwd, secret = tree["cwd"], tree["secret"]
    inner = cwd / "inner"
    inner.mkdir()
    (inner / "g.txt").write_text("inner\n")
    (cwd / "to-inner").symlink_to("inner")
    (cwd / "hard.txt").hardlink_to(secret / "f.txt")
    ctx = _sandboxed(cwd, hidden=[inner, secret / "f.txt"])
    attempts = [("read_file", {}, path, inner) for path in ("inner/g.txt", "to-inner/g.txt")] + [
        ("write_file", {"content": "x"}, path, inner)
        for path in ("inner/g.txt", "to-inner/new.txt", str(inner / "new/h.txt"))
    ]
    attempts.append(("read_file", {}, "hard.txt", secret / "f.txt"))
    for tool, extra, path, hidden in attempts:
        refused = await run_tool(tool, {"path": path, **extra}, ctx)
        assert refused == ToolOutcome(
            f"{path} leads into {hidden}, which the sandbox hides; the file tools do not open it",
            True,
        ), (tool, path)
    assert sorted(p.name for p in inner.iterdir()) == ["g.txt"]
    assert (inner / "g.txt").read_text() == "inner\n"
    assert await run_tool("read_file", {"path": "f.txt"}, ctx) == ToolOutcome("cwd\n")


async def test_file_tools_never_follow_a_root_swapped_for_a_symlink(tree: dict[str, Path]) -> None:
    """A writable path the pod's bash turned into a symlink (it lies in the cwd, or in a
    directory the pod may write), and a cwd its parent pod swapped for one: the tools
    neither take a path under the symlink's target as inside nor open the root through
    it. They used to write into the target (the review's files_root_symlink.py)."""
    cwd, shared, outside = tree["cwd"], tree["shared"], tree["outside"]
    build, made = cwd / "build", shared / "made"
    ctx = _sandboxed(cwd, writable=[build, made, shared / "gone"])
    roots = ", ".join(map(str, (build, made, shared / "gone")))

    def ctx_outside(path: str) -> str:
        where = f"the working directory {cwd} and the writable paths ({roots})"
        return f"path {path} resolves outside {where}"

    for target in ("../outside", str(outside)):
        build.symlink_to(target)
        made.symlink_to(outside)
        for path in (str(outside / "planted"), str(build / "planted")):
            refused = await run_tool("write_file", {"path": path, "content": "x"}, ctx)
            assert refused == ToolOutcome(ctx_outside(path), True)
        refused = await run_tool("write_file", {"path": str(made / "p"), "content": "x"}, ctx)
        assert refused == ToolOutcome(
            f"cannot open {made / 'p'}: {made} is a symlink now, so the writable path {made} "
            "is not the directory the pod was given; the file tools do not follow it",
            True,
        )
        build.unlink()
        made.unlink()
    gone = str(shared / "gone/x")
    assert await run_tool("write_file", {"path": gone, "content": "x"}, ctx) == ToolOutcome(
        f"cannot open {gone}: the writable path {shared / 'gone'} does not exist", True
    )
    sub = cwd / "sub"
    sub.mkdir()
    child = _sandboxed(sub)
    sub.rename(cwd / "sub.old")
    sub.symlink_to("../outside")
    for tool, args in (("read_file", {}), ("write_file", {"content": "x"})):
        refused = await run_tool(tool, {"path": "f.txt", **args}, child)
        assert refused == ToolOutcome(
            f"cannot open f.txt: {sub} is a symlink now, so the working directory {sub} is "
            "not the directory the pod was given; the file tools do not follow it",
            True,
        )
    assert sorted(p.name for p in outside.iterdir()) == ["f.txt"]
    assert (outside / "f.txt").read_text() == "outside\n"
