"""capd/worktrees.py on repositories the daemon tests do not make: a SHA-256 one, and a
linked worktree of another (whose objects and refs are in the other's `.git`); and
capd/pod_worktrees.py when a pod takes a branch while another's removal is under way."""

import asyncio
from pathlib import Path

import pytest

from capd import worktrees
from capd.pod_worktrees import PodWorktrees
from capd.registry import PodRegistry
from capd.store import Store
from protocol.errors import ProtocolError
from protocol.manifest import GitWorkspace, Manifest
from tests.gitrepo import branch_tip, git, make_repo


async def _work_and_sync(repo: Path, state: Path) -> tuple[worktrees.Worktree, str]:
    """Make pod p's work tree of `repo`, commit in it as the user would, sync; the
    commit."""
    tree = await worktrees.make(GitWorkspace(repo=str(repo)), "p", state, [state], [])
    work = Path(tree.path)
    (work / "new.txt").write_text("new\n")
    git(work, "add", "new.txt")
    git(work, "commit", "-qm", "new")
    assert await worktrees.sync(tree) is None
    return tree, git(work, "rev-parse", "HEAD")


async def test_a_sha256_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "--object-format=sha256", "-b", "main")
    git(repo, "commit", "-q", "--allow-empty", "-m", "first")
    tree, commit = await _work_and_sync(repo, tmp_path / "state")
    assert len(commit) == 64
    assert branch_tip(repo, "capd/p") == commit
    merge_base, text = await worktrees.diff(tree, stat=True)
    assert merge_base == branch_tip(repo, "main")
    assert text == " new.txt | 1 +\n 1 file changed, 1 insertion(+)\n"


async def test_a_linked_worktree_of_another_repository(tmp_path: Path) -> None:
    main = make_repo(tmp_path / "main")
    git(main, "worktree", "add", "-q", "-b", "linked", str(tmp_path / "linked"))
    tree, commit = await _work_and_sync(tmp_path / "linked" / ".", tmp_path / "state")
    assert tree.repo == str(tmp_path / "linked")
    assert tree.common_dir == str(main / ".git")
    assert tree.base == branch_tip(main, "linked")
    assert branch_tip(main, "capd/p") == commit  # refs are the main repository's
    worktrees.discard(tree)
    await worktrees.delete_branch(tree)
    assert branch_tip(main, "capd/p") is None
    assert not Path(tree.path).parent.exists()


async def test_a_branch_another_pod_took_meanwhile_is_never_deleted(
    tmp_path: Path, store: Store
) -> None:
    """A pod's record goes before its work tree and branch do (delete, a failed spawn):
    a pod spawned in between on the same branch keeps it."""
    repo = make_repo(tmp_path / "repo")
    registry = PodRegistry(store, tmp_path)
    state = tmp_path / "state"
    pods = PodWorktrees(registry, state, [state], asyncio.ensure_future)

    async def spawned(name: str) -> worktrees.Worktree:
        workspace = {"git": {"repo": str(repo), "branch": "shared"}}
        manifest = Manifest.model_validate(
            {"name": name, "model": {"provider": "scripted"}, "workspace": workspace}
        )
        tree = await pods.make(manifest)
        assert tree is not None
        registry.add(name, manifest.model_dump_json(), None, worktree=tree.to_json())
        return tree

    first = await spawned("a")
    assert first.created_branch
    registry.delete("a")  # a failed spawn's, or a delete's, first step
    second = await spawned("b")
    assert not second.created_branch  # reused as it is
    await pods.undo(first)
    await pods.remove(first, "a", delete_branch=True)
    assert branch_tip(repo, "shared") == branch_tip(repo, "main")
    assert Path(second.path).is_dir()
    registry.delete("b")
    await pods.remove(second, "b", delete_branch=True)
    assert branch_tip(repo, "shared") is None


async def test_a_repository_with_a_newline_in_its_path_is_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "two\nlines")
    state = tmp_path / "state"
    with pytest.raises(ProtocolError) as refused:
        await worktrees.make(GitWorkspace(repo=str(repo)), "p", state, [state], [])
    assert refused.value.code == "invalid_request"
    assert "has a newline in its path" in refused.value.message
    assert branch_tip(repo, "capd/p") is None


def test_the_registry_indexes_the_pods_with_a_work_tree(tmp_path: Path, store: Store) -> None:
    """Every spawn checks the pods with a work tree: the registry keeps them apart rather
    than walk every pod, through changes, deletes and a reload from the store."""
    registry = PodRegistry(store, tmp_path)
    registry.add("plain", "{}", None)
    registry.add("a", "{}", None, worktree='{"a": 1}')
    registry.add("b", "{}", None, worktree='{"b": 1}')
    registry.set_stopped("a", True)
    assert [(r.name, r.stopped) for r in registry.with_worktree()] == [("a", True), ("b", False)]
    registry.delete("a")
    assert [r.name for r in registry.with_worktree()] == ["b"]
    assert [r.name for r in PodRegistry(store, tmp_path).with_worktree()] == ["b"]
