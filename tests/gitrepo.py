"""A real git repository for the worktree tests, and a scripted pod that runs bash in
its work tree."""

import os
import subprocess
from pathlib import Path
from typing import Any

from tests.helpers import scripted

IDENTITY = {
    "GIT_AUTHOR_NAME": "tester",
    "GIT_AUTHOR_EMAIL": "tester@example.invalid",
    "GIT_COMMITTER_NAME": "tester",
    "GIT_COMMITTER_EMAIL": "tester@example.invalid",
}


def git(repo: Path, *args: str, check: bool = True) -> str:
    """Run git in `repo` as the user would; its stdout, stripped."""
    done = subprocess.run(
        ["git", *args],
        cwd=repo,
        env={**os.environ, **IDENTITY},
        capture_output=True,
        text=True,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


def make_repo(path: Path) -> Path:
    """A repository at `path` on `main` with one commit (`README`)."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    (path / "README").write_text("hello\n")
    git(path, "add", "README")
    git(path, "commit", "-qm", "first")
    return path


def branch_tip(repo: Path, branch: str) -> str | None:
    """The commit `branch` of `repo` is at, or None when it does not exist."""
    out = git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False)
    return out or None


def bash_pod(*commands: str) -> dict[str, Any]:
    """A scripted model that runs each command with bash, one step each, then says done."""
    steps = [
        {"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}
        for command in commands
    ]
    return scripted(*steps, {"text": "done"})
