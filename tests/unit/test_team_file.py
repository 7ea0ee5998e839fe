"""A team file checked by capctl, with no daemon: each error names the file, the pod and
the field; a relative cwd is taken from the file's directory."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from capctl.errors import CapctlError
from capctl.team import plan_lines, read_team

MODEL = {"provider": "scripted"}


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "team.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _error(tmp_path: Path, data: Any) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(CapctlError) as raised:
        read_team(path)
    message = raised.value.message
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message.removeprefix(f"{path}: ")


def _pods(*pods: dict[str, Any], team: str = "pay") -> dict[str, Any]:
    return {"team": team, "pods": [{"model": MODEL} | pod for pod in pods]}


def test_a_relative_cwd_is_the_files_directory(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    team = read_team(_write(tmp_path, _pods({"name": "lead", "cwd": "src"}, {"name": "b"})))
    assert team.team == "pay"
    assert [pod.cwd for pod in team.pods] == [str(tmp_path / "src"), None]


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        (
            [{"name": "lead"}, {"name": "tester", "engine": {"kind": "nope"}}],
            "pod tester (pods[1]): engine: Input tag 'nope' found using 'kind' does not match",
        ),
        (
            [{"name": "lead"}, {"name": "tester", "tools": ["bash", "nope"]}],
            "pod tester (pods[1]): tools.1: Input should be",
        ),
        ([{"name": "lead", "colour": "red"}], "pod lead (pods[0]): colour: Extra inputs"),
        ([{"name": "Bad Name"}], "pod Bad Name (pods[0]): name: String should match pattern"),
        (
            [{"name": "lead"}, {"name": "tester", "parent": "lead2"}],
            "pod tester: parent: lead2 is not a pod of the file",
        ),
        ([{"name": "a"}, {"name": "a"}], "pod a: name: listed twice"),
        (
            [{"name": "a", "parent": "b"}, {"name": "b", "parent": "a"}],
            "pod a: parent: the parents make a cycle (a → b → a)",
        ),
        ([{"name": "a", "parent": "a"}], "pod a: parent: the parents make a cycle (a → a)"),
        (
            [
                {"name": "root", "limits": {"max_depth": 1}},
                {"name": "kid", "parent": "root"},
                {"name": "grandkid", "parent": "kid"},
            ],
            "pod grandkid: parent: it would be 2 levels below pod root, more than its "
            "limits.max_depth=1",
        ),
        (
            [
                {"name": "root", "limits": {"max_children": 1}},
                {"name": "a", "parent": "root"},
                {"name": "b", "parent": "root"},
            ],
            "pod root: limits.max_children: it has 2 children in the file (a, b), more than "
            "its limits.max_children=1",
        ),
    ],
)
def test_an_error_names_the_pod_and_the_field(
    tmp_path: Path, pods: list[dict[str, Any]], expected: str
) -> None:
    assert _error(tmp_path, _pods(*pods)).startswith(expected)


def test_file_level_errors(tmp_path: Path) -> None:
    assert _error(tmp_path, "team: [").startswith("line 1, column 8: ")
    assert _error(tmp_path, "- a\n") == "expected a mapping with `team` and `pods`"
    assert _error(tmp_path, {"team": "pay", "pods": []}).startswith("pods: List should have")
    assert _error(tmp_path, _pods({"name": "a"}, team="No")).startswith(
        "team: String should match pattern"
    )
    with pytest.raises(CapctlError, match="cannot read team file"):
        read_team(tmp_path / "missing.yaml")


def test_plan_lines() -> None:
    plan = [
        {"pod": "lead", "action": "spawn"},
        {"pod": "tester", "action": "reconfigure", "changed": ["tools", "system_prompt"]},
        {"pod": "x", "action": "start", "note": "paused: `capctl resume x`"},
        {"pod": "old", "action": "delete"},
        {"pod": "y", "action": "unchanged"},
        {"pod": "z", "action": "deferred", "changed": ["tools"], "note": "it runs"},
    ]
    assert plan_lines(plan) == [
        "+ spawn lead",
        "~ reconfigure tester (tools, system_prompt)",
        "> start x: paused: `capctl resume x`",
        "- delete old",
        "= unchanged y",
        "… deferred z (tools): it runs",
    ]
