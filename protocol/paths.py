"""Runtime and state directory resolution (docs/protocol.md, Paths and names), shared by
capd and capctl."""

import os
import re
from pathlib import Path

POD_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,47}$"
POD_NAME_RE = re.compile(POD_NAME_PATTERN)
NODE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
"""§15: a fleet node's name (`capd --node`); the default is the host name, lower-cased."""


def runtime_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    for var in ("CAPD_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        if value := os.environ.get(var):
            return Path(value.split(":")[0])
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "capd"
    return Path(f"/tmp/capd-{os.getuid()}")


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    for var in ("CAPD_STATE_DIR", "STATE_DIRECTORY"):
        if value := os.environ.get(var):
            return Path(value.split(":")[0])
    if xdg := os.environ.get("XDG_STATE_HOME"):
        return Path(xdg) / "capd"
    return Path.home() / ".local" / "state" / "capd"


def daemon_socket(runtime: Path) -> Path:
    return runtime / "capd.sock"


def pods_dir(runtime: Path) -> Path:
    """Where the pods' sockets are."""
    return runtime / "pods"


def pod_socket(runtime: Path, name: str) -> Path:
    return pods_dir(runtime) / f"{name}.sock"
