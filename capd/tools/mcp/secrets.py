"""`${VAR}` in an MCP server's `env` and `headers` values (§12), read from capd's
environment when the server is started or handed to an engine. The manifest keeps the
text as written, so values never reach the store, events, logs or `status`."""

import re
from collections.abc import Mapping

_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class MissingVariable(Exception):
    """A `${VAR}` without a default names a variable capd's environment lacks."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"${{{name}}} is not set in capd's environment; set it where capd starts "
            f"(e.g. Environment={name}=... in its systemd unit) or write ${{{name}:-default}}"
        )
        self.name = name


def expand(value: str, environ: Mapping[str, str]) -> str:
    """`value` with each `${VAR}` replaced by the variable, and `${VAR:-default}` by the
    variable or, when it is unset or empty, the default (as a shell and Claude Code do)."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = environ.get(name)
        if found:
            return found
        if default is not None:
            return default
        if found is not None:
            return found
        raise MissingVariable(name)

    return _REFERENCE.sub(replace, value)


def expand_all(values: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    return {key: expand(value, environ) for key, value in values.items()}


def referenced(values: Mapping[str, str]) -> list[str]:
    """The variables `values` read, in order, each once."""
    names = [m.group(1) for value in values.values() for m in _REFERENCE.finditer(value)]
    return list(dict.fromkeys(names))
