"""systemd integration, dependency-free: sd_notify(3) and socket activation (sd_listen_fds).

`Notifier` sends `READY=1`, `STATUS=`, `WATCHDOG=1` and `STOPPING=1` datagrams to
$NOTIFY_SOCKET (a path, or `@name` in the abstract namespace); without the variable it does
nothing, so capd runs the same outside systemd. `activated_socket` takes over the daemon
socket that a `capd.socket` unit passed in ($LISTEN_FDS and $LISTEN_PID, fds from 3).
"""

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3


class Notifier:
    def __init__(self, env: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = _watchdog_seconds(env)
        # Tool processes must not talk to systemd in capd's name.
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        self._socket: socket.socket | None = None
        if self._address is not None:
            # Non-blocking: a busy systemd with a full queue must not stall capd's loop.
            self._socket = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    def send(self, **fields: str) -> None:
        if self._socket is None or self._address is None:
            return
        message = "".join(f"{key}={value}\n" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self._address)
        except BlockingIOError:
            log.debug("systemd's notify queue is full; dropped %r", message)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self._address, exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def activated_socket(env: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening Unix socket systemd passed to this process, if any. The variables
    are removed so that tool processes do not think sockets were passed to them."""
    env = os.environ if env is None else env
    pid, count = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", "")
    env.pop("LISTEN_FDNAMES", None)
    if not pid or not count or pid != str(os.getpid()):
        return None
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    found = None
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        if found is None and sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            found = sock
        else:
            log.warning("ignoring passed fd %d: capd takes one Unix stream socket", fd)
            sock.close()
    return found


def _socket_address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("ignoring NOTIFY_SOCKET=%s: not a path or @abstract name", value)
    return None


def _watchdog_seconds(env: MutableMapping[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000
