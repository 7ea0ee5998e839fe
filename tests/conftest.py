"""Fixtures: a real capd subprocess on temporary runtime and state directories."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0


@dataclass
class CapdProcess:
    runtime_dir: Path
    state_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    listening: socket.socket | None = None
    """A bound, listening daemon socket to hand over as systemd's socket activation does."""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "capd.sock"

    def pod_socket(self, name: str) -> Path:
        return self.runtime_dir / "pods" / f"{name}.sock"

    def start(self) -> None:
        env = {**os.environ, **self.env}
        command = [
            sys.executable,
            "-m",
            "capd",
            "--runtime-dir",
            str(self.runtime_dir),
            "--state-dir",
            str(self.state_dir),
            *self.extra_args,
        ]
        stdin = None
        if self.listening is not None:
            # As systemd does: the socket as fd 3, LISTEN_PID naming the daemon's own pid
            # (the shell's, which exec keeps).
            launch = 'exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"'
            command = ["sh", "-c", launch, *command]
            stdin = self.listening.fileno()
        self.proc = subprocess.Popen(
            command, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise RuntimeError(f"capd exited with {self.proc.returncode}:\n{out}")
            if _answers_as(self.socket, self.proc.pid):
                return
            time.sleep(0.01)
        raise TimeoutError("capd did not listen within the start timeout")

    def signal(self, sig: int) -> int:
        """Send `sig` and wait for the exit; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)

    def output(self) -> str:
        assert self.proc is not None
        assert self.proc.stdout is not None
        return self.proc.stdout.read().decode()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            code = self.signal(signal.SIGTERM)
            assert code == 0, f"capd exited {code} on SIGTERM:\n{self.output()}"


def _answers_as(path: Path, pid: int) -> bool:
    """Whether the capd with `pid` answers on `path`. Accepting a connection is not enough:
    a tool process forked by a killed capd can hold its old listening socket for a moment."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(path))
            s.sendall(b'{"method":"info","id":1}\n')
            reader = s.makefile("rb")
            reader.readline()
            info = json.loads(reader.readline())
        except (OSError, ValueError):
            return False
        return info.get("result", {}).get("pid") == pid


@pytest.fixture
def capd_dirs(tmp_path: Path) -> Iterator[CapdProcess]:
    """A capd not yet started, so a test can set args or env first."""
    # Unix socket paths are limited to 108 bytes: keep the runtime dir short.
    runtime = Path(f"/tmp/capd-test-{os.getpid()}-{time.monotonic_ns() % 10**9}")
    proc = CapdProcess(runtime_dir=runtime, state_dir=tmp_path / "state")
    yield proc
    proc.stop()
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def capd(capd_dirs: CapdProcess) -> CapdProcess:
    """A running capd; stopped with SIGTERM (and checked to exit 0) after the test."""
    capd_dirs.start()
    return capd_dirs
