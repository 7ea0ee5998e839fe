"""`workspace.git` through a real capd (docs/protocol.md "Worktrees"): pods work in work
trees of their own of one repository, their commits reach its branches after each turn,
`diff` shows their work, `delete` removes the work tree (and the branch when asked), and
a spawn that fails leaves nothing behind; `spawn_pod {worktree: true}` gives a child one
of its parent's repository. In its sandbox git works, and nothing that would run code
outside it can be written. One module, so that they share one capd."""

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.gitrepo import bash_pod, branch_tip, git, make_repo
from tests.helpers import (
    connect_pod,
    daemon_request,
    is_event,
    run_turn,
    scripted,
    sigkill,
    spawn,
    until,
    wait_for,
)

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="bubblewrap is Linux-only"),
    pytest.mark.shared_capd,
]

COMMIT = "echo {0} > {0}.txt && git add {0}.txt && git commit -qm 'from {0}' && git rev-parse HEAD"


def _capctl(capd: CapdProcess, *args: str) -> str:
    """Run capctl (its stdout is no terminal), expect exit 0; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "capctl", "--runtime-dir", str(capd.runtime_dir), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def _commit_in(capd: CapdProcess, name: str) -> str:
    """Run a turn in which pod `name` commits `<name>.txt`; the commit."""
    async with await connect_pod(capd, name) as pod:
        end, seen = await run_turn(pod, "commit")
    assert end["result"] == "finished", end
    outputs = [event["output"] for event in seen if event["event"] == "tool_result"]
    [commit] = [output.strip() for output in outputs]
    assert len(commit) == 40, outputs
    return commit


async def test_three_pods_commit_on_their_own_branches_of_one_repository(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    first = branch_tip(repo, "main")
    names = ["wa", "wb", "wc"]
    for name in names:
        await spawn(
            capd,
            name,
            bash_pod(COMMIT.format(name)),
            tools=["bash"],
            workspace={"git": {"repo": str(repo / ".")}},
        )
    commits = {name: await _commit_in(capd, name) for name in names}
    # Each turn's end brings its branch into the repository (in the background).
    await until(lambda: all(branch_tip(repo, f"capd/{n}") == commits[n] for n in names))
    assert len(set(commits.values())) == 3
    for name in names:
        assert git(repo, "show", "--format=%s", "-s", f"capd/{name}") == f"from {name}"
        assert git(repo, "ls-tree", "--name-only", f"capd/{name}").split() == [
            "README",
            f"{name}.txt",
        ]
    # The user's checkout is untouched: same branch, same commit, nothing new in it.
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert branch_tip(repo, "main") == first
    assert git(repo, "status", "--porcelain") == ""
    async with await connect_pod(capd, "wa") as pod:
        status = await pod.request({"method": "status"})
    work = capd.state_dir.resolve() / "worktrees" / "wa" / "work"
    assert status["cwd"] == str(work)
    assert status["workspace"] == {
        "repo": str(repo),
        "branch": "capd/wa",
        "base": first,
        "path": str(work),
        "base_commit": first,
        "sync_error": None,
    }
    assert (work / ".git").read_text() == f"gitdir: {work.parent / 'git'}\n"
    gitdir = work.parent / "git"
    assert status["sandbox"]["writable"] == [
        str(path) for path in (work, gitdir, gitdir / "objects", gitdir / "objects" / "info")
    ]


async def test_diff_shows_committed_changed_and_untracked_work_and_touches_nothing(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    await spawn(
        capd,
        "wd",
        bash_pod(COMMIT.format("wd") + " && echo more >> README && echo new > untracked.txt"),
        tools=["bash"],
        workspace={"git": {"repo": str(repo), "base": "main"}},
    )
    await _commit_in(capd, "wd")
    work = capd.state_dir.resolve() / "worktrees" / "wd" / "work"
    before = git(work, "status", "--porcelain")
    result = await daemon_request(capd, {"method": "diff", "name": "wd"})
    assert result["repo"] == str(repo)
    assert result["branch"] == "capd/wd"
    assert result["base"] == "main"
    assert result["merge_base"] == branch_tip(repo, "main")
    text = result["text"]
    for shown in ("+++ b/wd.txt", "+++ b/README", "+more", "+++ b/untracked.txt", "+new"):
        assert shown in text, text
    assert git(work, "status", "--porcelain") == before == "M README\n?? untracked.txt".strip()
    stat = _capctl(capd, "diff", "wd", "--stat")
    assert stat.splitlines()[-1] == " 3 files changed, 3 insertions(+)", stat
    assert _capctl(capd, "diff", "wd") == text
    main = result["merge_base"][:8]
    assert f"workspace: branch capd/wd of {repo} from main ({main})\n" in _capctl(
        capd, "status", "wd"
    )
    # diff syncs first: the branch is in the repository now whatever the background did.
    assert git(repo, "ls-tree", "--name-only", "capd/wd").split() == ["README", "wd.txt"]
    (tmp_path / "plain").mkdir()
    await spawn(capd, "plain", bash_pod(), tools=["bash"], cwd=str(tmp_path / "plain"))
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, {"method": "diff", "name": "plain"})
    assert refused.value.code == "invalid_request"
    assert "no workspace.git" in refused.value.message
    with pytest.raises(ProtocolError) as unknown:
        await daemon_request(capd, {"method": "diff", "name": "nobody"})
    assert unknown.value.code == "not_found"


async def test_diff_shows_the_work_whatever_the_pod_made_of_its_index(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    steps: list[dict[str, object]] = []
    for command in (
        "echo new > new.txt && printf junk > ../git/index",
        "rm ../git/index && mkfifo ../git/index",  # opening it would block capd
        "rm ../git/index && truncate -s 1G ../git/index",  # reading it would flood capd
    ):
        steps += [{"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}]
        steps += [{"text": "done"}]
    workspace = {"git": {"repo": str(repo)}}
    await spawn(capd, "wi", scripted(*steps), tools=["bash"], workspace=workspace)
    async with await connect_pod(capd, "wi") as pod:
        for turn in range(3):
            end, _ = await run_turn(pod, "go")
            assert end["result"] == "finished", end
            async with asyncio.timeout(20):
                result = await daemon_request(capd, {"method": "diff", "name": "wi"})
            assert "+++ b/new.txt" in result["text"], (turn, result["text"])
            assert "[capd:" not in result["text"], (turn, result["text"])


async def test_delete_keeps_the_branch_and_delete_branch_removes_it(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    for name in ("keep", "drop"):
        await spawn(
            capd,
            name,
            bash_pod(COMMIT.format(name)),
            tools=["bash"],
            workspace={"git": {"repo": str(repo)}},
        )
    commits = {name: await _commit_in(capd, name) for name in ("keep", "drop")}
    root = capd.state_dir.resolve() / "worktrees"
    await daemon_request(capd, {"method": "delete", "name": "keep"})
    assert not (root / "keep").exists()
    assert branch_tip(repo, "capd/keep") == commits["keep"]  # synced before it went
    git(repo, "checkout", "-q", "capd/drop")
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, {"method": "delete", "name": "drop", "delete_branch": True})
    assert refused.value.code == "invalid_request"
    assert "branch capd/drop is checked out in" in refused.value.message
    assert (root / "drop" / "work").is_dir()  # refused before anything was deleted
    git(repo, "checkout", "-q", "main")
    assert _capctl(capd, "rm", "drop", "--delete-branch") == "removed drop and its branch\n"
    assert not (root / "drop").exists()
    assert branch_tip(repo, "capd/drop") is None
    assert git(repo, "branch", "--format=%(refname:short)").split() == ["capd/keep", "main"]
    (tmp_path / "plain").mkdir()
    await spawn(capd, "plain", bash_pod(), cwd=str(tmp_path / "plain"))
    with pytest.raises(ProtocolError) as refused:  # capctl would say "and its branch"
        await daemon_request(capd, {"method": "delete", "name": "plain", "delete_branch": True})
    assert refused.value.code == "invalid_request"
    assert "pod plain has no workspace.git work tree" in refused.value.message
    await daemon_request(capd, {"method": "delete", "name": "plain"})


async def test_a_spawn_that_fails_late_leaves_no_work_tree_and_no_new_branch(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    git(repo, "branch", "feature")
    (repo / "next").write_text("x\n")
    git(repo, "add", "next")
    git(repo, "commit", "-qm", "second")
    feature = branch_tip(repo, "feature")
    root = capd.state_dir.resolve() / "worktrees"
    for name, branch, obstacle in (
        ("late1", None, capd.pod_socket("late1")),
        ("late2", "feature", capd.pod_socket("late2")),
    ):
        # A file where the pod's socket goes: the pod cannot listen, after its work tree
        # was made.
        obstacle.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        obstacle.write_text("in the way")
        with pytest.raises(ProtocolError) as failed:
            await spawn(
                capd,
                name,
                bash_pod(),
                tools=["bash"],
                workspace={"git": {"repo": str(repo), "branch": branch}},
            )
        obstacle.unlink()
        assert failed.value.code == "internal", failed.value.message
        assert not (root / name).exists()
    assert branch_tip(repo, "capd/late1") is None
    assert branch_tip(repo, "feature") == feature  # reused, so left as it was
    assert git(repo, "branch", "--format=%(refname:short)").split() == ["feature", "main"]
    listed = await daemon_request(capd, {"method": "list"})
    assert [pod["name"] for pod in listed["pods"]] == []


async def test_a_second_spawn_of_a_name_leaves_the_first_ones_work_tree_alone(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    gate, held, release = tmp_path / "gate", tmp_path / "held", tmp_path / "release"
    gate.touch()
    os.mkfifo(release)
    hook = repo / ".git" / "hooks" / "reference-transaction"  # holds the first spawn once
    hook.write_text(
        f'#!/bin/sh\n[ "$1" = committed ] && [ -e {gate} ] || exit 0\n'
        f"rm {gate} && touch {held} && read _ < {release}\n"
    )
    hook.chmod(0o755)

    def twin(branch: str) -> "asyncio.Task[Path]":
        workspace = {"git": {"repo": str(repo), "branch": branch}}
        return asyncio.create_task(spawn(capd, "twin", bash_pod(), workspace=workspace))

    first = twin("b0")
    await until(held.exists)  # making its work tree
    second = twin("b1")
    await daemon_request(capd, {"method": "list"})  # the second spawn is waiting meanwhile
    with open(release, "w") as fifo:
        fifo.write("go\n")
    await first
    with pytest.raises(ProtocolError) as refused:
        await second
    assert refused.value.code == "already_exists"
    assert refused.value.message == "a pod named twin already exists"
    work = capd.state_dir.resolve() / "worktrees" / "twin" / "work"
    assert (work / "README").read_text() == "hello\n"
    assert git(repo, "branch", "--format=%(refname:short)").split() == ["b0", "main"]


async def test_a_repository_a_confined_pod_can_write_is_refused_either_way(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """Its hooks and config would run in capd's own git (branch, sync) outside the
    sandbox: a reference-transaction hook planted by the writer runs at the branch."""
    repo = make_repo(tmp_path / "repo")
    marker = tmp_path / "PWNED"
    hook = repo / ".git" / "hooks" / "reference-transaction"
    plant = f"printf '#!/bin/sh\\ntouch {marker}\\n' > {hook} && chmod +x {hook} && echo planted"
    await spawn(capd, "writer", bash_pod(plant), tools=["bash"], cwd=str(tmp_path))
    async with await connect_pod(capd, "writer") as pod:
        end, seen = await run_turn(pod, "plant")
    assert [e["output"] for e in seen if e["event"] == "tool_result"] == ["planted"], end
    workspace = {"git": {"repo": str(repo)}}
    with pytest.raises(ProtocolError) as refused:
        await spawn(capd, "victim", bash_pod(), workspace=workspace)
    assert refused.value.code == "invalid_request"
    assert f"lies in {tmp_path}, which pod writer can write" in refused.value.message
    assert not marker.exists()
    assert branch_tip(repo, "capd/victim") is None
    await daemon_request(capd, {"method": "delete", "name": "writer"})
    hook.unlink()
    await spawn(capd, "first", bash_pod(), workspace=workspace)
    with pytest.raises(ProtocolError) as refused:  # the other way round
        await spawn(capd, "second", bash_pod(), cwd=str(tmp_path), sandbox={"writable": []})
    assert refused.value.code == "invalid_request"
    assert f"{repo} lies in {tmp_path}, which pod second can write" in refused.value.message
    (tmp_path / "other").mkdir()
    hooks = repo / ".git" / "hooks"
    with pytest.raises(ProtocolError) as refused:  # inside the git directory
        await spawn(
            capd,
            "third",
            bash_pod(),
            cwd=str(tmp_path / "other"),
            sandbox={"writable": [str(hooks)]},
        )
    assert f"pod third can write {hooks}, in {repo / '.git'}" in refused.value.message
    await spawn(capd, "reader", bash_pod(), cwd=str(tmp_path), sandbox={"mode": "read-only"})
    async with await connect_pod(capd, "reader", subscribe=False) as pod:
        widened = {"name": "reader", "model": bash_pod(), "sandbox": {"mode": "workspace-write"}}
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "reconfigure", "manifest": widened})
    assert refused.value.code == "invalid_request"
    assert f"{repo} lies in {tmp_path}, which pod reader can write" in refused.value.message


async def test_bad_workspaces_are_refused_naming_the_field(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    git(tmp_path / "empty", "init", "-q")
    git(tmp_path, "init", "-q", "--bare", "bare.git")
    inside = make_repo(capd.state_dir / f"repo-{tmp_path.name}")  # in capd's state dir
    await spawn(capd, "holder", bash_pod(), workspace={"git": {"repo": str(repo)}})
    cases = [
        ({"repo": str(repo)}, {"cwd": str(tmp_path)}, "invalid_request", "leave cwd out"),
        ({"repo": str(tmp_path / "nowhere")}, {}, "invalid_request", "workspace.git.repo"),
        ({"repo": str(tmp_path / "bare.git")}, {}, "invalid_request", "bare"),
        ({"repo": str(tmp_path / "empty")}, {}, "invalid_request", "has no commit"),
        ({"repo": str(repo), "base": "nope"}, {}, "invalid_request", "workspace.git.base"),
        ({"repo": str(repo), "branch": "main"}, {}, "already_exists", "checked out at"),
        ({"repo": str(repo), "branch": "capd/holder"}, {}, "already_exists", "pod holder's"),
        ({"repo": str(inside)}, {}, "invalid_request", "capd's own"),
    ]
    for spec, extra, code, said in cases:
        with pytest.raises(ProtocolError) as refused:
            await spawn(capd, "bad", bash_pod(), workspace={"git": spec}, **extra)
        assert (refused.value.code, said in refused.value.message) == (code, True), (
            spec,
            refused.value.message,
        )
        assert "\n" not in refused.value.message
    assert sorted(p.name for p in (capd.state_dir / "worktrees").iterdir()) == ["holder"]
    assert git(repo, "branch", "--format=%(refname:short)").split() == ["capd/holder", "main"]
    shutil.rmtree(inside)


async def test_a_branch_the_user_moved_or_checked_out_is_never_forced(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    turns = [COMMIT.format(n) for n in ("one", "two", "three")]
    steps = []
    for command in turns:
        steps += [{"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}]
        steps += [{"text": "done"}]
    await spawn(
        capd, "ws", scripted(*steps), tools=["bash"], workspace={"git": {"repo": str(repo)}}
    )

    async def workspace() -> dict[str, object]:
        async with await connect_pod(capd, "ws") as pod:
            return (await pod.request({"method": "status"}))["workspace"]

    one = await _commit_in(capd, "ws")
    await until(lambda: branch_tip(repo, "capd/ws") == one)
    git(repo, "checkout", "-q", "capd/ws")  # the user works on the pod's branch
    two = await _commit_in(capd, "ws")
    await daemon_request(capd, {"method": "diff", "name": "ws"})  # syncs, and waits for it
    error = (await workspace())["sync_error"]
    assert isinstance(error, str)
    assert "branch capd/ws of" in error
    assert "checked out" in error
    assert branch_tip(repo, "capd/ws") == one
    (repo / "user.txt").write_text("mine\n")
    git(repo, "add", "user.txt")
    git(repo, "commit", "-qm", "the user's")
    mine = branch_tip(repo, "capd/ws")
    git(repo, "checkout", "-q", "main")
    three = await _commit_in(capd, "ws")
    await daemon_request(capd, {"method": "diff", "name": "ws"})
    error = (await workspace())["sync_error"]
    assert isinstance(error, str)
    assert "non-fast-forward" in error
    assert f"; not synced: {error}" in _capctl(capd, "status", "ws")
    assert branch_tip(repo, "capd/ws") == mine  # the user's commit is kept
    git(repo, "branch", "-f", "capd/ws", two)  # the user gives the branch back
    await daemon_request(capd, {"method": "diff", "name": "ws"})
    assert (await workspace())["sync_error"] is None
    assert branch_tip(repo, "capd/ws") == three


async def test_capds_git_ignores_a_fake_submodule_that_runs_code_at_git_status(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    marker = tmp_path / "PWNED"
    work = capd.state_dir.resolve() / "worktrees" / "trap" / "work"
    trap = (
        "mkdir sub && git init -q --bare .stuff/g && git --git-dir=.stuff/g config core.bare false"
        f" && git --git-dir=.stuff/g config core.fsmonitor 'touch {marker}'"
        f" && echo 'gitdir: {work}/.stuff/g' > sub/.git"
        " && git config -f .gitmodules submodule.sub.path sub"
        " && git config -f .gitmodules submodule.sub.url ./sub"
        " && git update-index --add --cacheinfo 160000,$(git rev-parse HEAD),sub && echo set"
    )
    model = scripted(
        {"tool_calls": [{"name": "bash", "arguments": {"command": trap}}]},
        {"text": "set"},
        {"text": "a second turn, which starts with a checkpoint of the files"},
    )
    await spawn(capd, "trap", model, tools=["bash"], workspace={"git": {"repo": str(repo)}})
    async with await connect_pod(capd, "trap") as pod:
        end, seen = await run_turn(pod, "set the trap")
        assert end["result"] == "finished", end
        assert [e["output"] for e in seen if e["event"] == "tool_result"] == ["set"]
        end, _ = await run_turn(pod, "again")
        assert end["result"] == "finished", end
    result = await daemon_request(capd, {"method": "diff", "name": "trap"})
    assert "+++ b/.gitmodules" in result["text"]
    assert not marker.exists()  # not by the sync, the checkpoint nor diff
    # The trap is real: a plain `git status` there runs the pod's code.
    git(work, "status", "--short")
    assert marker.exists()
    marker.unlink()
    await daemon_request(capd, {"method": "delete", "name": "trap", "delete_branch": True})
    assert not marker.exists()


async def test_rewinding_files_in_a_work_tree_keeps_git_and_the_repositorys_excludes(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    with (repo / ".git" / "info" / "exclude").open("a") as exclude:
        exclude.write("secret.txt\n")
    steps: list[dict[str, object]] = []
    for command in (
        "echo v1 > f.txt && echo s1 > secret.txt",
        "echo v2 > f.txt && echo s2 > secret.txt && git add f.txt && git commit -qm v2",
    ):
        steps += [{"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}]
        steps += [{"text": "done"}]
    await spawn(
        capd, "wr", scripted(*steps), tools=["bash"], workspace={"git": {"repo": str(repo)}}
    )
    work = capd.state_dir.resolve() / "worktrees" / "wr" / "work"
    dot_git = (work / ".git").read_text()
    async with await connect_pod(capd, "wr") as pod:
        await run_turn(pod, "one")
        second, _ = await run_turn(pod, "two")
        await pod.request({"method": "rewind", "turn_id": second["turn_id"], "files": True})
    assert (work / "f.txt").read_text() == "v1\n"
    assert (work / "secret.txt").read_text() == "s2\n"  # excluded: never recorded nor restored
    assert (work / ".git").read_text() == dot_git
    # Files only: the branch keeps the commit the rewound turn made.
    assert git(work, "log", "--format=%s", "-1") == "v2"
    assert git(work, "status", "--porcelain") == "M f.txt"


async def test_reconfigure_keeps_the_work_tree_and_refuses_another(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    workspace = {"git": {"repo": str(repo)}}
    await spawn(capd, "wu", bash_pod(), tools=["bash"], workspace=workspace)
    async with await connect_pod(capd, "wu", subscribe=False) as pod:
        before = await pod.request({"method": "status"})
        manifest = {"name": "wu", "model": bash_pod(), "tools": ["bash", "read_file"]}
        result = await pod.request({"method": "reconfigure", "manifest": manifest})
        assert result["changed"] == ["tools"]
        manifest["workspace"] = workspace  # the same, given again
        result = await pod.request({"method": "reconfigure", "manifest": manifest})
        assert result["changed"] == []
        manifest["workspace"] = {"git": {"repo": str(repo), "branch": "other"}}
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "reconfigure", "manifest": manifest})
        after = await pod.request({"method": "status"})
    assert refused.value.code == "invalid_request"
    assert "a pod keeps its workspace settings" in refused.value.message
    assert after["cwd"] == before["cwd"]
    assert after["workspace"] == before["workspace"]
    assert after["sandbox"]["writable"] == before["sandbox"]["writable"]


# A `workspace.git` pod's sandbox: git works in its work tree (merge conflicts and their
# abort, stash and pop), and nothing that would run code outside it can be written: its git
# config, the repository's `.git`, the work tree's `.git` file, the pinned files of its git
# directory; the file tools refuse them too. A restarted capd confines it the same, and
# removes work trees no pod has.


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


# `spawn_pod {worktree: true}`: a child gets a work tree of its own of the parent's
# repository, branched from the parent's current commit; the child rule is then "the
# same repository".


def _call(tool: str, **arguments: object) -> dict[str, object]:
    return {"tool_calls": [{"name": tool, "arguments": arguments}]}


async def test_a_worktree_child_branches_from_its_parents_commit(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    kid_model = {
        "script": [
            _call(
                "bash",
                command="git log --format=%s && echo kid > kid.txt && git add kid.txt"
                " && git commit -qm 'from kid'",
            ),
            {"text": "kid done"},
        ]
    }
    spawn_kid = _call(
        "spawn_pod", name="kid", task="work", worktree=True, tools=["bash"], model=kid_model
    )
    commit = "echo p > p.txt && git add p.txt && git commit -qm 'from boss' && git rev-parse HEAD"
    await spawn(
        capd,
        "boss",
        scripted(_call("bash", command=commit), spawn_kid, {"text": "spawned"}, {"text": "ok"}),
        tools=["bash", "spawn_pod"],
        workspace={"git": {"repo": str(repo)}},
    )
    async with await connect_pod(capd, "boss") as boss:
        await boss.request({"method": "run", "text": "go"})
        received, seen = await wait_for(boss, is_event("pod_event_received"))
    assert received["payload"]["output"] == "kid done"
    committed, spawned = [e["output"] for e in seen if e["event"] == "tool_result"]
    assert "cwd a work tree of its own on branch capd/kid" in spawned, spawned
    boss_commit = committed.strip()
    await until(
        lambda: git(repo, "log", "--format=%s", "capd/kid", check=False).startswith("from kid")
    )
    assert git(repo, "log", "--format=%s", "capd/kid").splitlines() == [
        "from kid",
        "from boss",
        "first",
    ]
    assert git(repo, "rev-parse", "capd/kid~1") == boss_commit
    async with await connect_pod(capd, "kid", subscribe=False) as kid:
        status = await kid.request({"method": "status"})
        history = (await kid.request({"method": "history"}))["events"]
    log = next(e["output"] for e in history if e["event"] == "tool_result")
    assert log.splitlines() == ["from boss", "first"]  # the boss's commit, in its own tree
    work = capd.state_dir.resolve() / "worktrees" / "kid" / "work"
    assert status["cwd"] == str(work)
    assert status["workspace"]["base"] == boss_commit
    assert status["workspace"]["branch"] == "capd/kid"
    assert branch_tip(repo, "capd/boss") == boss_commit  # synced before the child was made


async def test_worktree_children_keep_to_their_parents_repository(
    capd: CapdProcess, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    other = make_repo(tmp_path / "other")
    plain = tmp_path / "plain"
    plain.mkdir()
    await spawn(
        capd,
        "flat",
        scripted(_call("spawn_pod", name="nokid", task="x", worktree=True), {"text": "no"}),
        tools=["spawn_pod"],
        cwd=str(plain),
    )
    async with await connect_pod(capd, "flat") as flat:
        await flat.request({"method": "run", "text": "go"})
        result, _ = await wait_for(flat, is_event("tool_result"))
    assert result["is_error"] is True
    assert "worktree needs your cwd to be a git work tree" in result["output"]
    await spawn(capd, "top", scripted(), workspace={"git": {"repo": str(repo)}})
    parent = str(capd.pod_socket("top"))
    manifest = {"name": "stray", "model": scripted(), "workspace": {"git": {"repo": str(other)}}}
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, {"method": "spawn", "manifest": manifest, "parent": parent})
    assert refused.value.code == "forbidden"
    assert "is neither parent pod top's repository nor inside its cwd" in refused.value.message
    assert branch_tip(other, "capd/stray") is None
    manifest["workspace"] = {"git": {"repo": str(repo)}}
    await daemon_request(capd, {"method": "spawn", "manifest": manifest, "parent": parent})
    assert branch_tip(repo, "capd/stray") == branch_tip(repo, "main")


async def test_a_worktree_child_never_shows_a_repository_its_parent_hides(
    capd: CapdProcess, tmp_path: Path
) -> None:
    secret = make_repo(tmp_path / "top" / "secret")
    sandbox = {"mode": "read-only", "hidden": [str(secret)]}
    await spawn(capd, "hider", scripted(), cwd=str(tmp_path / "top"), sandbox=sandbox)
    manifest = {"name": "peek", "model": scripted(), "workspace": {"git": {"repo": str(secret)}}}
    manifest["sandbox"] = sandbox
    request = {"method": "spawn", "manifest": manifest, "parent": str(capd.pod_socket("hider"))}
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, request)
    assert refused.value.code == "forbidden"
    assert f"lies inside {secret}, which parent pod hider hides" in refused.value.message
    assert branch_tip(secret, "capd/peek") is None


async def test_a_plain_child_in_its_parents_work_tree_reads_its_git_and_keeps_its_pins(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """A child with neither cwd nor workspace.git of a team's work-tree parent works in
    the parent's work tree (docs "Teams"): git reads the parent's git directory there, and
    the pins that keep the parent's git safe hold in the child's sandbox too."""
    repo = make_repo(tmp_path / "repo")
    workspace = {"git": {"repo": str(repo)}}
    socket = await spawn(capd, "wlead", scripted(), tools=["bash"], workspace=workspace)
    async with await connect_pod(capd, "wlead", subscribe=False) as lead:
        cwd = (await lead.request({"method": "status"}))["cwd"]
    look = "git log --format=%s 2>&1; echo gitdir: /tmp > .git 2>&1; echo x > ../git/config 2>&1"
    model = scripted(_call("bash", command=look), {"text": "done"})
    manifest = {"name": "wkid", "model": model, "cwd": cwd, "tools": ["bash"]}
    await daemon_request(capd, {"method": "spawn", "manifest": manifest, "parent": str(socket)})
    async with await connect_pod(capd, "wkid") as kid:
        await kid.request({"method": "run", "text": "look"})
        result, _ = await wait_for(kid, is_event("tool_result"))
    first, *refusals, code = result["output"].splitlines()
    assert (first, code) == ("first", "[exit code 1]")
    assert [line.split(": ")[-1] for line in refusals] == ["Read-only file system"] * 2
    assert git(repo, "log", "--format=%s", "capd/wlead") == "first"

    # The parent's work tree is the child's cwd: deleting the parent is refused first.
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, {"method": "delete", "name": "wlead"})
    assert refused.value.code == "invalid_request"
    assert refused.value.message.startswith("pod wkid works in pod wlead's work tree")
    assert Path(cwd).is_dir()
    await daemon_request(capd, {"method": "delete", "name": "wkid"})
    await daemon_request(capd, {"method": "delete", "name": "wlead"})
    assert not Path(cwd).exists()


@pytest.mark.own_capd
async def test_a_bad_stored_manifest_fails_neither_a_work_tree_spawn_nor_delete(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """Another pod's stored manifest that no longer parses (a pod that cannot start, so it
    writes nothing and works nowhere) fails neither the checks of a spawn with a work tree
    nor those of a delete, which looks for pods working in the tree by their cwd alone."""
    repo = make_repo(tmp_path / "repo")
    await spawn(capd, "owner", scripted(), workspace={"git": {"repo": str(repo)}})
    await spawn(capd, "odd", scripted())
    capd.stop()
    with sqlite3.connect(capd.state_dir / "capd.db") as db:
        (stored,) = db.execute("SELECT manifest FROM pods WHERE name = 'odd'").fetchone()
        bad = json.dumps(json.loads(stored) | {"tools": "bash"})
        db.execute("UPDATE pods SET manifest = ? WHERE name = 'odd'", (bad,))
    await asyncio.to_thread(capd.start)
    await spawn(capd, "later", scripted(), workspace={"git": {"repo": str(repo)}})
    tree = capd.state_dir.resolve() / "worktrees" / "owner"
    assert tree.is_dir()
    await daemon_request(capd, {"method": "delete", "name": "owner"})
    assert not tree.exists()
