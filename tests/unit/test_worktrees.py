"""capd/worktrees.py on repositories the daemon tests do not make: a SHA-256 one, and a
linked worktree of another (whose objects and refs are in the other's `.git`)."""

from pathlib import Path

from capd import worktrees
from protocol.manifest import GitWorkspace
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
    await worktrees.remove(tree, delete_branch=True)
    assert branch_tip(main, "capd/p") is None
    assert not Path(tree.path).parent.exists()
