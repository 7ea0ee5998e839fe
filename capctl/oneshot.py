"""One request, one reply, over a blocking socket: the commands that check or steer a pod.

Most of what a person types (`status`, `pause`, `ps`, ...) is a single request. Served
from here, such a command loads neither asyncio nor pydantic and finishes in a fraction of
the time (see README: Performance); capd validates every request it receives anyway.
Streaming commands (`send`, `watch`, `log`) use `session.py`.
"""

import socket
import time
from pathlib import Path
from typing import Any

import orjson

from capctl.errors import CapctlError
from protocol import paths

CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 30.0
READY_POLL_S = 0.05
Frame = dict[str, Any]


class _Connection:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(CONNECT_TIMEOUT_S)
        self._file = self._sock.makefile("rb")
        try:
            self._sock.connect(str(path))
            hello = self._read()
        except BaseException:
            self.close()
            raise
        if hello.get("event") == "error":
            raise CapctlError(f"{hello.get('code')}: {hello.get('message')}")
        if hello.get("event") != "hello" or hello.get("protocol") != 1:
            raise CapctlError(f"{path} did not greet like capd (protocol 1)")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def request(self, frame: Frame) -> Frame:
        """The ack's result, or a CapctlError for an error reply or a lost connection."""
        self._sock.settimeout(REPLY_TIMEOUT_S)
        self._sock.sendall(orjson.dumps({**frame, "id": 1}, option=orjson.OPT_APPEND_NEWLINE))
        while True:
            reply = self._read()
            if reply.get("id") != 1:
                continue  # an event: this connection does not subscribe, so none is expected
            if reply.get("event") == "error":
                raise CapctlError(f"{reply.get('code')}: {reply.get('message')}")
            result = reply.get("result")
            return result if isinstance(result, dict) else {}

    def _read(self) -> Frame:
        try:
            line = self._file.readline()
        except TimeoutError:
            raise CapctlError("timed out waiting for capd to answer") from None
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            raise CapctlError(f"lost the connection to capd: {exc.strerror or exc}") from None
        if not line:
            raise CapctlError("capd closed the connection before answering")
        try:
            frame = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise CapctlError(f"{self.path} sent something that is not JSON") from None
        return frame if isinstance(frame, dict) else {}


def _is_absent(exc: OSError) -> bool:
    """No socket file, or a file nobody listens on: the server is not there."""
    return isinstance(exc, FileNotFoundError | ConnectionRefusedError)


def _reason(exc: OSError) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)


def _open_daemon(runtime: Path) -> _Connection:
    path = paths.daemon_socket(runtime)
    try:
        return _Connection(path)
    except OSError as exc:
        reason = "is capd running?" if _is_absent(exc) else _reason(exc)
        raise CapctlError(f"cannot reach capd at {path}: {reason}") from None


def daemon_call(runtime: Path, frame: Frame) -> Frame:
    """One request on the daemon socket; returns the ack's result."""
    conn = _open_daemon(runtime)
    try:
        return conn.request(frame)
    finally:
        conn.close()


def pod_call(runtime: Path, name: str, frame: Frame, via_daemon: bool = False) -> Frame:
    """One request to a pod; returns the ack's result. It goes to the pod's socket, or to
    the daemon's naming the pod (`pod`) when `via_daemon` or when no socket here serves a
    pod that the daemon lists as up (hosted by another node)."""
    if via_daemon:
        return daemon_call(runtime, {**frame, "pod": name})
    path = paths.pod_socket(runtime, name)
    try:
        conn = _Connection(path)
    except OSError as exc:
        if not _is_absent(exc):
            raise CapctlError(f"cannot reach pod {name} at {path}: {_reason(exc)}") from None
        if (why := why_no_pod(runtime, name)) is not None:
            raise CapctlError(why) from None
        return daemon_call(runtime, {**frame, "pod": name})
    try:
        return conn.request(frame)
    finally:
        conn.close()


def why_no_pod(runtime: Path, name: str) -> str | None:
    """Why nothing answers on a pod's socket, as the daemon sees it; None when the pod is
    up on another node: the daemon socket reaches it."""
    pods = daemon_call(runtime, {"method": "list"}).get("pods") or []
    return why_absent(pods, name, paths.pod_socket(runtime, name))


def why_absent(pods: list[Frame], name: str, path: Path) -> str | None:
    """Why pod `name` of `list`'s `pods` has nothing at its socket `path`; None when its
    entry has no socket (another node hosts it)."""
    for pod in pods:
        if pod.get("name") != name:
            continue
        if pod.get("status") == "stopped":
            return f"pod {name} is stopped (capctl start {name} brings it back)"
        if pod.get("socket") is None:
            return None
        return f"pod {name} is {pod.get('status')} but nothing answers at {path}"
    return f"no pod named {name} (no socket at {path})"


def wait_ready(runtime: Path, timeout_s: float) -> Frame:
    """Poll the daemon socket until capd answers `info`; its result, or a CapctlError."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return daemon_call(runtime, {"method": "info"})
        except CapctlError:
            if time.monotonic() >= deadline:
                raise CapctlError(
                    f"capd did not answer at {paths.daemon_socket(runtime)} within {timeout_s:g} s"
                ) from None
        time.sleep(READY_POLL_S)
