"""The daemon socket (docs/protocol.md, Daemon socket), signals, locking and restart."""

import asyncio
import signal
import subprocess
import sys

import pytest

from protocol.client import Client, ConnectionClosed
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.helpers import (
    connect_pod,
    is_event,
    resume_turn,
    scripted,
    slow_text,
    spawn,
    wait_for,
)


async def _daemon(capd: CapdProcess) -> Client:
    return await Client.connect(capd.socket)


async def test_spawn_refuses_bad_manifests(capd: CapdProcess, tmp_path) -> None:
    await spawn(capd, "w1", scripted())
    bad = [
        ({"name": "w1", "model": {"provider": "scripted"}}, "already_exists"),
        ({"name": "Bad Name", "model": {"provider": "scripted"}}, "invalid_request"),
        ({"name": "w2", "model": {"provider": "nope"}}, "invalid_request"),
        ({"name": "w2", "model": {"provider": "scripted"}, "cwd": "rel"}, "invalid_request"),
        (
            {"name": "w2", "model": {"provider": "scripted"}, "cwd": str(tmp_path / "missing")},
            "invalid_request",
        ),
        ({"name": "w2", "model": {"provider": "scripted"}, "tools": ["rm_rf"]}, "invalid_request"),
        (
            {"name": "w2", "model": {"provider": "openai", "api_key_env": "CAPD_TEST_UNSET_KEY"}},
            "invalid_request",
        ),
    ]
    async with await _daemon(capd) as daemon:
        for manifest, code in bad:
            with pytest.raises(ProtocolError) as err:
                await daemon.request({"method": "spawn", "manifest": manifest})
            assert err.value.code == code, manifest
        listing = await daemon.request({"method": "list"})
    assert [p["name"] for p in listing["pods"]] == ["w1"]


async def test_list_info_and_daemon_events(capd: CapdProcess) -> None:
    async with await _daemon(capd) as daemon, await _daemon(capd) as watcher:
        await watcher.request({"method": "subscribe"})
        await spawn(capd, "w1", scripted())
        spawned, _ = await wait_for(watcher, is_event("pod_spawned"))
        async with await connect_pod(capd, "w1") as pod:
            await pod.request({"method": "run", "text": "hi"})
            await wait_for(pod, is_event("turn_end"))
        running, _ = await wait_for(watcher, is_event("pod_status", status="running"))
        await wait_for(watcher, is_event("pod_status", status="idle"))
        info = await daemon.request({"method": "info"})
        listing = await daemon.request({"method": "list"})
        await daemon.request({"method": "stop", "name": "w1"})
        stopped, _ = await wait_for(watcher, is_event("pod_stopped"))
        await daemon.request({"method": "delete", "name": "w1"})
        deleted, _ = await wait_for(watcher, is_event("pod_deleted"))
    assert spawned["socket"] == str(capd.pod_socket("w1"))
    assert running["pod"] == stopped["pod"] == deleted["pod"] == "w1"
    assert info["pid"] == capd.proc.pid
    assert info["pods"] == 1
    assert info["runtime_dir"] == str(capd.runtime_dir)
    assert info["state_dir"] == str(capd.state_dir)
    assert listing["pods"] == [
        {
            "name": "w1",
            "status": "idle",
            "parent": None,
            "socket": str(capd.pod_socket("w1")),
            "error": None,
            "spent": {"tokens": 4, "usd": None},  # the scripted model's word counts
            "team": None,
            "engine": None,
            "node": info["node"],
        }
    ]


async def test_stop_start_keeps_history_and_delete_forgets(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted({"text": "remember me"}))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "hi"})
        await wait_for(pod, is_event("status", status="idle"))
    async with await _daemon(capd) as daemon:
        await daemon.request({"method": "stop", "name": "w1"})
        assert not capd.pod_socket("w1").exists()
        started = await daemon.request({"method": "start", "name": "w1"})
        assert started["socket"] == str(capd.pod_socket("w1"))
        async with await connect_pod(capd, "w1", subscribe=False) as pod:
            history = await pod.request({"method": "history"})
        texts = [e.get("text") for e in history["events"] if e["event"] == "assistant_message"]
        assert texts == ["remember me"]
        await daemon.request({"method": "delete", "name": "w1"})
        for method in ("start", "stop", "delete"):
            with pytest.raises(ProtocolError) as err:
                await daemon.request({"method": method, "name": "w1"})
            assert err.value.code == "not_found"
        await spawn(capd, "w1", scripted())
        async with await connect_pod(capd, "w1", subscribe=False) as pod:
            assert (await pod.request({"method": "history"}))["events"] == []


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "shutdown"])
async def test_shutdown_exits_cleanly_and_removes_sockets(capd: CapdProcess, how: str) -> None:
    await spawn(capd, "w1", scripted())
    if how == "shutdown":
        async with await _daemon(capd) as daemon:
            await daemon.request({"method": "shutdown"})
            with pytest.raises(ConnectionClosed):
                await daemon.next_event(10)
        code = await asyncio.to_thread(capd.proc.wait, 10)
    else:
        code = await asyncio.to_thread(capd.signal, getattr(signal, how))
    assert code == 0
    assert not capd.socket.exists()
    assert not capd.pod_socket("w1").exists()


async def test_a_second_daemon_on_the_same_dirs_is_refused(capd: CapdProcess) -> None:
    argv = [sys.executable, "-m", "capd", "--runtime-dir", str(capd.runtime_dir),
            "--state-dir", str(capd.state_dir)]  # fmt: skip
    second = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=20
    )
    assert second.returncode == 1
    assert "in use by capd" in second.stderr
    assert "Traceback" not in second.stderr
    async with await _daemon(capd) as daemon:
        assert (await daemon.request({"method": "list"})) == {"pods": []}


async def test_pods_come_back_after_a_restart(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted({"text": "first"}, {"text": "second"}))
    await spawn(capd, "off", scripted())
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "hi"})
        await wait_for(pod, is_event("status", status="idle"))
    async with await _daemon(capd) as daemon:
        await daemon.request({"method": "stop", "name": "off"})
    capd.stop()
    capd.start()
    async with await _daemon(capd) as daemon:
        listing = await daemon.request({"method": "list"})
    assert {p["name"]: p["status"] for p in listing["pods"]} == {"w1": "idle", "off": "stopped"}
    async with await connect_pod(capd, "w1") as pod:
        assert pod.hello.pod.last_seq == 6
        await pod.request({"method": "run", "text": "again"})
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert end["output"] == "second"
    assert seen[0]["seq"] == 7


async def test_a_turn_in_flight_at_sigkill_comes_back_paused_and_resumes(
    capd: CapdProcess,
) -> None:
    text = "z" * 400
    await spawn(capd, "w1", scripted({"text": text, "chunk_chars": 1, "delay_ms": 5}))
    async with await connect_pod(capd, "w1") as pod:
        ack = await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("text_delta"))
    capd.proc.kill()
    await asyncio.to_thread(capd.proc.wait, 10)
    capd.start()
    async with await connect_pod(capd, "w1") as pod:
        status = await pod.request({"method": "status"})
        assert (status["status"], status["turn_id"]) == ("paused", ack["turn_id"])
        end, _ = await resume_turn(pod)
    assert (end["turn_id"], end["result"]) == (ack["turn_id"], "finished")
    assert len(end["output"]) == 400


async def test_a_turn_in_flight_at_sigkill_can_be_cancelled_after_restart(
    capd: CapdProcess,
) -> None:
    await spawn(capd, "w1", scripted(slow_text()))
    async with await connect_pod(capd, "w1") as pod:
        ack = await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("text_delta"))
    capd.proc.kill()
    await asyncio.to_thread(capd.proc.wait, 10)
    capd.start()
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "cancel"})
        end, seen = await wait_for(pod, is_event("status", status="idle"))
    turn_end = next(e for e in seen if e["event"] == "turn_end")
    assert (turn_end["turn_id"], turn_end["result"]) == (ack["turn_id"], "cancelled")
    assert end["turn_id"] is None


async def test_sigterm_pauses_a_running_turn_for_the_next_start(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted(slow_text()))
    async with await connect_pod(capd, "w1") as pod:
        ack = await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("text_delta"))
    assert await asyncio.to_thread(capd.signal, signal.SIGTERM) == 0
    capd.start()
    async with await connect_pod(capd, "w1", subscribe=False) as pod:
        status = await pod.request({"method": "status"})
    assert (status["status"], status["turn_id"]) == ("paused", ack["turn_id"])


def test_a_file_where_the_daemon_socket_goes_is_not_deleted(capd_dirs: CapdProcess) -> None:
    capd_dirs.runtime_dir.mkdir(mode=0o700)
    capd_dirs.socket.write_text("not a socket")
    with pytest.raises(RuntimeError, match="exists and is not a socket"):
        capd_dirs.start()
    assert capd_dirs.socket.read_text() == "not a socket"


@pytest.mark.parametrize("flag", ["--max-pods", "--max-subscribers", "--max-queued-bytes"])
def test_a_limit_below_one_is_a_usage_error(flag: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "capd", flag, "0"], capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 2
    assert f"{flag} must be at least 1, got 0" in done.stderr
