"""Real MCP servers nobody here wrote, installed by the tests themselves (pinned) into a
cache outside the repo, once per machine: `mcp-server-time` and `mcp-server-git` from PyPI
in a virtualenv of their own (their `mcp` pin must not steer capd's), and
`@modelcontextprotocol/server-everything` from npm (stdio and Streamable HTTP).

Two xdist workers may ask at once: a file lock makes one install while the other waits.
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYTHON_SERVERS = ("mcp-server-time==2026.10.19", "mcp-server-git==2026.10.19")
EVERYTHING = "@modelcontextprotocol/server-everything@2026.8.31"
INSTALL_TIMEOUT_S = 600


@dataclass(frozen=True)
class McpServerCommands:
    time: list[str]
    """`mcp-server-time`: tools get_current_time, convert_time."""
    git: list[str]
    """`mcp-server-git`; add `--repository PATH`."""
    everything: list[str]
    """server-everything; add `stdio` or `streamableHttp` (that one reads PORT)."""


def _root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    pins = "\n".join((*PYTHON_SERVERS, EVERYTHING, sys.version))
    digest = hashlib.sha256(pins.encode()).hexdigest()[:12]
    return Path(os.environ.get("CAPD_MCP_SERVERS", Path(cache) / "capd" / "mcp" / digest))


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(
            f"installing the test MCP servers failed: {' '.join(argv)} exited "
            f"{done.returncode}: {(done.stderr or done.stdout)[-2000:]}"
        )


def install() -> McpServerCommands:
    """Install the servers unless a previous run did; return how to start each."""
    root = _root()
    root.mkdir(parents=True, exist_ok=True)
    venv, npm = root / "venv", root / "npm"
    commands = McpServerCommands(
        time=[str(venv / "bin" / "mcp-server-time")],
        git=[str(venv / "bin" / "mcp-server-git")],
        everything=[
            shutil.which("node") or "node",
            str(
                npm
                / "node_modules"
                / "@modelcontextprotocol"
                / "server-everything"
                / "dist"
                / "index.js"
            ),
        ],
    )
    with (root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "installed").exists():
            shutil.rmtree(venv, ignore_errors=True)
            _run([sys.executable, "-m", "venv", str(venv)])
            _run([str(venv / "bin" / "pip"), "install", "-q", *PYTHON_SERVERS])
            if shutil.which("npm") is None:
                raise RuntimeError("the MCP tests need node >= 18 and npm; install them")
            npm.mkdir(exist_ok=True)
            _run(
                [
                    "npm",
                    "install",
                    "--prefix",
                    str(npm),
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    EVERYTHING,
                ]
            )
            (root / "installed").write_text("\n".join((*PYTHON_SERVERS, EVERYTHING)) + "\n")
    return commands


def time_and_everything(commands: McpServerCommands) -> dict[str, dict[str, Any]]:
    """`mcp_servers` for a real engine's own MCP client: mcp-server-time (in UTC) as `time`
    and server-everything over stdio as `ev`, whose environment gets
    `${CAPD_TEST_MCP_TOKEN}` as CAPD_TOKEN_SEEN (its `get-env` tool shows it)."""
    time_command, *time_args = commands.time
    node, everything = commands.everything
    return {
        "time": {"command": time_command, "args": [*time_args, "--local-timezone", "UTC"]},
        "ev": {
            "command": node,
            "args": [everything, "stdio"],
            "env": {"CAPD_TOKEN_SEEN": "${CAPD_TEST_MCP_TOKEN}"},
        },
    }
