"""The rlimit fallback: the `sh` shim's `ulimit -v` and `ulimit -p`, run for real. NPROC is
ignored for root, so the limits' effect is checked as `nobody` (via setpriv) when the
suite runs as root."""

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


def test_the_shim_sets_both_limits_then_execs(tmp_path: Path) -> None:
    leaf = rlimit_leaf(256, 64)
    argv = leaf.wrap(["sh", "-c", "ulimit -v; ulimit -p"])
    assert argv[:4] == [SH, "-c", 'ulimit -v 262144 && ulimit -p 64 && exec "$@"', "sh"]
    done = run(argv, tmp_path)
    assert done.stdout.split() == ["262144", "64"]
    assert leaf.outcome() is None  # rlimits leave nothing to read


def test_only_the_limits_set_are_applied(tmp_path: Path) -> None:
    done = run(rlimit_leaf(None, 64).wrap(["sh", "-c", "ulimit -v; ulimit -p"]), tmp_path)
    assert done.stdout.split()[1] == "64"
    assert done.stdout.split()[0] != "262144"


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
