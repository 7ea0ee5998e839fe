"""`capd --log-file PATH`: the log goes to a 0600 file, which logrotate may move away."""

import signal
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import CapdProcess
from tests.helpers import daemon_request


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_log_goes_to_a_private_file_reopened_after_a_move(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "capd.log"
    log.parent.mkdir()
    log.write_text("an older capd's\n")
    log.chmod(0o644)  # as an older capd, or logrotate's `create 0644`, left it
    capd_dirs.extra_args = ["--log-file", str(log)]
    capd_dirs.start()
    assert "listening on" in log.read_text()
    assert log.read_text().startswith("an older capd's\n")
    assert _mode(log) == 0o600

    log.rename(log.with_suffix(".log.1"))  # as logrotate does, without copytruncate
    await daemon_request(capd_dirs, {"method": "info"})
    assert capd_dirs.signal(signal.SIGTERM) == 0
    assert "capd stopped" in log.read_text()
    assert _mode(log) == 0o600
    assert capd_dirs.output() == "", "nothing on stderr or stdout"


def _capd(runtime: Path, state: Path, log: Path) -> subprocess.CompletedProcess[str]:
    command = ["--runtime-dir", str(runtime), "--state-dir", str(state), "--log-file", str(log)]
    return subprocess.run(
        [sys.executable, "-m", "capd", *command], capture_output=True, text=True, timeout=30
    )


def test_a_log_file_in_a_missing_directory_is_one_line_and_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "capd.log"
    done = _capd(tmp_path / "run", tmp_path / "state", missing)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"capd: --log-file {missing}: {missing.parent} is not a directory\n"
    assert not (tmp_path / "state").exists(), "nothing started"


def test_a_log_file_that_is_a_symlink_is_one_line_and_exit_1(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    target.chmod(0o644)
    link = tmp_path / "capd.log"
    link.symlink_to(target)
    done = _capd(tmp_path / "run", tmp_path / "state", link)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"capd: --log-file {link}: is a symbolic link; give the log file's own path\n"
    )
    assert (target.read_text(), _mode(target)) == ("", 0o644)
