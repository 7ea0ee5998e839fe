"""capd/gitenv.py: capd's own git never holds more output than it asked for."""

from pathlib import Path

import pytest

from capd import gitenv


async def test_a_longer_output_is_cut_at_its_limit_and_the_git_stopped(tmp_path: Path) -> None:
    endless = ["-c", "alias.endless=!yes", "endless"]  # `yes` never stops writing
    out = await gitenv.run(endless, cwd=tmp_path, env=gitenv.NO_CONFIG, limit=100_000)
    assert len(out) == 100_001
    assert out.startswith(b"y\ny\n")
    short = await gitenv.run(["version"], cwd=tmp_path, env=gitenv.NO_CONFIG, limit=100_000)
    assert short.startswith(b"git version")
    with pytest.raises(gitenv.GitFailed, match="is not a git command"):
        await gitenv.run(["nothing"], cwd=tmp_path, env=gitenv.NO_CONFIG, limit=100_000)
