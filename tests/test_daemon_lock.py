"""A capd started while the previous one on the same directories is still shutting down
waits for it; one started beside a capd that is not shutting down fails at once."""

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import CapdProcess, _answers_as
from tests.helpers import connect_pod, daemon_request, scripted, spawn, until

STUBBORN = "trap '' TERM; touch started; sleep 30"
"""A tool that ignores SIGTERM: shutdown kills it only after its grace (KILL_GRACE_S)."""
GO_TIMEOUT_S = 30.0


def _warm_capd(capd: CapdProcess, *args: str) -> subprocess.Popen[str]:
    """A capd process with its imports done, that runs `main()` once a line arrives on its
    stdin: what it does from then on is timed, not Python's start-up."""
    code = (
        "import sys; from capd.daemon import main; print('warm', flush=True); "
        "sys.stdin.readline(); main(sys.argv[1:])"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "--runtime-dir",
            str(capd.runtime_dir),
            "--state-dir",
            str(capd.state_dir),
            *args,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "warm\n"
    return proc


def _go(proc: subprocess.Popen[str]) -> float:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return time.monotonic()


async def test_a_capd_waits_for_the_one_shutting_down(capd: CapdProcess, tmp_path: Path) -> None:
    stubborn = {"tool_calls": [{"name": "bash", "arguments": {"command": STUBBORN}}]}
    # Unconfined, so the command itself ignores SIGTERM (a sandbox's bwrap would not).
    off = {"mode": "off"}
    await spawn(capd, "w1", scripted(stubborn), cwd=str(tmp_path), tools=["bash"], sandbox=off)
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "go"})
    await until((tmp_path / "started").exists)
    successor = _warm_capd(capd)
    impatient = _warm_capd(capd, "--lock-wait-s", "0")
    assert capd.proc is not None
    old = capd.proc

    await daemon_request(capd, {"method": "shutdown"})
    lock = capd.state_dir / "capd.lock"
    assert lock.read_text() == f"{old.pid} stopping", "marked before the ack"
    _go(successor)
    _go(impatient)
    await until(
        lambda: successor.poll() is not None or _answers_as(capd.socket, successor.pid),
        timeout=GO_TIMEOUT_S,
    )
    assert successor.poll() is None, successor.communicate()[0]

    assert old.wait(timeout=GO_TIMEOUT_S) == 0
    output, _ = impatient.communicate(timeout=GO_TIMEOUT_S)
    assert impatient.returncode == 1
    assert output.splitlines()[-1] == (
        f"capd: {capd.state_dir} is in use by capd (pid {old.pid}), which is still shutting "
        "down; start this one once it has exited, or wait longer with --lock-wait-s"
    )
    info = await daemon_request(capd, {"method": "info"})
    assert info["pid"] == successor.pid
    (pod,) = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert pod["name"] == "w1"
    assert lock.read_text() == str(successor.pid)
    capd.proc = successor  # the fixture stops it and checks its exit
    log = await _output_after_stop(capd)
    assert log.count(f"capd pid {old.pid} is shutting down; waiting up to 35 s") == 1, log


async def _output_after_stop(capd: CapdProcess) -> str:
    capd.stop()
    assert capd.proc is not None
    assert capd.proc.stdout is not None
    return capd.proc.stdout.read()


def test_a_capd_beside_a_live_one_fails_at_once(capd: CapdProcess, tmp_path: Path) -> None:
    """Its one line goes to stderr even with --log-file, for whoever started it."""
    second = _warm_capd(capd, "--log-file", str(tmp_path / "second.log"))
    started = _go(second)
    output, _ = second.communicate(timeout=GO_TIMEOUT_S)
    took = time.monotonic() - started
    assert second.returncode == 1
    assert output == (
        f"capd: {capd.state_dir} is in use by capd (pid {capd.proc.pid}); stop it first "
        "or give this one other --runtime-dir/--state-dir\n"
    )
    assert took < 5, f"waited {took:.1f} s"
    assert (capd.state_dir / "capd.lock").read_text() == str(capd.proc.pid)
