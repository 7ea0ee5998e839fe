"""The processes a benchmark measures: a real capd, and the baseline servers."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

from bench.wire import LineClient

START_TIMEOUT_S = 20.0
TMPFS = Path("/dev/shm")
"""Where `tmpfs_dir` makes directories: a tmpfs, as /run and XDG_RUNTIME_DIR are, where a
deployed capd's runtime dir (its sockets) lives (systemd's RuntimeDirectory=). Binding a
socket on this VM's disk costs 0.6-2 ms, on a tmpfs 15-40 us."""


class Server:
    """A subprocess serving a Unix socket; started and stopped as a context manager."""

    def __init__(
        self, command: list[str], socket: Path, workdir: Path, runtime: Path | None = None
    ) -> None:
        self.socket = socket
        self.workdir = workdir
        self.runtime = runtime
        """A runtime dir outside `workdir`, removed with it."""
        self._command = command
        self._log = workdir / "server.log"
        self.start_timeout_s = START_TIMEOUT_S
        """How long `with` waits for it to answer."""
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self._command[:3]} exited:\n{self._log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.socket} did not answer within {self.start_timeout_s:g} s"
                )
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.runtime is not None:
            shutil.rmtree(self.runtime, ignore_errors=True)

    def stop(self) -> None:
        """SIGTERM it and wait, keeping its directory (see `capd(workdir=...)`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pin(self, cpus: set[int]) -> None:
        os.sched_setaffinity(self.pid, cpus)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def _answers(self) -> bool:
        try:
            with LineClient(self.socket, timeout_s=2.0) as client:
                client.request({"id": 0, "method": "info"})
        except (OSError, ValueError, RuntimeError):
            return False
        return True


def _workdir(tag: str, where: Path = Path("/tmp")) -> Path:
    # Unix socket paths are limited to 108 bytes: keep the directory short.
    return Path(tempfile.mkdtemp(prefix=f"capd-bench-{tag}-", dir=where))


def tmpfs_dir(tag: str) -> Path:
    """A new directory on a tmpfs (TMPFS), or in /tmp where there is none."""
    return _workdir(tag, TMPFS if TMPFS.is_dir() else Path("/tmp"))


def capd(*args: str, workdir: Path | None = None, runtime: Path | None = None) -> Server:
    """A capd in a new directory, or in `workdir` (another capd's, stopped: a restart);
    its runtime dir inside it, or `runtime` (see `tmpfs_dir`)."""
    workdir = workdir or _workdir("capd")
    own_runtime = runtime
    runtime = runtime or workdir / "run"
    command = [
        sys.executable,
        "-m",
        "capd",
        "--runtime-dir",
        str(runtime),
        "--state-dir",
        str(workdir / "state"),
        "--log-level",
        "warning",
        *args,
    ]
    return Server(command, runtime / "capd.sock", workdir, own_runtime)


def baseline(kind: str, *args: str, tmpfs: bool = False) -> Server:
    """One of the servers in bench/baselines.py, on a socket of its own (in `tmpfs_dir`
    if `tmpfs`)."""
    workdir = tmpfs_dir(kind) if tmpfs else _workdir(kind)
    sock = workdir / f"{kind}.sock"
    command = [sys.executable, "-m", "bench.baselines", kind, str(sock), *args]
    return Server(command, sock, workdir)


def spawn(daemon: LineClient, name: str, model: dict[str, Any], **manifest: Any) -> Path:
    """Spawn a pod; its socket path."""
    reply = daemon.request(
        {
            "id": f"spawn-{name}",
            "method": "spawn",
            "manifest": {"name": name, "model": model, **manifest},
        }
    )
    return Path(reply["result"]["socket"])


def scripted(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"provider": "scripted", "script": list(steps)}


@contextlib.contextmanager
def pinned(*server_list: Server) -> Iterator[None]:
    """Run this process and `server_list` on one CPU while timing round trips.

    Then a round trip is the client's and the server's work plus two context switches. Across
    CPUs it also includes waking an idle CPU, which on a shared or virtual machine varies
    several-fold from run to run and would drown the difference being measured.
    """
    everything = os.sched_getaffinity(0)
    one = {min(everything)}
    os.sched_setaffinity(0, one)
    for server in server_list:
        server.pin(one)
    try:
        yield
    finally:
        os.sched_setaffinity(0, everything)
        for server in server_list:
            server.pin(everything)
