"""The manifest `spawn` sends: read from a YAML file, or built from its flags.

pydantic and PyYAML are imported only when a manifest is built, so the other commands
start without them (see README: Performance).
"""

import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from capctl.errors import CapctlError

if TYPE_CHECKING:
    from pydantic import ValidationError

    from protocol.manifest import Manifest

DEFAULT_MODELS = {"openai": "gpt-4.1-mini", "anthropic": "claude-sonnet-4-5"}
DEFAULT_TOOLS = ("bash", "read_file", "write_file", "edit_file")


def _describe_validation(exc: "ValidationError") -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'manifest'}: {err['msg']}"
        for err in exc.errors(include_url=False)
    )


def _validate_manifest(data: dict[str, Any], origin: Path | None = None) -> "Manifest":
    from pydantic import ValidationError

    from protocol.manifest import Manifest

    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        where = f" {origin}" if origin else ""
        raise CapctlError(f"bad manifest{where}: {_describe_validation(exc)}") from None


def manifest_from_file(path: Path, name: str | None) -> "Manifest":
    """Read a YAML manifest; a relative `cwd` is taken from the file's directory."""
    data = read_yaml(path, "manifest", f"bad manifest {path}")
    if not isinstance(data, dict):
        raise CapctlError(f"bad manifest {path}: expected a mapping of manifest fields")
    if name is not None:
        data["name"] = name
    resolve_cwd(data, path)
    return _validate_manifest(data, path)


def read_yaml(path: Path, what: str, bad: str) -> Any:
    """The YAML document in the file `path`: a one-line CapctlError when it cannot be
    read (`cannot read {what} {path}`) or parsed (`{bad}: line L, column C: problem`)."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CapctlError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise CapctlError(f"{bad}: {where}{problem}") from None


def resolve_cwd(fields: dict[str, Any], path: Path) -> None:
    """A `cwd` in a manifest's `fields` read from the file `path`, as the file means it:
    `~` expanded, a relative one taken from the file's directory."""
    if isinstance(fields.get("cwd"), str):
        cwd = os.path.expanduser(fields["cwd"])
        fields["cwd"] = os.path.normpath(os.path.join(path.parent.absolute(), cwd))


def _provider_with_key() -> str:
    """openai or anthropic when its standard key variable is set here, else scripted."""
    for provider, variable in (("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")):
        if os.environ.get(variable):
            return provider
    return "scripted"


def manifest_from_options(
    name: str,
    provider: str,
    model_name: str | None,
    base_url: str | None,
    api_key_env: str | None,
    system_prompt: str | None,
    cwd: Path | None,
    tools: tuple[str, ...],
    mcp_servers: dict[str, dict[str, Any]],
) -> "Manifest":
    if provider == "auto":
        provider = _provider_with_key()
    model: dict[str, Any] = {"provider": provider}
    if model_name or provider in DEFAULT_MODELS:
        model["name"] = model_name or DEFAULT_MODELS[provider]
    if base_url:
        model["base_url"] = base_url
    if api_key_env:
        model["api_key_env"] = api_key_env
    data: dict[str, Any] = {
        "name": name,
        "model": model,
        "cwd": os.path.abspath(cwd or os.getcwd()),
        "tools": list(tools or DEFAULT_TOOLS),
    }
    if system_prompt is not None:
        data["system_prompt"] = system_prompt
    if mcp_servers:
        data["mcp_servers"] = mcp_servers
    return _validate_manifest(data)


def mcp_servers_from_options(given: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`--mcp NAME=COMMAND` options as the manifest's `mcp_servers`: COMMAND split as a
    shell would (without expanding anything) into `command` and `args`, or a URL."""
    from protocol.manifest import MCP_SERVER_NAME_PATTERN

    servers: dict[str, dict[str, Any]] = {}
    for option in given:
        name, _, command = option.partition("=")
        if not re.fullmatch(MCP_SERVER_NAME_PATTERN, name) or "__" in name or name[-1] == "_":
            raise click.UsageError(
                f"--mcp {option!r}: NAME must be 1-32 of A-Z a-z 0-9 _ -, starting with a "
                "letter or digit, without '__' or a trailing '_' (--mcp NAME=COMMAND)"
            )
        if name in servers:
            raise click.UsageError(f"--mcp {option!r}: {name} is given twice")
        if re.match(r"https?://", command):
            servers[name] = {"url": command}
            continue
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise click.UsageError(f"--mcp {option!r}: cannot split COMMAND: {exc}") from None
        if not argv:
            raise click.UsageError(f"--mcp {option!r}: give the server's COMMAND after NAME=")
        servers[name] = {"command": argv[0], "args": argv[1:]}
    return servers
