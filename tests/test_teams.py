"""Teams (§16): `spawn {team}`, `capctl apply -f FILE` and `capctl down -f FILE` against a
real capd, with scripted models."""

from pathlib import Path

import pytest

from tests.conftest import CapdProcess
from tests.helpers import connect_pod, daemon_request, scripted
from tests.test_capctl import ok

pytestmark = pytest.mark.shared_capd


async def test_spawn_team_is_in_list_status_and_ps(capd: CapdProcess, tmp_path: Path) -> None:
    for name, team in (("tm1", "pay"), ("tm2", None)):
        manifest = {"name": name, "model": scripted(), "cwd": str(tmp_path)}
        await daemon_request(capd, {"method": "spawn", "manifest": manifest, "team": team})
    listed = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert {pod["name"]: pod["team"] for pod in listed} == {"tm1": "pay", "tm2": None}
    async with await connect_pod(capd, "tm1", subscribe=False) as pod:
        assert (await pod.request({"method": "status"}))["team"] == "pay"
    header, *rows = ok(capd.runtime_dir, "ps").splitlines()
    column = header.split().index("TEAM")
    assert {row.split()[0]: row.split()[column] for row in rows} == {"tm1": "pay", "tm2": "-"}
    await daemon_request(capd, {"method": "stop", "name": "tm1"})
    await daemon_request(capd, {"method": "start", "name": "tm1"})
    async with await connect_pod(capd, "tm1", subscribe=False) as pod:
        assert (await pod.request({"method": "status"}))["team"] == "pay"
