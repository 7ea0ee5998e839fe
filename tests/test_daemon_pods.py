"""Pod methods on the daemon socket, naming the pod in `pod` (docs/protocol.md, Many
machines), and the node this capd is (`capd --node`)."""

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capd.config import default_node_name
from protocol.client import Client
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.helpers import (
    Event,
    connect_pod,
    is_event,
    scripted,
    slow_text,
    spawn,
    subscribed_two_ways,
    wait_for,
)

pytestmark = pytest.mark.shared_capd


async def _daemon(capd: CapdProcess) -> Client:
    return await Client.connect(capd.socket)


async def test_run_status_pause_resume_cancel_through_the_daemon(
    capd: CapdProcess, tmp_path: Path
) -> None:
    sleep = {"tool_calls": [{"name": "bash", "arguments": {"command": "sleep 30"}}]}
    model = scripted(sleep, sleep, {"text": "done"})
    await spawn(capd, "w1", model, cwd=str(tmp_path), tools=["bash"])
    async with await _daemon(capd) as daemon:
        await daemon.request({"method": "subscribe", "pod": "w1"})
        turn = await daemon.request({"method": "run", "pod": "w1", "text": "go"})
        await wait_for(daemon, is_event("tool_call_start", pod="w1"))
        status = await daemon.request({"method": "status", "pod": "w1"})
        assert status["status"] == "running"
        assert status["turn_id"] == turn["turn_id"]
        await daemon.request({"method": "pause", "pod": "w1"})
        await wait_for(daemon, is_event("status", status="paused"))
        await daemon.request({"method": "resume", "pod": "w1"})
        await wait_for(daemon, is_event("status", status="running"))
        await wait_for(daemon, is_event("tool_call_start", pod="w1"))
        await daemon.request({"method": "cancel", "pod": "w1"})
        end, _ = await wait_for(daemon, is_event("turn_end"))
        await daemon.request({"method": "notify", "pod": "w1", "text": "fyi"})
        history = await daemon.request({"method": "history", "pod": "w1"})
    assert end["turn_id"] == turn["turn_id"]
    assert end["result"] == "cancelled"
    async with await connect_pod(capd, "w1", subscribe=False) as pod:
        assert await pod.request({"method": "history"}) == history


async def test_subscribe_through_the_daemon_sees_what_the_pod_socket_sees(
    capd: CapdProcess,
) -> None:
    """Ack first, then replay, then live, with no gap: the same frames in the same order as
    a subscriber on the pod's own socket sees, deltas included."""
    steps = [{"text": "first"}, slow_text(300, 1), {"text": "third"}]
    await spawn(capd, "w1", {"provider": "scripted", "script": steps})
    async with await connect_pod(capd, "w1") as first:
        await first.request({"method": "run", "text": "one"})
        await wait_for(first, is_event("status", status="idle"))
    own = await connect_pod(capd, "w1", subscribe=False)
    ack, seen, relayed = await subscribed_two_ways(capd.socket, own, "w1")
    assert ack["event"] == "ack"
    assert ack["id"] == "s"
    assert 0 < ack["result"]["last_seq"] < seen[-1]["seq"]
    assert relayed == seen
    seqs = [event["seq"] for event in seen if "seq" in event]
    assert seqs == list(range(1, len(seqs) + 1))
    assert any(event["event"] == "text_delta" for event in seen)
    assert all(event["pod"] == "w1" for event in seen)


async def test_pod_methods_on_the_daemon_socket_refused(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted())
    refused = [
        ({"method": "run", "pod": "nope", "text": "x"}, "not_found", "no pod named nope"),
        ({"method": "list", "pod": "w1"}, "invalid_request", "list is a daemon method"),
        ({"method": "start", "pod": "w1", "name": "w1"}, "invalid_request", "daemon method"),
        ({"method": "status", "pod": "W 1"}, "invalid_request", "not a pod name"),
        ({"method": "status", "pod": 7}, "invalid_request", "not a pod name"),
        ({"method": "frob", "pod": "w1"}, "unknown_method", "frob"),
        ({"method": "stop", "pod": "w1", "name": "w1"}, "invalid_request", "name"),
        ({"method": "subscribe", "pod": "w1", "activity": True}, "invalid_request", "activity"),
    ]
    async with await _daemon(capd) as daemon:
        for request, code, needle in refused:
            with pytest.raises(ProtocolError) as err:
                await daemon.request(request)
            assert err.value.code == code, request
            assert needle in err.value.message, request
        await daemon.request({"method": "stop", "name": "w1"})
        with pytest.raises(ProtocolError) as err:
            await daemon.request({"method": "run", "pod": "w1", "text": "x"})
        assert err.value.code == "not_running"
        assert "pod w1 is stopped; `capctl start w1` brings it back" in err.value.message
        assert (await daemon.request({"method": "list"}))["pods"][0]["status"] == "stopped"


async def test_a_pod_subscription_ends_when_the_pod_stops(capd: CapdProcess) -> None:
    """On the pod's socket the connection would close; on the daemon's, `pod_stopped`
    follows the pod's last event and the connection stays."""
    await spawn(capd, "w1", scripted())
    async with await _daemon(capd) as daemon:
        await daemon.request({"method": "subscribe", "pod": "w1"})
        await daemon.request({"method": "stop", "pod": "w1"})
        stopped, _ = await wait_for(daemon, is_event("pod_stopped"))
        assert stopped == {"event": "pod_stopped", "pod": "w1"}
        await daemon.request({"method": "start", "name": "w1"})
        await daemon.request({"method": "run", "pod": "w1", "text": "again"})
        with pytest.raises(TimeoutError):
            await daemon.next_event(0.3)  # the subscription ended with the stop


async def test_node_in_info_list_status_and_spawn(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted())
    await spawn(capd, "w2", scripted())
    async with await _daemon(capd) as daemon:
        await daemon.request({"method": "stop", "name": "w2"})
        before = time.time()
        info = await daemon.request({"method": "info"})
        listing = await daemon.request({"method": "list"})
        status = await daemon.request({"method": "status", "pod": "w1"})
        node = info["node"]
        spawned = await daemon.request(
            {"method": "spawn", "node": node, "manifest": {"name": "w3", "model": scripted()}}
        )
        with pytest.raises(ProtocolError) as err:
            await daemon.request(
                {
                    "method": "spawn",
                    "node": "elsewhere",
                    "manifest": {"name": "w4", "model": scripted()},
                }
            )
    assert node == default_node_name()
    assert [entry["node"] for entry in listing["pods"]] == [node, None]
    assert status["node"] == node
    assert [fleet["node"] for fleet in info["fleet"]] == [node]
    assert info["fleet"][0]["pods"] == 1
    assert before <= info["fleet"][0]["last_seen"] <= time.time()
    assert spawned["name"] == "w3"
    assert err.value.code == "not_found"
    assert err.value.message == f"no node elsewhere in the fleet (nodes: {node})"


@pytest.mark.own_capd
def test_capd_node_option(capd_dirs: CapdProcess) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "capd", "--runtime-dir", str(capd_dirs.runtime_dir), "--node", "Up"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert "--node 'Up' is not a node name: use 1-63 of a-z 0-9 _ . -" in bad.stderr
    assert not capd_dirs.socket.exists()
    capd_dirs.extra_args = ["--node", "n1.eu-west_2"]
    capd_dirs.start()
    info = asyncio.run(_info(capd_dirs))
    assert info["node"] == "n1.eu-west_2"
    assert info["fleet"][0]["node"] == "n1.eu-west_2"


async def _info(capd: CapdProcess) -> Event:
    async with await _daemon(capd) as daemon:
        return await daemon.request({"method": "info"})


@pytest.mark.parametrize(
    ("host", "node"),
    [
        ("Build-01.Example.COM", "build-01.example.com"),
        ("my host+x", "my-host-x"),
        ("_.-web", "web"),
        ("Ünï", "n-"),
        ("___", "node"),
        ("a" * 100, "a" * 63),
    ],
)
def test_default_node_name(host: str, node: str) -> None:
    assert default_node_name(host) == node
