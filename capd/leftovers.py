"""What a capd that did not shut down left running, found and stopped by the next one.

capd stops its tools' and engines' process groups when it shuts down; a capd that is
SIGKILLed, or crashes, cannot. So every process capd starts inherits CAPD_OWNER, a token
drawn at each start and kept in the state directory, and the next capd on that directory
(its lock says the old one is gone) stops the process group of every process still
carrying the old token. A capd that shuts down cleanly has stopped its groups itself and
removes the token, so the next start skips the search. Under systemd the unit's cgroup
does all this already; this covers a capd run by hand. A process that clears its
environment escapes.
"""

import os
import secrets
from pathlib import Path

from capd.groups import terminate_group

OWNER_ENV = "CAPD_OWNER"
OWNER_FILE = "owner"


def claim(state_dir: Path) -> list[int]:
    """Stop what the last capd on `state_dir` left running (SIGTERM now, SIGKILL after
    the grace) and mark what this one starts. Returns the process groups stopped."""
    path = state_dir / OWNER_FILE
    try:
        previous = path.read_text().strip()
    except FileNotFoundError:
        previous = ""
    groups = sorted(_groups_marked(previous)) if previous else []
    for pgid in groups:
        terminate_group(pgid)
    token = secrets.token_hex(8)
    os.environ[OWNER_ENV] = token
    written = path.with_suffix(".new")
    _write_private(written, token)
    written.replace(path)
    return groups


def _groups_marked(token: str) -> set[int]:
    """Process groups of the processes whose environment carries `token`, sparing capd's
    own group and its ancestors (a capd started from a leftover tool)."""
    mark = f"{OWNER_ENV}={token}".encode()
    spared = _lineage()
    groups: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                groups.add(os.getpgid(int(entry.name)))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    groups.discard(os.getpgid(0))
    return groups


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
    """A clean shutdown, with every process group stopped: nothing to search for next time."""
    (state_dir / OWNER_FILE).unlink(missing_ok=True)


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, mode 0600: capd's files are its user's alone."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
