"""What a capd that did not shut down left running, found and stopped by the next one.

capd stops its tools' and engines' process groups when it shuts down; a capd that is
SIGKILLed, or crashes, cannot. So every process capd starts carries CAPD_OWNER, a token
drawn at each start and kept in the state directory, and the next capd on that directory
(its lock says the old one is gone) stops the process group of every process still
carrying an old token. A token stays in the `owner` file until no process carries it: a
capd killed again before its predecessor's tools were gone leaves them to the next one.
The file also records when a token's processes were first sent SIGTERM, so a later capd
gives them only what is left of the grace before SIGKILL, however often capd dies in
between. A capd that shuts down cleanly has stopped its groups itself and removes the file
(unless some process still carries a token), so the next start skips the search. Under
systemd the unit's cgroup does all this already; this covers a capd run by hand. A process
that clears its environment escapes.
"""

import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

from capd.proc.groups import KILL_GRACE_S, terminate_group

OWNER_ENV = "CAPD_OWNER"
OWNER_FILE = "owner"

_mark: dict[str, str] = {}
"""{OWNER_ENV: this capd's token}, once `claim` has drawn it."""


def claim(state_dir: Path) -> list[int]:
    """Stop what earlier capds on `state_dir` left running (SIGTERM, then SIGKILL once the
    grace since their first SIGTERM is over) and mark what this one starts. Returns the
    process groups stopped."""
    path = state_dir / OWNER_FILE
    tokens = _read_tokens(path)
    now = time.time()
    kept: dict[str, float] = {}
    stopped: set[int] = set()
    for token, groups in _groups_marked(tokens).items():
        kept[token] = tokens[token] or now
        grace = min(KILL_GRACE_S, kept[token] + KILL_GRACE_S - now)
        for pgid in groups:
            terminate_group(pgid, grace)
        stopped |= groups
    token = secrets.token_hex(8)
    _mark[OWNER_ENV] = token
    lines = [f"{old} {since}" for old, since in kept.items()] + [token]
    written = path.with_suffix(".new")
    _write_private(written, "\n".join(lines) + "\n")
    written.replace(path)
    return sorted(stopped)


def owner_mark() -> dict[str, str]:
    """The variable `capd.proc.launcher` gives every process it starts, to mark it as this
    capd's: none before `claim`."""
    return dict(_mark)


def _read_tokens(path: Path) -> dict[str, float | None]:
    """The tokens in the owner file, each with when its processes were first sent SIGTERM
    (None for the token of the capd that wrote the file)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    tokens: dict[str, float | None] = {}
    for line in lines:
        token, _, since = line.partition(" ")
        if token:
            tokens[token] = _seconds(since)
    return tokens


def _seconds(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _groups_marked(tokens: Iterable[str]) -> dict[str, set[int]]:
    """For each token some process's environment carries, the process groups of those
    processes, sparing capd's own group and its ancestors (a capd started from a leftover
    tool)."""
    marks = {f"{OWNER_ENV}={token}".encode(): token for token in tokens}
    if not marks:
        return {}
    spared = _lineage()
    own_group = os.getpgid(0)
    found: dict[str, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            token = _token_of(entry, marks)
            if token is not None and (pgid := os.getpgid(int(entry.name))) != own_group:
                found.setdefault(token, set()).add(pgid)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _token_of(process: Path, marks: dict[bytes, str]) -> str | None:
    """The token whose mark the environment of `process` (a /proc entry) holds, if any."""
    variables = (process / "environ").read_bytes().split(b"\0")
    return next((marks[var] for var in variables if var in marks), None)


def _lineage() -> set[int]:
    """capd's pid and its ancestors'."""
    pids: set[int] = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def release(state_dir: Path) -> None:
    """A clean shutdown, with every process group stopped: nothing to search for next time,
    unless some process still carries a token."""
    path = state_dir / OWNER_FILE
    if not _groups_marked(_read_tokens(path)):
        path.unlink(missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, mode 0600: capd's files are its user's alone."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def kill_own_groups() -> None:
    """SIGKILL now every process group this capd started (a node stopping itself before
    its lease can run out: no grace, nothing of it may run on once another node adopts)."""
    for groups in _groups_marked(_mark.values()).values():
        for pgid in groups:
            terminate_group(pgid, 0)
