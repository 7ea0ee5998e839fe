"""Fixtures: a real capd subprocess on temporary runtime and state directories."""

import compileall
import contextlib
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
from typing import Any

import pytest

from tests.mcp_servers import McpServerCommands
from tests.mcp_servers import install as install_mcp_servers
from tests.pg import PgServer, pg_server, pg_url  # noqa: F401  (fixtures: a real PostgreSQL)

START_TIMEOUT_S = 10.0
REPO = Path(__file__).resolve().parents[1]
SHOW_CHECKOUT = ["--sandbox-show", str(REPO)] if REPO.is_relative_to("/tmp") else []
"""A checkout under /tmp (a CI runner's) would be hidden by every sandbox's private /tmp,
and with it the venv and the stand-in engines and servers pods run from tests/fakes."""


@dataclass
class CapdProcess:
    runtime_dir: Path
    state_dir: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    store: str | None = None
    """`--store`: the PostgreSQL database capd keeps its state in; None: SQLite."""
    listening: socket.socket | None = None
    """A bound, listening daemon socket to hand over as systemd's socket activation does."""
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    """Where its output goes instead of a pipe: a capd that lives long (a module's) would
    block once it logged more than the pipe holds."""

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "capd.sock"

    def pod_socket(self, name: str) -> Path:
        return self.runtime_dir / "pods" / f"{name}.sock"

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start capd and wait until it answers; `timeout` for one with much to restore."""
        env = {**os.environ, **self.env}
        command = [
            sys.executable,
            "-m",
            "capd",
            "--runtime-dir",
            str(self.runtime_dir),
            "--state-dir",
            str(self.state_dir),
            *SHOW_CHECKOUT,
            *(["--store", self.store] if self.store else []),
            *self.extra_args,
        ]
        stdin = None
        if self.listening is not None:
            # As systemd does: the socket as fd 3, LISTEN_PID naming the daemon's own pid
            # (the shell's, which exec keeps).
            launch = 'exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$@"'
            command = ["sh", "-c", launch, *command]
            stdin = self.listening.fileno()
        with self.log.open("ab") if self.log else contextlib.nullcontext() as log:
            self.proc = subprocess.Popen(
                command,
                env=env,
                stdin=stdin,
                stdout=log or subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"capd exited with {self.proc.returncode}:\n{self.output()}")
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
        if self.log:
            return self.log.read_text()
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
    try:
        reply = _request(path, {"method": "info"}, timeout=2.0)
    except (OSError, ValueError):
        return False
    return reply.get("result", {}).get("pid") == pid


def _request(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request on a fresh connection, read synchronously; the reply frame."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({**request, "id": 1}).encode() + b"\n")
        reader = s.makefile("rb")
        reader.readline()  # hello
        return json.loads(reader.readline())


def _stopped_at_exit(state_dir: Path) -> Iterator[CapdProcess]:
    """A capd on `state_dir`, not yet started; SIGTERMed (and checked to exit 0) at the end."""
    # Unix socket paths are limited to 108 bytes: keep the runtime dir short.
    runtime = Path(f"/tmp/capd-test-{os.getpid()}-{time.monotonic_ns() % 10**9}")
    proc = CapdProcess(runtime_dir=runtime, state_dir=state_dir)
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(runtime, ignore_errors=True)


TEST_STORE = os.environ.get("CAPD_TEST_STORE", "sqlite")
"""`CAPD_TEST_STORE=postgresql` runs every capd the tests start on PostgreSQL."""
BOTH_STORES = pytest.mark.parametrize("capd_store", ["sqlite", "postgresql"], indirect=True)
"""Runs a test's own capd (`capd_dirs`, an `own_capd` `capd`) on each store."""


@pytest.fixture
def capd_store(request: pytest.FixtureRequest) -> str | None:
    """The store of the test's own capd: None (SQLite), or under BOTH_STORES (or with
    CAPD_TEST_STORE=postgresql, for every capd) a fresh PostgreSQL database's URL."""
    if getattr(request, "param", TEST_STORE) == "postgresql":
        url: str = request.getfixturevalue("pg_url")
        return url
    return None


@pytest.fixture
def capd_dirs(tmp_path: Path, capd_store: str | None) -> Iterator[CapdProcess]:
    """A capd not yet started, so a test can set args or env first. Its state dir is
    beside `tmp_path`, not in it: tests use `tmp_path` as a pod's cwd, and a sandboxed
    pod's cwd may not contain capd's state dir."""
    for proc in _stopped_at_exit(tmp_path.with_name(f"{tmp_path.name}-state")):
        proc.store = capd_store
        yield proc


def pytest_configure(config: pytest.Config) -> None:
    if sys.dont_write_bytecode and not hasattr(config, "workerinput"):
        # With PYTHONDONTWRITEBYTECODE every capd the tests start would compile capd's
        # sources again (a sixth of its start); compiled once here, each one reads them.
        # A checkout the tests cannot write to is left as it is.
        for package in ("capd", "protocol", "capctl"):
            if os.access(REPO / package, os.W_OK):
                compileall.compile_dir(REPO / package, quiet=2)
    config.addinivalue_line(
        "markers",
        "shared_capd: `capd` is one capd for the module, emptied of pods after each test",
    )
    config.addinivalue_line("markers", "own_capd: `capd` is this test's own, in a shared module")


@pytest.fixture
def capd(request: pytest.FixtureRequest, capd_store: str | None) -> Iterator[CapdProcess]:
    """A running capd; stopped with SIGTERM (and checked to exit 0) after the test. In a
    module marked `shared_capd` (its tests only spawn pods and talk to them, and starting
    a capd costs more than most such tests) it is the module's, emptied of pods after the
    test, unless the test is marked `own_capd` (it stops or restarts capd, or reads its log).
    `capd_store` is named here so that BOTH_STORES can parametrise an own capd's store."""
    node = request.node
    if node.get_closest_marker("shared_capd") and not node.get_closest_marker("own_capd"):
        shared: CapdProcess = request.getfixturevalue("_module_capd")
        yield shared
        _delete_every_pod(shared)
        return
    proc: CapdProcess = request.getfixturevalue("capd_dirs")
    proc.start()
    yield proc


@pytest.fixture(scope="module")
def _module_capd(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[CapdProcess]:
    # Stopped even when its start fails (a capd too slow to listen still runs).
    with contextlib.closing(_stopped_at_exit(tmp_path_factory.mktemp("state"))) as runs:
        proc = next(runs)
        proc.log = proc.state_dir / "capd.log"
        if TEST_STORE == "postgresql":
            server: PgServer = request.getfixturevalue("pg_server")
            proc.store = server.url(server.create_database())
        proc.start()
        yield proc


def _delete_every_pod(capd: CapdProcess) -> None:
    """`delete` each pod; a deleted parent's children are listed again, as top-level pods.
    A pod whose work tree another pod works in is refused until that one is gone."""
    while pods := _daemon_result(capd, {"method": "list"})["pods"]:
        refused = []
        for pod in pods:
            request = {"method": "delete", "name": pod["name"]}
            if "result" not in (reply := _request(capd.socket, request, START_TIMEOUT_S)):
                refused.append(reply)
        assert len(refused) < len(pods), f"no pod could be deleted: {refused}"


def _daemon_result(capd: CapdProcess, request: dict[str, Any]) -> dict[str, Any]:
    reply = _request(capd.socket, request, timeout=START_TIMEOUT_S)
    assert "result" in reply, f"{request} failed: {reply}"
    return reply["result"]


@pytest.fixture(scope="session")
def mcp_commands() -> "McpServerCommands":
    """How to start the real MCP servers the tests use, installed on first use."""
    return install_mcp_servers()
