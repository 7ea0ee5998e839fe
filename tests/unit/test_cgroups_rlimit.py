"""The rlimit fallback: the `sh` shim's `ulimit -v` and NPROC, run for real under dash and
bash. NPROC is ignored for root, so the limits' effect is checked as `nobody` (via setpriv)
when the suite runs as root."""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from capd.proc.limits import SH, Leaf, Limiter

AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
needs_nobody = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run the shim as nobody (NPROC is ignored for root)",
)


def rlimit_leaf(memory_mb: int | None, pids: int | None) -> Leaf:
    leaf = Limiter("rlimit").pod("w1", memory_mb, pids).leaf("bash")
    assert leaf is not None
    return leaf


def run(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False
    )


SHOW_LIMITS = [
    "/usr/bin/python3",
    "-c",
    "import resource as r; print(r.getrlimit(r.RLIMIT_AS)[0], r.getrlimit(r.RLIMIT_NPROC)[0])",
]
SHELLS = [["dash"], ["bash"], ["bash", "--posix"]]
"""/bin/sh is dash on Debian, bash on Fedora, RHEL and Arch: the shim must work in both."""


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_the_shim_sets_both_limits_then_execs_in_dash_and_bash(
    tmp_path: Path, shell: list[str]
) -> None:
    if shutil.which(shell[0]) is None:
        pytest.skip(f"no {shell[0]} here")
    leaf = rlimit_leaf(256, 64)
    argv = leaf.wrap(SHOW_LIMITS)
    assert argv[0] == SH
    done = run([*shell, *argv[1:]], tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.split() == [str(256 * 1024 * 1024), "64"]
    assert leaf.outcome() is None  # rlimits leave nothing to read


@pytest.mark.parametrize("shell", SHELLS, ids=" ".join)
def test_only_the_limits_set_are_applied(tmp_path: Path, shell: list[str]) -> None:
    if shutil.which(shell[0]) is None:
        pytest.skip(f"no {shell[0]} here")
    done = run([*shell, *rlimit_leaf(None, 64).wrap(SHOW_LIMITS)[1:]], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "64"
    assert done.stdout.split()[0] != str(256 * 1024 * 1024)


@needs_nobody
def test_memory_over_the_address_space_limit_fails_to_allocate(tmp_path: Path) -> None:
    hog = ["/usr/bin/python3", "-c", "bytearray(512 << 20)"]
    done = run([*AS_NOBODY, *rlimit_leaf(256, None).wrap(hog)], tmp_path)
    assert done.returncode == 1
    assert "MemoryError" in done.stderr


@needs_nobody
def test_processes_over_the_nproc_limit_cannot_start(tmp_path: Path) -> None:
    loop = "for i in $(seq 30); do sleep 5 & done"
    argv = [*AS_NOBODY, *rlimit_leaf(None, 8).wrap(["sh", "-c", loop])]
    shell = subprocess.Popen(
        argv, cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    shell.wait(timeout=30)  # dash gives up at the first fork that fails
    os.killpg(shell.pid, signal.SIGKILL)  # the sleeps that did start
    _, stderr = shell.communicate(timeout=30)
    assert "Cannot fork" in stderr
