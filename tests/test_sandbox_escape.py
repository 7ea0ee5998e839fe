"""The escape suite (issue 19): a sandboxed pod's bash calls, and its file tools, try to get
out of the bounds docs/protocol.md ("Sandbox and approvals") sets, through a real capd.
Every attempt must fail, and capd must go on serving: after each turn the pod's `status`
and the daemon's `info` answer.

capd's state and runtime directories are under /var/tmp here, not under /tmp as in other
tests: a sandbox's /tmp is a private tmpfs, which would hide them whatever capd did. capd
runs with an API key and a secret in its environment. The suite needs a bwrap that works
on this host; it is skipped, saying why, only when capd's own probe (`info.sandbox`) found
none. The limits tests run their fork bomb only once a bounded loop has shown the limit
holds (pid_max is small on CI machines).
"""

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from protocol.client import Client
from tests.conftest import CapdProcess, _request
from tests.helpers import (
    Event,
    connect_pod,
    daemon_request,
    is_event,
    run_turn,
    scripted,
    spawn,
    until,
    wait_for,
)

SECRETS = {"OPENAI_API_KEY": "sk-escape-test-KEY", "CAPD_TEST_SECRET": "escape-test-SECRET"}
PY = sys.executable
CONNECT_UNIX = (
    f"{PY} -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect("
    'sys.argv[1].replace("@", "\\0", 1)); print("connected")\''
)
"""Connects to the Unix socket its argument names (a leading @: an abstract one)."""


@dataclass
class Host:
    capd: CapdProcess
    base: Path
    """Holds the state and runtime directories and `sibling`, a directory no pod may write."""

    @property
    def state(self) -> Path:
        return self.capd.state_dir

    @property
    def runtime(self) -> Path:
        return self.capd.runtime_dir

    @property
    def sibling(self) -> Path:
        return self.base / "sibling"


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    base = Path(tempfile.mkdtemp(prefix="ce-", dir="/var/tmp"))
    state = base / "state"
    state.mkdir()
    (base / "sibling").mkdir()
    capd = CapdProcess(runtime_dir=base / "run", state_dir=state, env=SECRETS)
    capd.log = state / "capd.log"
    try:
        capd.start()
        sandbox = _info(capd).get("sandbox")
        assert sandbox is not None, "capd's info says nothing about its sandbox"
        if sandbox["path"] is None:
            pytest.skip(f"no bwrap can confine pods on this host: {sandbox['error']}")
        yield Host(capd, base)
    finally:
        capd.stop()
        shutil.rmtree(base, ignore_errors=True)


def _info(capd: CapdProcess) -> dict[str, Any]:
    return dict(_request(capd.socket, {"method": "info"}, timeout=5.0)["result"])


def bash(command: str, timeout_s: float | None = None) -> dict[str, Any]:
    arguments: dict[str, Any] = {"command": command}
    if timeout_s is not None:
        arguments["timeout_s"] = timeout_s
    return {"name": "bash", "arguments": arguments}


class Attempts:
    """A pod whose scripted model makes the given calls, one turn per list of calls."""

    def __init__(self, host: Host, name: str, turns: list[list[dict[str, Any]]]) -> None:
        self.host, self.name, self.turns = host, name, turns
        self._pod: Client | None = None

    async def spawn(self, tools: list[str] | None = None, **manifest: Any) -> "Attempts":
        steps: list[dict[str, Any]] = []
        for calls in self.turns:
            steps += [{"tool_calls": calls}, {"text": "next"}]
        await spawn(
            self.host.capd, self.name, scripted(*steps), tools=tools or ["bash"], **manifest
        )
        return self

    async def status(self) -> dict[str, Any]:
        assert self._pod is not None
        return await self._pod.request({"method": "status"})

    async def next(self) -> list[Event]:
        """Run the next turn: its tool results, once the pod and capd still answer."""
        assert self._pod is not None
        _, seen = await run_turn(self._pod, "go")
        status = await self.status()
        assert status["status"] == "idle", status
        info = await daemon_request(self.host.capd, {"method": "info"})
        assert info["pid"] == self.host.capd.proc.pid  # type: ignore[union-attr]
        return [event for event in seen if event["event"] == "tool_result"]

    async def one(self) -> Event:
        (result,) = await self.next()
        return result

    async def all(self) -> list[Event]:
        return [result for _ in self.turns for result in await self.next()]

    async def __aenter__(self) -> "Attempts":
        self._pod = await connect_pod(self.host.capd, self.name)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._pod is not None
        await self._pod.close()


def _failed(result: Event, needle: str) -> None:
    assert (result["is_error"], needle in result["output"]) == (True, True), result


async def test_writes_outside_the_cwd_fail(host: Host) -> None:
    writes = [
        "echo x > /etc/capd-escape",
        f"echo x > {host.sibling}/escape",
        "echo x > ../../../escape",
        "mkdir ../../../escape.d",
        f"echo x > {host.state}/pods/escape",
    ]
    turns = [[bash("echo inside > mine.txt && cat mine.txt")], *([bash(w)] for w in writes)]
    async with await Attempts(host, "writer", turns).spawn() as pod:
        first = await pod.one()
        assert (first["is_error"], first["output"]) == (False, "inside")
        for _ in writes:
            _failed(await pod.one(), "Read-only file system")
    assert (host.state / "pods/writer/work/mine.txt").read_text() == "inside\n"
    escaped = [
        Path("/etc/capd-escape"),
        host.sibling / "escape",
        host.state / "escape",
        host.state / "escape.d",
        host.state / "pods/escape",
    ]
    assert [path for path in escaped if path.exists()] == []


async def test_capd_state_and_other_pods_are_out_of_sight(host: Host) -> None:
    # The victim keeps a secret in its own work dir (made by its first turn).
    keep = scripted({"tool_calls": [bash("echo secret > secret.txt")]}, {"text": "kept"})
    await spawn(host.capd, "victim", keep, tools=["bash"])
    async with await connect_pod(host.capd, "victim") as victim:
        await run_turn(victim, "keep it")
    secret = host.state / "pods/victim/work/secret.txt"
    assert secret.read_text() == "secret\n"
    assert (host.state / "capd.db").is_file()
    reads = [
        f"cat {host.state}/capd.db",
        "cat ../../../capd.db",
        f"cat {secret}",
        "cat ../../victim/work/secret.txt",
    ]
    listings = [f"ls -A {host.state}", f"ls -A {host.state}/pods"]
    turns = [[bash(command)] for command in reads + listings]
    async with await Attempts(host, "reader", turns).spawn() as pod:
        for _ in reads:
            _failed(await pod.one(), "No such file or directory")
        state_listing, pods_listing = [(await pod.one())["output"] for _ in listings]
    assert state_listing.split() == ["pods"]
    assert pods_listing.split() == ["reader"]


async def test_capd_environment_and_processes_are_out_of_sight(host: Host) -> None:
    assert host.capd.proc is not None
    pid = host.capd.proc.pid
    on_host = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    assert all(value in on_host for value in SECRETS.values())
    commands = [
        "env",
        "cat /proc/*/environ | tr '\\0' '\\n'",
        "cat /proc/*/cmdline | tr '\\0' ' '",
    ]
    turns = [[bash(command)] for command in commands] + [[bash(f"cat /proc/{pid}/environ")]]
    async with await Attempts(host, "snoop", turns).spawn() as pod:
        env, environs, cmdlines = [(await pod.one())["output"] for _ in commands]
        _failed(await pod.one(), "No such file or directory")
    assert ("PATH=" in env, "PATH=" in environs) == (True, True)
    for shown in (env, environs, cmdlines):
        assert not [name for name, value in SECRETS.items() if name in shown or value in shown]
    assert "-m capd" not in cmdlines


@contextlib.asynccontextmanager
async def _listeners(host: Host) -> AsyncIterator[dict[str, Any]]:
    """A TCP listener on 127.0.0.1, an abstract Unix socket and a Unix socket in capd's
    runtime directory, each counting the connections it accepts."""
    accepted = {"tcp": 0, "abstract": 0, "runtime": 0}

    def counter(kind: str) -> Any:
        async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted[kind] += 1
            writer.close()

        return handle

    abstract = f"capd-escape-{os.getpid()}-{id(accepted)}"
    path = host.runtime / "escape.sock"
    tcp = await asyncio.start_server(counter("tcp"), "127.0.0.1", 0)
    unix = await asyncio.start_unix_server(counter("abstract"), "\0" + abstract)
    runtime = await asyncio.start_unix_server(counter("runtime"), str(path))
    try:
        yield {
            "accepted": accepted,
            "port": tcp.sockets[0].getsockname()[1],
            "abstract": abstract,
            "path": path,
        }
    finally:
        for server in (tcp, unix, runtime):
            server.close()
        path.unlink(missing_ok=True)


async def test_without_network_no_tcp_and_no_abstract_socket_is_reachable(host: Host) -> None:
    """With the network, a pod reaches the test's TCP and abstract listeners (so the
    attempts can succeed); with `network: false` neither. capd's runtime directory, with
    its sockets, is hidden either way."""
    async with _listeners(host) as listen:
        attempts = [
            f"exec 3<>/dev/tcp/127.0.0.1/{listen['port']} && echo connected",
            f"{CONNECT_UNIX} @{listen['abstract']}",
            f"{CONNECT_UNIX} {listen['path']}",
            f"{CONNECT_UNIX} {host.capd.socket}",
            f"ls -A {host.runtime}",
        ]
        turns = [[bash(command)] for command in attempts]
        async with await Attempts(host, "online", turns).spawn() as pod:
            online = [await pod.one() for _ in attempts]
        assert [r["output"] for r in online[:2]] == ["connected", "connected"], online
        assert listen["accepted"] == {"tcp": 1, "abstract": 1, "runtime": 0}
        async with await Attempts(host, "offline", turns).spawn(sandbox={"network": False}) as pod:
            offline = [await pod.one() for _ in attempts]
        assert listen["accepted"] == {"tcp": 1, "abstract": 1, "runtime": 0}
    _failed(offline[0], "Connection refused")
    _failed(offline[1], "ConnectionRefusedError")
    for results in (online, offline):
        _failed(results[2], "FileNotFoundError")
        _failed(results[3], "FileNotFoundError")
        assert (results[4]["is_error"], results[4]["output"]) == (False, "[no output]")
    status = await daemon_request(host.capd, {"method": "list"})
    assert {"online", "offline"} <= {p["name"] for p in status["pods"]}


def _processes_with_args(*args: str) -> list[int]:
    """The processes on this host whose command line is `args`."""
    wanted = "\0".join(args).encode() + b"\0"
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "cmdline").read_bytes() == wanted:
                found.append(int(proc.name))
    return found


async def test_a_setsid_process_does_not_outlive_its_call(host: Host) -> None:
    seconds = f"1000.{os.getpid()}"
    command = (
        f"setsid sleep {seconds} & pid=$!; "
        f"until grep -q {seconds} /proc/$pid/cmdline 2>/dev/null; do :; done; echo running"
    )
    async with await Attempts(host, "leaver", [[bash(command)]]).spawn() as pod:
        result = await pod.one()
    assert (result["is_error"], result["output"]) == (False, "running")
    await until(lambda: not _processes_with_args("sleep", seconds), timeout=5)


async def _limits_in_force(pod: Attempts, what: str) -> str:
    """How the pod's limits are enforced; skips when they cannot hold for `what` here."""
    limits = (await pod.status())["sandbox"]["limits"]
    assert limits != "none", "limits are set but capd says none is enforced"
    if limits == "rlimit" and what == "pids" and os.geteuid() == 0:
        pytest.skip("limits.pids falls back to RLIMIT_NPROC here, which root ignores")
    return str(limits)


async def test_limits_pids_stops_a_fork_bomb(host: Host) -> None:
    """A bounded loop first: only once it fails at the limit does the real bomb run."""
    seconds = f"60.{os.getpid()}"
    loop = f"sh -c 'for i in $(seq 200); do sleep {seconds} & done; echo all 200 started'"
    turns = [
        [bash(loop, timeout_s=30)],
        [bash("echo alive")],
        [bash(":(){ :|:& };:; sleep 10", timeout_s=3)],  # alive until the bomb hits the limit
        [bash("echo alive")],
    ]
    async with await Attempts(host, "forker", turns).spawn(limits={"pids": 64}) as pod:
        await _limits_in_force(pod, "pids")
        bounded = await pod.one()
        _failed(bounded, "[limits.pids=64 reached: some processes could not start]")
        assert "all 200 started" not in bounded["output"]
        assert (await pod.one())["output"] == "alive"
        _failed(await pod.one(), "[limits.pids=64 reached")
        assert (await pod.one())["output"] == "alive"
    await until(lambda: not _processes_with_args("sleep", seconds), timeout=5)


async def test_limits_memory_mb_stops_an_allocation(host: Host) -> None:
    hog = f"{PY} -c 'b = b\"x\" * (512 << 20); print(len(b))'"
    turns = [[bash(hog, timeout_s=30)], [bash("echo alive")]]
    async with await Attempts(host, "hog", turns).spawn(limits={"memory_mb": 64}) as pod:
        limits = await _limits_in_force(pod, "memory")
        result = await pod.one()
        if limits == "rlimit":
            _failed(result, "MemoryError")
        else:
            _failed(result, "[killed: out of memory (limits.memory_mb=64)]")
        assert str(512 << 20) not in result["output"]
        assert (await pod.one())["output"] == "alive"


async def test_the_file_tools_do_not_follow_the_sandboxs_links_out(host: Host) -> None:
    """Symlinks a sandboxed bash call makes are inert inside bwrap; the file tools, which
    run in capd, refuse them too (the races are in tests/test_file_tool_bounds.py)."""
    links = (
        f"ln -s /etc/passwd pw && ln -s ../../.. up && ln -s {host.state}/capd.db db && "
        f"ln -s {host.sibling} sib && echo linked"
    )
    attempts = [
        ("read_file", {"path": "pw"}),
        ("read_file", {"path": "up/capd.db"}),
        ("read_file", {"path": "../../../capd.db"}),
        ("read_file", {"path": str(host.state / "capd.db")}),
        ("write_file", {"path": "db", "content": "x"}),
        ("write_file", {"path": "sib/escape", "content": "x"}),
        ("edit_file", {"path": "pw", "old_text": "root", "new_text": "toor"}),
    ]
    turns = [[bash(links)], [{"name": tool, "arguments": args} for tool, args in attempts]]
    tools = ["bash", "read_file", "write_file", "edit_file"]
    async with await Attempts(host, "filer", turns).spawn(tools=tools) as pod:
        assert (await pod.one())["output"] == "linked"
        refused = await pod.next()
    for (_, args), result in zip(attempts, refused, strict=True):
        _failed(result, f"path {args['path']} resolves outside the working directory")
    assert not (host.sibling / "escape").exists()


async def test_a_childs_cwd_swapped_for_a_symlink_leads_its_file_tools_nowhere(
    host: Host,
) -> None:
    """A child's cwd lies in its parent's, so the parent's bash may rename it and leave a
    symlink in its place (here the test does it, between the child's spawn and its turn).
    The child's file tools then refuse to open their root: they used to follow it, below a
    hidden directory too, and read and write there (review19 #13, the file tools' side)."""
    home, secrets = host.base / "boss13", host.base / "secrets13"
    for directory in (home / "sub", secrets / "inner"):
        directory.mkdir(parents=True)
    (secrets / "inner" / "key").write_text("TOPSECRET\n")
    tools, sandbox = ["read_file", "write_file"], {"hidden": [str(secrets)]}
    await spawn(host.capd, "boss13", scripted(), cwd=str(home), tools=tools, sandbox=sandbox)
    calls = [
        {"name": "read_file", "arguments": {"path": "key"}},
        {"name": "write_file", "arguments": {"path": "planted", "content": "x"}},
    ]
    child = {"name": "kid13", "model": scripted({"tool_calls": calls}, {"text": "done"})}
    manifest = {**child, "cwd": str(home / "sub"), "tools": tools, "sandbox": sandbox}
    parent = str(host.capd.pod_socket("boss13"))
    await daemon_request(host.capd, {"method": "spawn", "manifest": manifest, "parent": parent})
    (home / "sub").rename(home / "sub.old")
    (home / "sub").symlink_to("../secrets13/inner")
    async with await connect_pod(host.capd, "kid13") as kid:
        _, seen = await run_turn(kid, "go")
    results = [event for event in seen if event["event"] == "tool_result"]
    for result, call in zip(results, calls, strict=True):
        _failed(
            result,
            f"cannot open {call['arguments']['path']}: {home / 'sub'} is a symlink now, so the "
            "working directory",
        )
    assert sorted(p.name for p in (secrets / "inner").iterdir()) == ["key"]


async def test_a_child_is_no_wider_and_is_confined_as_its_parent_said(host: Host) -> None:
    """spawn_pod asking for more than a parent without network has is refused; a child
    narrowed to read-only, and without network as its parent, can neither write nor dial."""
    async with _listeners(host) as listen:
        dial = bash(f"exec 3<>/dev/tcp/127.0.0.1/{listen['port']} && echo connected")
        child_model = {"script": [{"tool_calls": [dial, bash("touch kid.txt")]}, {"text": "ok"}]}
        spawns = [
            {"name": "kid-net", "task": "x", "sandbox": {"network": True}},
            {"name": "kid-off", "task": "x", "sandbox": {"mode": "off"}},
            {"name": "kid-env", "task": "x", "sandbox": {"env": ["PATH", "OPENAI_API_KEY"]}},
            {"name": "kid-hid", "task": "x", "sandbox": {"hidden": []}},
            {"name": "kid-out", "task": "x", "sandbox": {"writable": [str(host.sibling)]}},
            {"name": "kid", "task": "x", "model": child_model, "sandbox": {"mode": "read-only"}},
        ]
        turns = [[{"name": "spawn_pod", "arguments": args} for args in spawns]]
        boss = Attempts(host, "boss", turns)
        sandbox = {"network": False, "env": ["PATH"], "hidden": [str(host.sibling)]}
        await boss.spawn(tools=["bash", "spawn_pod"], sandbox=sandbox)
        async with boss:
            results = await boss.next()
        fields = ["network", "mode", "env", "hidden", "writable"]
        for result, args, field in zip(results, spawns, fields, strict=False):
            _failed(result, f"cannot spawn pod {args['name']}: sandbox.{field} ")
            assert "no wider than its parent's" in result["output"], result
        assert not results[-1]["is_error"], results[-1]
        async with await Client.connect(host.capd.pod_socket("kid")) as kid:
            await kid.request({"method": "subscribe", "after_seq": 0})
            _, seen = await wait_for(kid, is_event("turn_end"))
        dialed, touched = [e for e in seen if e["event"] == "tool_result"]
        _failed(dialed, "Connection refused")
        _failed(touched, "Read-only file system")
        assert listen["accepted"]["tcp"] == 0
    assert not (host.state / "pods/boss/work/kid.txt").exists()
