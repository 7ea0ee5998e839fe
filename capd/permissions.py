"""Approvals of a builtin-engine pod's tool calls (docs/protocol.md, Approvals): the
manifest's `permissions` decide whether a builtin or MCP tool call runs, waits for a
person, or is refused.

Rules are tried in order; the first whose `tool` glob matches the tool's name and whose
`match` glob (when it has one) matches the call decides, else `default` does. `match` is
tried against a bash call's command, or against any other call's arguments as compact
JSON with sorted keys. Globs are `fnmatchcase`: `*` crosses `/` and newlines, so a glob on
a command is a convenience, not a boundary (the sandbox is).

`allow_always` grants: answered to a question a rule asked, that rule lets its calls run
from then on; answered to one `default` asked, the tool's calls no rule matches run (all
of the default would be every tool). The grant is recorded on the `permission_resolved`
event, so a restarted capd reads it back.
"""

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import orjson

from protocol.events import PermissionGrant
from protocol.manifest import PermissionAction, Permissions

ALLOW_ONCE, ALLOW_ALWAYS, REJECT_ONCE = "allow_once", "allow_always", "reject_once"
OPTIONS: list[dict[str, Any]] = [
    {"optionId": ALLOW_ONCE, "name": "Allow once", "kind": ALLOW_ONCE},
    {"optionId": ALLOW_ALWAYS, "name": "Allow always", "kind": ALLOW_ALWAYS},
    {"optionId": REJECT_ONCE, "name": "Reject", "kind": REJECT_ONCE},
]
"""The answers a builtin-engine pod's question offers."""
REJECTED = "the user rejected this call: not run"


@dataclass
class Grants:
    """The `allow_always` answers of a pod's life."""

    rules: set[int] = field(default_factory=set)
    tools: set[str] = field(default_factory=set)
    """Tools whose calls `default` would ask about."""

    def add(self, grant: PermissionGrant) -> None:
        if grant.rule is None:
            self.tools.add(grant.tool)
        else:
            self.rules.add(grant.rule)


def can_ask(permissions: Permissions) -> bool:
    """Whether any call could be asked about."""
    return permissions.default == "ask" or any(r.action == "ask" for r in permissions.rules)


class Gate:
    def __init__(self, permissions: Permissions, grants: Grants) -> None:
        self._permissions = permissions
        self._grants = grants

    def decide(self, name: str, arguments: dict[str, Any]) -> tuple[PermissionAction, int | None]:
        """What happens to the call, and the index of the rule that said so (None:
        `default`). An `ask` an `allow_always` granted is `allow`."""
        subject: str | None = None
        for index, rule in enumerate(self._permissions.rules):
            if not fnmatchcase(name, rule.tool):
                continue
            if rule.match is not None:
                subject = subject if subject is not None else match_subject(name, arguments)
                if not fnmatchcase(subject, rule.match):
                    continue
            if rule.action == "ask" and index in self._grants.rules:
                return "allow", index
            return rule.action, index
        default = self._permissions.default
        if default == "ask" and name in self._grants.tools:
            return "allow", None
        return default, None

    def denial(self, rule: int | None) -> str:
        """The error result of a call `rule` (None: `default`) denied."""
        if rule is None:
            return "denied by permissions.default: not run"
        denying = self._permissions.rules[rule]
        match = f", match {denying.match}" if denying.match is not None else ""
        return f"denied by permissions rule {rule} (tool {denying.tool}{match}): not run"


def match_subject(name: str, arguments: dict[str, Any]) -> str:
    """What `match` is tried against: a bash call's command, else the arguments as
    compact JSON with sorted keys."""
    command = _command(name, arguments)
    if command is not None:
        return command
    return orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS).decode()


def tool_call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A question's `tool_call`, shaped as an ACP agent's: its title is `bash: <command>`,
    or the tool's name and what `match` sees."""
    command = _command(name, arguments)
    subject = match_subject(name, arguments)
    title = f"bash: {command}" if command is not None else f"{name} {subject}"
    return {"toolCallId": call_id, "title": title, "rawInput": arguments}


def _command(name: str, arguments: dict[str, Any]) -> str | None:
    command = arguments.get("command")
    return command if name == "bash" and isinstance(command, str) else None
