"""Hostile input, property-based: random frames and random parameters for every method,
against a live capd. Every line gets exactly one reply, in order, with a known error code
when it is refused; a refused request changes nothing; the connection stays open."""

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ErrorCode
from protocol.methods import DAEMON_REQUESTS, POD_REQUESTS, RequestParser
from tests.conftest import CapdProcess

CODES = set(get_args(ErrorCode))
FIELDS = ["id", "text", "if_busy", "all", "source", "event", "after_seq", "limit", "name"]
FIELDS += ["manifest", "parent", "method"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _nested(depth: int) -> Any:
    value: Any = 0
    for level in range(depth - 1):
        value = [value] if level % 2 else {"n": value}
    return value


HOSTILE_VALUES: list[Any] = [
    _nested(95),
    _nested(300),
    2**63,
    2**64,
    -(2**63) - 1,
    1e308,
    {f"k{i}": i for i in range(20_000)},
    list(range(20_000)),
    "x" * 300_000,
]
"""Values at and past capd's bounds: nesting depth, 64-bit numbers, object members, size."""


def frames(methods: frozenset[str]) -> st.SearchStrategy[dict[str, Any]]:
    fields = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=4)
    method = st.sampled_from(sorted(methods)) | st.text(max_size=10)
    return st.builds(lambda m, f: {**f, "method": m}, method, fields)


class Line:
    """A blocking JSON-lines connection."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.hello = self.read()

    def send(self, raw: bytes) -> None:
        self.file.write(raw + b"\n")
        self.file.flush()

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "capd closed the connection"
        return json.loads(line)

    def ask(self, frame: dict[str, Any]) -> dict[str, Any]:
        self.send(json.dumps(frame).encode())
        while (reply := self.read())["event"] not in ("ack", "error"):
            pass  # events of a subscription the fuzzer opened
        return reply


@pytest.fixture(scope="module")
def fuzz_capd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CapdProcess]:
    runtime = tmp_path_factory.mktemp("x").parent / f"f{os.getpid()}{time.monotonic_ns() % 10**6}"
    capd = CapdProcess(runtime_dir=runtime, state_dir=tmp_path_factory.mktemp("state"))
    capd.start()
    yield capd
    capd.stop()
    shutil.rmtree(runtime, ignore_errors=True)


def _check_reply(reply: dict[str, Any], frame: dict[str, Any]) -> None:
    assert reply["event"] in ("ack", "error"), reply
    if reply["event"] == "error":
        assert reply["code"] in CODES
        assert reply["code"] != "internal", reply  # a refusal is typed; internal is a bug
        assert reply["message"]
        assert "\n" not in reply["message"]
        assert "Traceback" not in reply["message"]
    rid = frame.get("id")
    readable_int = isinstance(rid, int) and not isinstance(rid, bool) and -(2**63) <= rid < 2**63
    if isinstance(rid, str) or readable_int:
        assert reply["id"] == rid


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(frame=frames(DAEMON_REQUESTS.methods - {"shutdown"}))
def test_daemon_socket_survives_random_requests(
    fuzz_capd: CapdProcess, frame: dict[str, Any]
) -> None:
    daemon = Line(str(fuzz_capd.socket))
    before = daemon.ask({"method": "list", "id": "before"})
    if frame.get("method") == "shutdown":
        return
    reply = daemon.ask(frame)
    _check_reply(reply, frame)
    if reply["event"] == "error":
        assert daemon.ask({"method": "list", "id": "after"})["result"] == before["result"]
    assert daemon.ask({"method": "info", "id": "alive"})["event"] == "ack"
    daemon.sock.close()


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(frame=frames(POD_REQUESTS.methods - {"stop"}))
def test_pod_socket_survives_random_requests(fuzz_capd: CapdProcess, frame: dict[str, Any]) -> None:
    pod = _fuzz_pod(fuzz_capd)
    before = _settle(pod)
    if frame.get("method") == "stop":
        return
    reply = pod.ask(frame)
    _check_reply(reply, frame)
    after = pod.ask({"method": "status", "id": "after"})["result"]
    if reply["event"] == "error":
        assert after["last_seq"] == before["last_seq"]
    pod.sock.close()


@pytest.mark.parametrize("method", sorted(POD_REQUESTS.methods - {"stop"}))
def test_pod_methods_survive_hostile_values(fuzz_capd: CapdProcess, method: str) -> None:
    """Each field of each method at or past a bound: a typed error or an ack, after which
    the pod answers and its history has no gap."""
    pod = _fuzz_pod(fuzz_capd)
    for field in [*_fields(POD_REQUESTS, method), "event.d", "unknown"]:
        for value in HOSTILE_VALUES:
            before = _settle(pod)
            frame = _with(field, value, {"method": method, "id": "h", "event": {"kind": "x"}})
            reply = pod.ask(frame)
            case = f"{method} with {field} = {str(value)[:40]}"
            _check_reply(reply, frame)
            after = _settle(pod)
            if reply["event"] == "error":
                assert after["last_seq"] == before["last_seq"], case
            _assert_no_gap(pod, before["last_seq"], after["last_seq"])
    pod.sock.close()


@pytest.mark.parametrize("method", sorted(DAEMON_REQUESTS.methods - {"shutdown"}))
def test_daemon_methods_survive_hostile_values(fuzz_capd: CapdProcess, method: str) -> None:
    daemon = Line(str(fuzz_capd.socket))
    fields = [*_fields(DAEMON_REQUESTS, method), "manifest.model", "manifest.limits"]
    fields += ["manifest.model.script", "unknown"]
    for field in fields:
        for value in HOSTILE_VALUES:
            manifest = {"name": "hv", "model": {"provider": "scripted"}}
            frame = {"method": method, "id": "h", "manifest": manifest, "name": "hv"}
            if field == "manifest.model.script":
                value = [{"tool_calls": [{"name": "bash", "arguments": {"command": value}}]}]
            reply = daemon.ask(_with(field, value, frame))
            _check_reply(reply, frame)
            assert daemon.ask({"method": "info", "id": "alive"})["event"] == "ack"
            if reply["event"] == "ack" and method == "spawn":
                assert daemon.ask({"method": "delete", "name": "hv", "id": "rm"})["event"] == "ack"
    daemon.sock.close()


def _fields(parser: RequestParser, method: str) -> list[str]:
    """The fields of `method`'s request, `method` aside."""
    return [name for name in parser.models[method].model_fields if name != "method"]


def _with(path: str, value: Any, frame: dict[str, Any]) -> dict[str, Any]:
    """`frame` with `value` at the dotted `path`."""
    *parents, last = path.split(".")
    target = frame
    for key in parents:
        target = target[key]
    target[last] = value
    return frame


def _fuzz_pod(capd: CapdProcess) -> Line:
    if not capd.pod_socket("fz").exists():
        setup = Line(str(capd.socket))
        setup.ask(
            {"method": "spawn", "manifest": {"name": "fz", "model": {"provider": "scripted"}}}
        )
        setup.sock.close()
    return Line(str(capd.pod_socket("fz")))


def _assert_no_gap(pod: Line, first: int, last: int) -> None:
    """The pod's history holds every seq from `first` to `last`, once each, in order."""
    seqs = [first]
    while seqs[-1] < last:
        page = pod.ask({"method": "history", "after_seq": seqs[-1], "id": "gap"})["result"]
        assert page["events"], f"history ends at {seqs[-1]}, status says {last}"
        seqs.extend(event["seq"] for event in page["events"])
    assert seqs == list(range(first, last + 1))


def _settle(pod: Line) -> dict[str, Any]:
    """Bring the pod to rest (idle, nothing pending) after what earlier examples started, so
    that nothing but the request under test can change it; its status then."""
    deadline = time.monotonic() + 10
    while (status := pod.ask({"method": "status", "id": "settle"})["result"])["status"] != "idle":
        assert time.monotonic() < deadline, f"the pod does not come to rest: {status}"
        if status["status"] == "paused":
            pod.ask({"method": "cancel", "all": True, "id": "settle-cancel"})
        else:
            time.sleep(0.01)
    return status


@settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(raw=st.binary(max_size=200).filter(lambda b: b"\n" not in b))
def test_random_bytes_get_typed_errors(fuzz_capd: CapdProcess, raw: bytes) -> None:
    daemon = Line(str(fuzz_capd.socket))
    daemon.send(raw)
    if raw.strip():
        reply = daemon.read()
        assert reply["event"] in ("ack", "error")
        if reply["event"] == "error":
            assert reply["code"] in CODES
    assert daemon.ask({"method": "info", "id": "alive"})["event"] == "ack"
    daemon.sock.close()
