"""A child's sandbox and resource limits are no wider than its parent's (docs/protocol.md,
Children), whether `spawn_pod` makes it or a client's `spawn` with a `parent`."""

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.helpers import connect_pod, daemon_request, is_event, scripted, spawn, wait_for

pytestmark = pytest.mark.shared_capd

ENV = ["PATH", "HOME"]
PERMISSIONS = {"default": "allow", "rules": [{"tool": "bash", "match": "rm *", "action": "deny"}]}


def _parent_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The parent's cwd, a writable path and a hidden path, outside each other."""
    dirs = tuple(tmp_path / name for name in ("boss", "shared", "secret"))
    for directory in dirs:
        directory.mkdir()
    return dirs  # type: ignore[return-value]


def _sandbox(writable: Path, hidden: Path, **changes: Any) -> dict[str, Any]:
    return {
        "mode": "workspace-write",
        "network": False,
        "writable": [str(writable)],
        "env": ENV,
        "hidden": [str(hidden)],
        **changes,
    }


def _stored_manifest(capd: CapdProcess, name: str) -> dict[str, Any]:
    with sqlite3.connect(capd.state_dir / "capd.db") as db:
        (row,) = db.execute("SELECT manifest FROM pods WHERE name = ?", (name,))
    return dict(json.loads(row[0]))


async def test_spawn_pod_narrows_the_callers_sandbox_and_refuses_to_widen_it(
    capd: CapdProcess, tmp_path: Path
) -> None:
    home, shared, secret = _parent_dirs(tmp_path)
    attempts: dict[str, dict[str, Any]] = {
        "network": {"network": True},
        "mode": {"mode": "off"},
        "writable": {"writable": [str(tmp_path)]},
        "env": {"env": [*ENV, "OPENAI_API_KEY"]},
        "hidden": {"hidden": []},
        "bad-mode": {"mode": "open"},
        "bad-field": {"netwrok": True},
        "narrower": {"mode": "read-only", "writable": [], "hidden": [str(secret), str(shared)]},
    }
    calls = [
        {
            "name": "spawn_pod",
            "arguments": {"name": f"c-{key}", "task": "x", "sandbox": sandbox},
        }
        for key, sandbox in attempts.items()
    ]
    calls.append({"name": "spawn_pod", "arguments": {"name": "c-same", "task": "x"}})
    await spawn(
        capd,
        "boss",
        scripted({"tool_calls": calls}, {"text": "done"}),
        cwd=str(home),
        tools=["read_file", "write_file", "spawn_pod"],
        sandbox=_sandbox(shared, secret),
        permissions=PERMISSIONS,
        limits={"memory_mb": 256, "pids": 64, "max_children": 10},
    )
    async with await connect_pod(capd, "boss") as boss:
        await boss.request({"method": "run", "text": "try"})
        _, seen = await wait_for(boss, is_event("turn_end"))
    results = [e for e in seen if e["event"] == "tool_result"]
    outputs = dict(zip([*attempts, "same"], results, strict=True))
    refused = {key: e["output"] for key, e in outputs.items() if e["is_error"]}
    assert set(refused) == set(attempts) - {"narrower"}, outputs
    expected = {
        "network": "sandbox.network is true, but parent pod boss has no network",
        "mode": "sandbox.mode off is wider than parent pod boss's workspace-write",
        "writable": f"sandbox.writable {tmp_path} lies outside parent pod boss's cwd and "
        f"writable paths ({home}, {shared})",
        "env": "sandbox.env OPENAI_API_KEY is not among parent pod boss's variables (PATH, HOME)",
        "hidden": f"sandbox.hidden leaves out parent pod boss's hidden {secret}",
        "bad-mode": "sandbox.mode: Input should be 'workspace-write', 'read-only' or 'off'",
        "bad-field": "sandbox.netwrok: Extra inputs are not permitted",
    }
    for key, needle in expected.items():
        assert needle in refused[key], (key, refused[key])
    narrower = _stored_manifest(capd, "c-narrower")
    assert narrower["sandbox"] == {**_sandbox(shared, secret), **attempts["narrower"]}
    same = _stored_manifest(capd, "c-same")
    assert same["sandbox"] == _sandbox(shared, secret)
    assert same["permissions"] == PERMISSIONS
    assert (same["limits"]["memory_mb"], same["limits"]["pids"]) == (256, 64)
    listing = await daemon_request(capd, {"method": "list"})
    assert sorted(p["name"] for p in listing["pods"]) == ["boss", "c-narrower", "c-same"]


async def _spawn_child(capd: CapdProcess, name: str, parent: str, **manifest: Any) -> None:
    await daemon_request(
        capd,
        {
            "method": "spawn",
            "manifest": {"name": name, "model": scripted(), **manifest},
            "parent": str(capd.pod_socket(parent)),
        },
    )


async def test_a_client_spawned_child_is_held_to_its_parents_sandbox_and_limits(
    capd: CapdProcess, tmp_path: Path
) -> None:
    home, shared, secret = _parent_dirs(tmp_path)
    limits = {"memory_mb": 256, "pids": 64}
    parent = {"cwd": str(home), "sandbox": _sandbox(shared, secret), "limits": limits}
    await spawn(capd, "boss", scripted(), **parent)
    inside = shared / "sub"
    inside.mkdir()
    refusals = {
        "network": (_sandbox(shared, secret, network=True), limits, "sandbox.network is true"),
        "mode": (
            _sandbox(shared, secret, mode="off"),
            limits,
            "sandbox.mode off is wider",
        ),
        "writable": (
            _sandbox(tmp_path / "elsewhere", secret),
            limits,
            f"sandbox.writable {tmp_path / 'elsewhere'} lies outside",
        ),
        "default env": (
            {**_sandbox(shared, secret), "env": None},
            limits,
            "sandbox.env LANG, LC_ALL, LC_CTYPE, TERM, TZ, USER, LOGNAME is not among",
        ),
        "hidden": ({**_sandbox(shared, secret), "hidden": []}, limits, "sandbox.hidden leaves out"),
        "memory": (
            _sandbox(shared, secret),
            {**limits, "memory_mb": 512},
            "limits.memory_mb 512 is more than parent pod boss's 256",
        ),
        "memory unset": (
            _sandbox(shared, secret),
            {"pids": 64},
            "limits.memory_mb unset is more than parent pod boss's 256",
        ),
        "pids": (
            _sandbox(shared, secret),
            {**limits, "pids": 65},
            "limits.pids 65 is more than parent pod boss's 64",
        ),
    }
    for key, (sandbox, child_limits, needle) in refusals.items():
        with pytest.raises(ProtocolError) as refused:
            await _spawn_child(
                capd, "kid", "boss", cwd=str(home), sandbox=sandbox, limits=child_limits
            )
        message = refused.value.message
        assert (refused.value.code, needle in message) == ("forbidden", True), (key, message)
    narrower = _sandbox(inside, tmp_path)  # tmp_path hides all the parent hides, and more
    await _spawn_child(
        capd, "kid", "boss", cwd=str(home), sandbox=narrower, limits={"memory_mb": 64, "pids": 8}
    )
    listing = await daemon_request(capd, {"method": "list"})
    assert sorted(p["name"] for p in listing["pods"]) == ["boss", "kid"]


async def test_an_unconfined_parent_may_have_any_child_but_not_more_memory(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn(
        capd, "free", scripted(), cwd=str(tmp_path), sandbox={"mode": "off"}, limits={"pids": 64}
    )
    with pytest.raises(ProtocolError) as refused:
        await _spawn_child(capd, "kid", "free", cwd=str(tmp_path), limits={"pids": 100})
    assert "limits.pids 100 is more than parent pod free's 64" in refused.value.message
    await _spawn_child(
        capd,
        "kid",
        "free",
        cwd=str(tmp_path),
        sandbox={"mode": "off", "env": ["PATH", "OPENAI_API_KEY"]},
        limits={"pids": 64, "memory_mb": 4096},
    )


async def test_a_child_cannot_work_or_write_in_what_its_parent_hides(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """A child's sandbox shows its cwd and writable paths even under a hidden path: one
    inside its parent's hidden paths would let the parent's model read and write them
    through the child (the review's test_rv19_child_hidden.py). The parent is read-only:
    a hidden path inside a writable cwd is refused already (test_sandbox.py)."""
    home, _, _ = _parent_dirs(tmp_path)
    secrets, private = home / "secrets", home / "private"
    for hidden in (secrets, private):
        hidden.mkdir()
        (hidden / "key").write_text("TOPSECRET\n")
    sandbox = {
        "mode": "read-only",
        "network": False,
        "env": ENV,
        "hidden": [str(secrets), str(private)],
    }
    attempts: dict[str, dict[str, Any]] = {
        "cwd": {"cwd": "secrets"},
        "cwd below": {"cwd": "secrets/deep"},
        "writable": {"sandbox": {**sandbox, "writable": [str(secrets)]}},
        "writable below": {"sandbox": {**sandbox, "writable": [str(private / "out")]}},
    }
    calls = [
        {"name": "spawn_pod", "arguments": {"name": f"c{n}", "task": "x", **args}}
        for n, args in enumerate(attempts.values())
    ]
    await spawn(
        capd,
        "boss",
        scripted({"tool_calls": calls}, {"text": "done"}),
        cwd=str(home),
        tools=["spawn_pod"],
        sandbox=sandbox,
    )
    async with await connect_pod(capd, "boss") as boss:
        await boss.request({"method": "run", "text": "try"})
        _, seen = await wait_for(boss, is_event("turn_end"))
    results = [e for e in seen if e["event"] == "tool_result"]
    expected = {
        "cwd": f"cwd {secrets} lies inside {secrets}",
        "cwd below": f"cwd {secrets / 'deep'} lies inside {secrets}",
        "writable": f"sandbox.writable {secrets} lies inside {secrets}",
        "writable below": f"sandbox.writable {private / 'out'} lies inside {private}",
    }
    for (key, needle), result in zip(expected.items(), results, strict=True):
        assert result["is_error"], (key, result)
        assert f"{needle}, which parent pod boss hides (sandbox.hidden)" in result["output"], (
            key,
            result["output"],
        )
    with pytest.raises(ProtocolError) as refused:
        await _spawn_child(capd, "kid", "boss", cwd=str(secrets), sandbox=sandbox)
    assert refused.value.code == "forbidden"
    assert f"cwd {secrets} lies inside {secrets}, which parent pod boss hides" in (
        refused.value.message
    )
    listing = await daemon_request(capd, {"method": "list"})
    assert [p["name"] for p in listing["pods"]] == ["boss"]
    assert sorted(p.name for p in secrets.iterdir()) == ["key"]
