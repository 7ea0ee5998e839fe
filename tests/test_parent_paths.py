"""A `parent` is a path, and one socket has many spellings: `..`, a symlink to the runtime
dir, a symlink to the socket. Whichever a client uses, capd must see its own pod there, so
the child rules hold and the child joins the parent's family (issue 14, finding 3)."""

import os
from pathlib import Path

import pytest

from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.helpers import connect_pod, daemon_request, scripted, spawn

pytestmark = pytest.mark.shared_capd


def _spelled(capd: CapdProcess, tmp_path: Path, how: str) -> str:
    """Pod `boss`'s socket path, written the way `how` says."""
    if how == "dotdot":
        return f"{capd.runtime_dir}/pods/../pods/boss.sock"
    if how == "runtime-dir-symlink":
        (tmp_path / "rt").symlink_to(capd.runtime_dir)
        return str(tmp_path / "rt" / "pods" / "boss.sock")
    (tmp_path / "boss.sock").symlink_to(capd.pod_socket("boss"))
    return str(tmp_path / "boss.sock")


async def _spawn_child(capd: CapdProcess, name: str, parent: str, **manifest: object) -> None:
    await daemon_request(
        capd,
        {
            "method": "spawn",
            "manifest": {"name": name, "model": scripted(), **manifest},
            "parent": parent,
        },
    )


@pytest.mark.parametrize("how", ["dotdot", "runtime-dir-symlink", "socket-symlink"])
async def test_a_parent_however_spelled_is_held_to_the_child_rules(
    capd: CapdProcess, tmp_path: Path, how: str
) -> None:
    home = tmp_path / "boss"
    home.mkdir()
    await spawn(capd, "boss", scripted(), cwd=str(home), tools=["read_file"])
    parent = _spelled(capd, tmp_path, how)

    with pytest.raises(ProtocolError) as outside:
        await _spawn_child(capd, "out", parent, cwd=str(tmp_path), tools=["read_file"])
    with pytest.raises(ProtocolError) as more_tools:
        await _spawn_child(capd, "greedy", parent, cwd=str(home), tools=["bash"])
    await _spawn_child(capd, "kid", parent, cwd=str(home), tools=["read_file"])

    assert (outside.value.code, more_tools.value.code) == ("forbidden", "forbidden")
    assert f"is outside {home}, the cwd of parent pod boss" in outside.value.message
    assert "tools bash are not among parent pod boss's tools" in more_tools.value.message
    async with await connect_pod(capd, "boss", subscribe=False) as boss:
        assert (await boss.request({"method": "status"}))["children"] == ["kid"]
    pods = {p["name"]: p for p in (await daemon_request(capd, {"method": "list"}))["pods"]}
    assert sorted(pods) == ["boss", "kid"]
    assert pods["kid"]["parent"] == str(capd.pod_socket("boss")), "stored as capd spells it"

    await daemon_request(capd, {"method": "stop", "name": "boss"})
    pods = {p["name"]: p for p in (await daemon_request(capd, {"method": "list"}))["pods"]}
    assert (pods["boss"]["status"], pods["kid"]["status"]) == ("stopped", "stopped")


async def test_a_parent_outside_capd_is_kept_as_written(capd: CapdProcess, tmp_path: Path) -> None:
    """A socket that is no pod of this capd is an external parent: no rules, no rewrite."""
    parent = f"{tmp_path}/../{tmp_path.name}/elsewhere.sock"
    await _spawn_child(capd, "kid", parent, cwd=str(tmp_path), tools=["bash"])
    pods = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert [(p["name"], p["parent"]) for p in pods] == [("kid", parent)]


async def test_a_parent_with_a_nul_byte_is_refused(capd: CapdProcess) -> None:
    with pytest.raises(ProtocolError) as refused:
        await _spawn_child(capd, "kid", f"{capd.runtime_dir}/pods/boss\0.sock")
    assert refused.value.code == "invalid_request"
    assert "must be an absolute socket path" in refused.value.message
    assert os.listdir(capd.runtime_dir / "pods") == []


async def test_a_parent_in_the_pods_dir_must_be_a_pod(capd: CapdProcess, tmp_path: Path) -> None:
    """Not an external parent: no other capd serves this runtime dir, so the name is wrong
    (a typo, or a pod yet to come that would find a child it never accepted)."""
    with pytest.raises(ProtocolError) as refused:
        await _spawn_child(capd, "kid", f"{capd.runtime_dir}/pods/../pods/bos.sock")
    assert refused.value.code == "not_found"
    assert refused.value.message == (
        f"parent {capd.pod_socket('bos')} is in capd's pods directory but no pod named bos "
        "exists; spawn the parent first"
    )
    assert (await daemon_request(capd, {"method": "list"}))["pods"] == []
