"""A `workspace.git` pod's sandbox (docs/protocol.md "Worktrees"): git works in its work
tree (merge conflicts and their abort, stash and pop), and nothing that would run code
outside it can be written: its git config, the repository's `.git`, the work tree's
`.git` file, the pinned files of its git directory; the file tools refuse them too. A
restarted capd confines it the same, and removes work trees no pod has."""

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CapdProcess
from tests.gitrepo import branch_tip, git, make_repo
from tests.helpers import connect_pod, run_turn, scripted, sigkill, spawn, until

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="bubblewrap is Linux-only"),
    pytest.mark.shared_capd,
]


def _calls(*calls: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    steps = [{"tool_calls": [{"name": name, "arguments": args}]} for name, args in calls]
    return scripted(*steps, {"text": "done"})


def _bash(command: str) -> tuple[str, dict[str, Any]]:
    return "bash", {"command": command}


async def test_git_works_and_its_pins_hold_inside_the_sandbox(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    config = (repo / ".git" / "config").read_text()
    root = capd.state_dir.resolve() / "worktrees" / "pin"
    gitdir = root / "git"
    refused = " 2>&1; echo rc=$?"
    model = _calls(
        _bash("git config core.fsmonitor 'touch /tmp/pwned'" + refused),
        _bash(f"echo '[core] fsmonitor = x' >> {repo}/.git/config" + refused),
        _bash(f"touch {repo}/.git/hooks/post-checkout" + refused),
        _bash("echo 'gitdir: /tmp/elsewhere' > .git" + refused),
        _bash("mv .git moved" + refused),
        _bash(f"echo /tmp > {gitdir}/commondir" + refused),
        _bash(f"echo /tmp/objects > {gitdir}/objects/info/alternates" + refused),
        _bash(f"touch {gitdir}/hooks/pre-commit" + refused),
        _bash(
            f"mv {gitdir}/objects/info {gitdir}/objects/aside 2>&1;"
            f" mv {gitdir}/objects {gitdir}/aside 2>&1; echo rc=$?"
        ),
        _bash(f"git --git-dir={repo}/.git update-ref refs/heads/evil HEAD" + refused),
        _bash(
            "git checkout -qb other && echo theirs > README && git commit -qam theirs"
            " && git checkout -q capd/pin && echo ours > README && git commit -qam ours"
            " && git merge other; git merge --abort && git status --porcelain && echo aborted"
        ),
        _bash(
            "echo stashed >> README && git stash -q && cat README && git stash pop -q && cat README"
        ),
        _bash(
            "git stash -q && { git rebase other >/dev/null 2>&1 || echo conflicted; }"
            " && git rebase --abort && git stash pop -q && git status --porcelain"
        ),
        ("write_file", {"path": ".git", "content": "gitdir: /tmp/elsewhere\n"}),
        ("write_file", {"path": f"{gitdir}/config", "content": "[core]\n\tfsmonitor = x\n"}),
        ("write_file", {"path": "made.txt", "content": "by the file tool\n"}),
        _bash("git fetch -q origin && git branch -r"),
    )
    await spawn(
        capd, "pin", model, tools=["bash", "write_file"], workspace={"git": {"repo": str(repo)}}
    )
    async with await connect_pod(capd, "pin") as pod:
        end, seen = await run_turn(pod, "try")
    assert end["result"] == "finished", end
    results = [event for event in seen if event["event"] == "tool_result"]
    outputs = [event["output"] for event in results]
    config_set, repo_config, hook, git_file, moved, commondir, alternates, own_hook = outputs[:8]
    moved_aside, update_main, merged, stashed, rebased = outputs[8:13]
    for output in (repo_config, hook, git_file, commondir, alternates, own_hook, update_main):
        assert "Read-only file system" in output, output
    for output in (config_set, moved):  # a mount point cannot be replaced
        assert "Device or resource busy" in output, output
    assert moved_aside.count("Device or resource busy") == 2, moved_aside
    assert "CONFLICT" in merged, merged
    assert merged.endswith("aborted"), merged
    assert stashed.splitlines() == ["ours", "ours", "stashed"]
    assert rebased.splitlines() == ["conflicted", " M README"]
    git_tool, config_tool, made, fetched = results[13:]
    assert fetched["output"].split() == ["origin/capd/pin", "origin/main"], fetched
    for refusal in (git_tool, config_tool):
        assert refusal["is_error"], refusal
        assert "keeps read-only" in refusal["output"], refusal
    assert not made["is_error"], made
    # Outside: the repository, the work tree's .git file and the git directory's config
    # are as capd made them.
    assert (repo / ".git" / "config").read_text() == config
    assert not (repo / ".git" / "hooks" / "post-checkout").exists()
    assert branch_tip(repo, "evil") is None
    assert branch_tip(repo, "main") == git(repo, "rev-parse", "HEAD")
    work = root / "work"
    assert (work / ".git").read_text() == f"gitdir: {gitdir}\n"
    assert (gitdir / "commondir").read_text() == ".\n"
    assert (gitdir / "objects" / "info" / "alternates").read_text() == f"{repo}/.git/objects\n"
    assert "fsmonitor" not in (gitdir / "config").read_text()
    assert list((gitdir / "hooks").iterdir()) == []
    assert (work / "made.txt").read_text() == "by the file tool\n"


@pytest.mark.own_capd
async def test_a_restarted_capd_confines_and_syncs_the_work_tree_as_before(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """... and undoes what a capd killed mid-spawn left: its work tree and new branch."""
    repo = make_repo(tmp_path / "repo")
    commit = "echo {0} > {0}.txt && git add {0}.txt && git commit -qm {0} && git rev-parse HEAD"
    model = _calls(
        _bash(commit.format("before")),
        _bash("git config core.fsmonitor x 2>&1; " + commit.format("after")),
    )
    model["script"].insert(1, {"text": "first turn done"})
    await spawn(capd, "again", model, tools=["bash"], workspace={"git": {"repo": str(repo)}})
    async with await connect_pod(capd, "again") as pod:
        end, _ = await run_turn(pod, "one")
    assert end["result"] == "finished", end
    cut_repo, held = make_repo(tmp_path / "cut"), tmp_path / "held"
    hook = cut_repo / ".git" / "hooks" / "reference-transaction"  # the user's: capd runs it
    hook.write_text(
        f'#!/bin/sh\n[ "$1" = committed ] && [ ! -e {held} ] || exit 0\n'
        f"touch {held}\nexec sleep 30\n"
    )
    hook.chmod(0o755)
    workspace = {"git": {"repo": str(cut_repo)}}
    spawning = asyncio.create_task(spawn(capd, "cut", scripted(), workspace=workspace))
    await until(held.exists)  # its branch is made, its work tree not yet
    await sigkill(capd)
    [lost] = await asyncio.gather(spawning, return_exceptions=True)
    assert isinstance(lost, Exception)
    cut = capd.state_dir.resolve() / "worktrees" / "cut"
    assert cut.is_dir()
    assert branch_tip(cut_repo, "capd/cut") == branch_tip(cut_repo, "main")
    ghost = capd.state_dir / "worktrees" / "ghost" / "work"  # no record of what it was making
    ghost.mkdir(parents=True)
    ghost.chmod(0o500)
    capd.start()
    assert not ghost.parent.exists()
    assert not cut.exists()
    assert git(cut_repo, "branch", "--format=%(refname:short)").split() == ["main"]
    async with await connect_pod(capd, "again") as pod:
        end, seen = await run_turn(pod, "two")
    assert end["result"] == "finished", end
    [output] = [event["output"] for event in seen if event["event"] == "tool_result"]
    refusal, after = output.splitlines()
    assert "Device or resource busy" in refusal
    await until(lambda: branch_tip(repo, "capd/again") == after)
    assert git(repo, "log", "--format=%s", "capd/again").split() == ["after", "before", "first"]


async def test_a_read_only_pod_reads_its_work_trees_history(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    model = _calls(
        _bash("git log --format=%s && git status --porcelain && touch x 2>&1; echo rc=$?")
    )
    await spawn(
        capd,
        "reader",
        model,
        tools=["bash"],
        workspace={"git": {"repo": str(repo)}},
        sandbox={"mode": "read-only"},
    )
    async with await connect_pod(capd, "reader") as pod:
        end, seen = await run_turn(pod, "read")
    assert end["result"] == "finished", end
    [output] = [event["output"] for event in seen if event["event"] == "tool_result"]
    first, refused, rc = output.splitlines()
    assert first == "first", output
    assert "Read-only file system" in refused, output
    assert rc == "rc=1", output
