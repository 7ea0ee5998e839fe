"""`capctl apply -f FILE` and `capctl down -f FILE`: read a team file and check it here
(each error names the file, the pod and the field), send it to capd, which checks it
against its pods and does the work, and print what capd did."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from capctl.errors import CapctlError
from capctl.manifest import read_yaml, resolve_cwd

if TYPE_CHECKING:
    from pydantic import ValidationError

    from protocol.team import TeamFile


def read_team(path: Path) -> "TeamFile":
    """The team file, checked; a relative `cwd` is taken from the file's directory."""
    from pydantic import ValidationError

    from protocol.team import TeamFile

    data = read_yaml(path, "team file", str(path))
    if not isinstance(data, dict):
        raise CapctlError(f"{path}: expected a mapping with `team` and `pods`")
    pods = data.get("pods")
    for pod in pods if isinstance(pods, list) else []:
        if isinstance(pod, dict):
            resolve_cwd(pod, path)
    try:
        return TeamFile.model_validate(data)
    except ValidationError as exc:
        raise CapctlError(f"{path}: {describe(exc, data)}") from None


def team_name(path: Path) -> str:
    """Only the file's `team`, which is all `down` sends: a file whose pods no longer
    check can still bring its team down."""
    import re

    from protocol.paths import POD_NAME_PATTERN

    data = read_yaml(path, "team file", str(path))
    team = data.get("team") if isinstance(data, dict) else None
    if not isinstance(team, str) or re.fullmatch(POD_NAME_PATTERN, team) is None:
        raise CapctlError(f"{path}: team: expected the team's name ({POD_NAME_PATTERN})")
    return team


def describe(exc: "ValidationError", data: dict[str, Any]) -> str:
    """pydantic's errors as `pod NAME (pods[i]): field: what`, `team: what`, or the
    file-level check's own words."""
    pods = data.get("pods")
    lines = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if not loc:
            lines.append(message)
            continue
        where = ""
        if loc[0] == "pods" and len(loc) > 1 and isinstance(loc[1], int):
            index = loc[1]
            pod = pods[index] if isinstance(pods, list) and index < len(pods) else None
            name = pod.get("name") if isinstance(pod, dict) else None
            where = f"pod {name} (pods[{index}])" if isinstance(name, str) else f"pods[{index}]"
            loc = loc[2:]
        field = ".".join(str(part) for part in loc)
        lines.append(": ".join(part for part in (where, field, message) if part))
    return "; ".join(lines)


def plan_lines(plan: list[dict[str, Any]]) -> list[str]:
    """One line per step: `+ spawn lead`, `~ reconfigure tester (tools, system_prompt)`."""
    from protocol.team import PLAN_SYMBOLS

    lines = []
    for step in plan:
        action = step.get("action", "?")
        line = f"{PLAN_SYMBOLS.get(action, '?')} {action} {step.get('pod')}"
        if changed := step.get("changed"):
            line += f" ({', '.join(changed)})"
        if note := step.get("note"):
            line += f": {note}"
        lines.append(line)
    return lines


async def send(runtime: Path, path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One request on the daemon socket, waiting as long as capd works on it; capd's
    refusal is prefixed with the file's name."""
    from protocol.client import Client
    from protocol.errors import ProtocolError
    from protocol.paths import daemon_socket

    socket = daemon_socket(runtime)
    try:
        daemon = await Client.connect(socket)
    except OSError as exc:
        raise CapctlError(f"cannot reach capd at {socket}: {exc.strerror or exc}") from None
    async with daemon:
        try:
            return await daemon.request(request, timeout=None)
        except ProtocolError as exc:
            raise CapctlError(f"{path}: {exc.code}: {exc.message}") from None
