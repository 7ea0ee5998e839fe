"""`spawn_pod {worktree: true}` (docs/protocol.md "Worktrees"): a child gets a work tree
of its own of the parent's repository, branched from the parent's current commit; the
child rule is then "the same repository"."""

import sys
from pathlib import Path

import pytest

from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.gitrepo import branch_tip, git, make_repo
from tests.helpers import connect_pod, daemon_request, is_event, scripted, spawn, until, wait_for

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="bubblewrap is Linux-only"),
    pytest.mark.shared_capd,
]


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
