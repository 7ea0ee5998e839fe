"""A real terminal for tests of full-screen commands (`capctl top`, `capctl attach`).

`Screen` runs a command in a private tmux server (its own socket, no user config), types
into it with `send-keys` and reads what a person would see with `capture-pane`. Waiting is
event-driven: a control-mode client reports every write to the pane, and the screen is
read again only then, so there are no fixed sleeps.
"""

import os
import re
import select
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import pytest

CONF = "\n".join(
    [
        "set -g remain-on-exit on",
        "set -g history-limit 5000",
        'set -g default-terminal "xterm-256color"',
        "set -g status off",
        "",
    ]
)
"""Set before the command starts: keep a dead pane readable (its last screen and exit
status), no status line taking a row from the command."""

Pattern = str | re.Pattern[str]


def require_tmux() -> str:
    """tmux's path, or skip the test with the reason (`.ci/run` installs it)."""
    path = shutil.which("tmux")
    if path is None:
        pytest.skip("tmux is not installed (apt-get install tmux; .ci/run does)")
    return path


class Screen:
    """`argv` running in a `width` by `height` terminal, with `env` as its whole environment."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        width: int = 120,
        height: int = 40,
        conf_dir: Path,
    ) -> None:
        self._tmux = require_tmux()
        self._server = f"capd-test-{uuid.uuid4().hex[:12]}"
        conf = conf_dir / f"{self._server}.conf"
        conf.write_text(CONF)
        self._env = dict(os.environ if env is None else env)
        self._env.pop("TMUX", None)
        for size in ("COLUMNS", "LINES"):  # pytest-xdist's workers set 80x24; textual obeys
            self._env.pop(size, None)
        command = shlex.join(argv)
        self._run(
            "-f", str(conf), "new-session", "-d", "-s", "t", "-x", str(width), "-y",
            str(height), *(["-c", str(cwd)] if cwd else []), command,
        )  # fmt: skip
        self._control = subprocess.Popen(
            [self._tmux, "-L", self._server, "-C", "attach", "-t", "t"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=self._env,
        )
        assert self._control.stdout is not None
        os.set_blocking(self._control.stdout.fileno(), False)

    def __enter__(self) -> "Screen":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- acting ---------------------------------------------------------------------------

    def keys(self, *keys: str) -> None:
        """Press keys by tmux's names: `Enter`, `Escape`, `C-c`, `Down`, `NPage`, `q`."""
        self._run("send-keys", "-t", "t", *keys)

    def type(self, text: str) -> None:
        """Type `text` literally (no key names), without Enter."""
        self._run("send-keys", "-t", "t", "-l", text)

    # -- reading --------------------------------------------------------------------------

    def text(self, history: bool = False) -> str:
        """The visible screen, one line per row, trailing blanks removed; with `history`,
        the lines scrolled off it first (where tmux puts a dead pane's last output)."""
        return self._run("capture-pane", "-p", *(["-S", "-"] if history else []), "-t", "t")

    def wait_for(self, pattern: Pattern, timeout: float = 20.0) -> str:
        """The screen once `pattern` (a substring or a regex) is on it; fails with the
        screen as it was at the deadline."""
        return self._wait(lambda screen: _found(pattern, screen), f"{pattern!r} to appear", timeout)

    def wait_gone(self, pattern: Pattern, timeout: float = 20.0) -> str:
        """The screen once `pattern` is no longer on it."""
        return self._wait(
            lambda screen: not _found(pattern, screen), f"{pattern!r} to go away", timeout
        )

    def wait_exit(self, timeout: float = 20.0) -> int:
        """The command's exit status, once it has exited."""
        deadline = time.monotonic() + timeout
        while True:
            dead, pid, status = self._run(
                "display-message", "-p", "-t", "t", "#{pane_dead} #{pane_pid} #{pane_dead_status}"
            ).split(" ")
            if dead == "1" and status:
                return int(status)
            if dead == "1" and (zombie := _zombie_status(pid)) is not None:
                return zombie
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the command did not exit in {timeout} s:\n{self.text()}")
            self._changes(min(left, 0.1))

    def close(self) -> None:
        """Stop the command, the control client and the private server."""
        self._control.kill()
        self._control.wait()
        for stream in (self._control.stdin, self._control.stdout):
            if stream is not None:
                stream.close()
        subprocess.run(
            [self._tmux, "-L", self._server, "kill-server"],
            capture_output=True,
            env=self._env,
            check=False,
        )

    # -- inside -----------------------------------------------------------------------------

    def _wait(self, done: Callable[[str], bool], what: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.text()
            if done(screen):
                return screen
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"waited {timeout} s for {what}; the screen:\n{screen}")
            self._changes(left)

    def _changes(self, timeout: float) -> None:
        """Block until the pane writes something (or `timeout` passes), and drain what the
        control client reported, so its pipe never fills."""
        assert self._control.stdout is not None
        fd = self._control.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        while ready:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            ready, _, _ = select.select([fd], [], [], 0)

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [self._tmux, "-L", self._server, *args],
            capture_output=True,
            text=True,
            env=self._env,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout.rstrip("\n")


def _zombie_status(pid: str) -> int | None:
    """The exit status of an exited process its parent has not reaped yet: tmux 3.3a now
    and then leaves a dead pane's process a zombie, with no #{pane_dead_status}, for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields[0] != "Z":
        return None
    return os.waitstatus_to_exitcode(int(fields[-1]))


def _found(pattern: Pattern, screen: str) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.search(screen) is not None
    return pattern in screen
