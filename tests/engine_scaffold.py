"""What the external-engine tests share: pods on a stand-in or a real engine program, what
a stand-in logged, and the peers' side of the real ones (their processes, their requests
to the model server, Claude Code's offline environment).

The stand-ins (`tests/fakes/claude.py`, `tests/fakes/acp_agent.py`) keep their sessions
in the directory their variable names and log there, to `log.jsonl`, each start (argv,
pid, pgid, cwd) and what they read.
"""

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import CapdProcess
from tests.helpers import daemon_request, pids_with_env

FAKES = Path(__file__).parent / "fakes"


@dataclass(frozen=True)
class StandIn:
    """A stand-in engine program: the engine kind it plays, its script, and the variable
    that names its directory."""

    kind: str
    script: Path
    variable: str

    def engine(self, state: Path, **extra: Any) -> dict[str, Any]:
        """A manifest's `engine` running this stand-in on directory `state`."""
        return {
            "kind": self.kind,
            "command": [sys.executable, str(self.script)],
            "env": {self.variable: str(state)},
            **extra,
        }


UNCONFINED = {"mode": "off"}
"""The sandbox of a test that checks a stand-in's pid or process group: inside a sandbox
it would report those of its own PID namespace."""

STAND_IN_CLAUDE = StandIn("claude-code", FAKES / "claude.py", "FAKE_CLAUDE_DIR")
STAND_IN_ACP_AGENT = StandIn("acp", FAKES / "acp_agent.py", "FAKE_ACP_DIR")


async def spawn_on_engine(
    capd: CapdProcess,
    name: str,
    engine: dict[str, Any],
    parent: str | None = None,
    **manifest: Any,
) -> None:
    """Spawn pod `name` on `engine` (a manifest's `engine`), the child of `parent` if given.
    A stand-in keeps its sessions and log in its directory, as a real agent keeps its
    state: unless the test says otherwise, that directory is writable in its sandbox."""
    stand_in_dirs = [
        value
        for key, value in engine.get("env", {}).items()
        if key in (STAND_IN_CLAUDE.variable, STAND_IN_ACP_AGENT.variable)
    ]
    if stand_in_dirs and "sandbox" not in manifest:
        manifest["sandbox"] = {"writable": stand_in_dirs}
    request: dict[str, Any] = {
        "method": "spawn",
        "manifest": {"name": name, "engine": engine, **manifest},
    }
    if parent is not None:
        request["parent"] = parent
    await daemon_request(capd, request)


def stand_in_log(state: Path) -> list[dict[str, Any]]:
    """What a stand-in logged, entry by entry; empty until it starts."""
    path = state / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def engine_starts(state: Path) -> list[dict[str, Any]]:
    """Each start of a stand-in engine, as it logged it (argv, pid, pgid, cwd)."""
    return [entry for entry in stand_in_log(state) if "argv" in entry]


def groups_with_env(name: str, value: str) -> set[int]:
    """The process groups of the processes whose environment sets `name` to `value`: a
    real engine's, found by a variable given to it alone."""
    groups = set()
    for pid in pids_with_env(name, {value}):
        with contextlib.suppress(ProcessLookupError):  # gone meanwhile
            groups.add(os.getpgid(pid))
    return groups


def user_texts(request: dict[str, Any]) -> list[str]:
    """The texts of a model request's user messages (chat completions or Messages API),
    one a message."""
    texts = []
    for message in request["messages"]:
        content = message.get("content")
        if message.get("role") != "user":
            continue
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            blocks = [b for b in content if isinstance(b, dict) and b.get("type") == "text"]
            texts.append("".join(str(b.get("text", "")) for b in blocks))
    return texts


def claude_code_env(home: Path, config_dir: Path, base_url: str, api_key: str) -> dict[str, str]:
    """Claude Code's environment (the CLI's, or the one an ACP agent runs): its own HOME
    and config dir, the model server at `base_url` with a dummy key, and off, the calls it
    would make to Anthropic's servers (telemetry, error reports, update checks)."""
    return {
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(config_dir),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": api_key,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
