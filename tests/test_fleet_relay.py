"""Two capd nodes on one real PostgreSQL, linked over real TCP links: every daemon-socket
request for a pod the other node hosts is relayed to it (docs/scaling.md)."""

import asyncio
import contextlib
import os
import re
import statistics
import time
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest

from capd.fleet.links import LinkError, open_link
from protocol.client import Client
from protocol.errors import ProtocolError
from tests.conftest import START_TIMEOUT_S, CapdProcess, _request, _stopped_at_exit
from tests.helpers import (
    connect_pod,
    is_event,
    read_frame,
    scripted,
    sigkill,
    slow_text,
    subscribed_two_ways,
    wait_for,
)
from tests.pg import PgServer
from tests.test_capctl import ok

KEY = b"0123456789abcdef" * 4
TTL_S = 3
"""Short, so that a killed node's pods are adopted within the test's patience."""


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PgServer
) -> Iterator[tuple[CapdProcess, CapdProcess, str]]:
    """Nodes a and b of one fleet (one database, one key), and the database's URL."""
    root = tmp_path_factory.mktemp("fleet")
    key = root / "fleet.key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    url = pg_server.url(pg_server.create_database())
    with contextlib.ExitStack() as stack:
        started = []
        for name in ("a", "b"):
            runs = stack.enter_context(contextlib.closing(_stopped_at_exit(root / name)))
            proc = next(runs)
            proc.store = url
            proc.log = root / f"{name}.log"
            proc.extra_args = [
                "--node", name,
                "--node-listen", "127.0.0.1:0",
                "--fleet-key-file", str(key),
                "--lease-ttl-s", str(TTL_S),
            ]  # fmt: skip
            proc.start()
            started.append(proc)
        yield started[0], started[1], url


@pytest.fixture
def a(nodes: tuple[CapdProcess, CapdProcess, str]) -> CapdProcess:
    return nodes[0]


@pytest.fixture
def b(nodes: tuple[CapdProcess, CapdProcess, str]) -> CapdProcess:
    return nodes[1]


@pytest.fixture(autouse=True)
def _empty_fleet(nodes: tuple[CapdProcess, CapdProcess, str]) -> Iterator[None]:
    """Each test starts with no pod: every pod is deleted through node a."""
    yield
    a = nodes[0]
    for pod in _request(a.socket, {"method": "list"}, START_TIMEOUT_S)["result"]["pods"]:
        _request(a.socket, {"method": "delete", "name": pod["name"]}, START_TIMEOUT_S)


async def _spawn(through: CapdProcess, name: str, node: str, model: dict[str, Any]) -> Any:
    async with await Client.connect(through.socket) as daemon:
        return await daemon.request(
            {"method": "spawn", "node": node, "manifest": {"name": name, "model": model}}
        )


async def test_spawn_run_and_list_through_the_other_node(a: CapdProcess, b: CapdProcess) -> None:
    spawned = await _spawn(a, "wb", "b", scripted({"text": "from b"}))
    assert spawned["socket"] == str(b.pod_socket("wb"))
    await _spawn(a, "wa", "a", scripted({"text": "from a"}))
    async with await Client.connect(a.socket) as daemon:
        await daemon.request({"method": "subscribe", "pod": "wb", "after_seq": 0})
        turn = await daemon.request({"method": "run", "pod": "wb", "text": "go"})
        end, seen = await wait_for(daemon, is_event("turn_end", turn_id=turn["turn_id"]))
        status = await daemon.request({"method": "status", "pod": "wb"})
        listed = {pod["name"]: pod for pod in (await daemon.request({"method": "list"}))["pods"]}
        info = await daemon.request({"method": "info"})
    assert end["result"] == "finished"
    assert "".join(e["text"] for e in seen if e["event"] == "text_delta") == "from b"
    assert status["node"] == "b"
    assert status["status"] == "idle"
    assert (listed["wb"]["node"], listed["wb"]["socket"]) == ("b", None)
    assert (listed["wa"]["node"], listed["wa"]["socket"]) == ("a", str(a.pod_socket("wa")))
    assert {(n["node"], n["pods"]) for n in info["fleet"]} == {("a", 1), ("b", 1)}
    async with await Client.connect(b.socket) as direct:
        on_b = {pod["name"] for pod in (await direct.request({"method": "list"}))["pods"]}
    assert on_b == {"wa", "wb"}


async def test_relayed_subscription_sees_what_the_hosts_own_subscriber_sees(
    a: CapdProcess, b: CapdProcess
) -> None:
    """Replay then live, deltas included, no gap: through a, the frames b's pod socket
    sends, in the same order."""
    steps = [{"text": "first"}, slow_text(300, 1), {"text": "third"}]
    await _spawn(a, "w1", "b", {"provider": "scripted", "script": steps})
    async with await connect_pod(b, "w1") as own:
        await own.request({"method": "run", "text": "one"})
        await wait_for(own, is_event("status", status="idle"))
    own = await Client.connect(b.pod_socket("w1"))
    ack, seen, relayed = await subscribed_two_ways(a.socket, own, "w1")
    assert (ack["event"], ack["id"]) == ("ack", "s")
    assert 0 < ack["result"]["last_seq"] < seen[-1]["seq"]
    assert relayed == seen
    seqs = [event["seq"] for event in seen if "seq" in event]
    assert seqs == list(range(1, len(seqs) + 1))
    assert any(event["event"] == "text_delta" for event in seen)


async def test_stop_start_delete_through_the_other_node(a: CapdProcess, b: CapdProcess) -> None:
    await _spawn(a, "w2", "b", scripted())
    async with await Client.connect(a.socket) as daemon:
        await daemon.request({"method": "subscribe", "pod": "w2"})
        await daemon.request({"method": "stop", "name": "w2"})
        await wait_for(daemon, is_event("pod_stopped", pod="w2"))
        with pytest.raises(ProtocolError) as err:
            await daemon.request({"method": "status", "pod": "w2"})
        assert err.value.code == "not_running"
        started = await daemon.request({"method": "start", "name": "w2"})
        assert started["socket"] == str(b.pod_socket("w2"))
        assert (await daemon.request({"method": "status", "pod": "w2"}))["status"] == "idle"
        await daemon.request({"method": "delete", "name": "w2"})
        with pytest.raises(ProtocolError) as err:
            await daemon.request({"method": "status", "pod": "w2"})
        assert err.value.code == "not_found"
        with pytest.raises(ProtocolError) as err:
            await daemon.request({"method": "delete", "name": "w2"})
        assert err.value.code == "not_found"
    assert not b.pod_socket("w2").exists()


async def test_a_relayed_reply_may_be_longer_than_a_request_may(
    a: CapdProcess, b: CapdProcess
) -> None:
    """Requests are bounded (--max-frame-bytes, 1 MiB); replies are not: a history page
    holding a long prompt and a long answer comes through the link whole."""
    answer, prompt = "x" * (700 * 1024), "y" * (700 * 1024)
    await _spawn(a, "big", "b", scripted({"text": answer}))
    async with await Client.connect(a.socket) as daemon:
        await daemon.request({"method": "subscribe", "pod": "big"})
        await daemon.request({"method": "run", "pod": "big", "text": prompt})
        await wait_for(daemon, is_event("turn_end"))
        history = await daemon.request({"method": "history", "pod": "big"})
        status = await daemon.request({"method": "status", "pod": "big"})
    texts = [event.get("text") for event in history["events"]]
    assert prompt in texts
    assert answer in texts
    assert status["node"] == "b"


async def test_relayed_and_local_requests_pipeline_in_request_order(
    a: CapdProcess, b: CapdProcess
) -> None:
    await _spawn(a, "la", "a", scripted())
    await _spawn(a, "rb", "b", scripted())
    reader, writer = await asyncio.open_unix_connection(str(a.socket))
    try:
        await reader.readline()
        pods = ["rb", "la", "rb", "rb", "la", "nope", "rb"]
        writer.write(
            b"".join(
                orjson.dumps({"id": i, "method": "status", "pod": pod}) + b"\n"
                for i, pod in enumerate(pods)
            )
        )
        replies = [await read_frame(reader) for _ in pods]
    finally:
        writer.close()
    assert [reply["id"] for reply in replies] == list(range(len(pods)))
    for pod, reply in zip(pods, replies, strict=True):
        if pod == "nope":
            assert reply["code"] == "not_found"
        else:
            assert reply["result"]["node"] == {"la": "a", "rb": "b"}[pod]


async def test_a_wrong_fleet_key_is_refused(
    b: CapdProcess, nodes: tuple[CapdProcess, CapdProcess, str]
) -> None:
    address = _address(nodes[2], "b")
    with pytest.raises(LinkError, match="refused the link: node a: wrong fleet key"):
        await open_link(address, "a", b"x" * 32, 1 << 20, "b")
    link = await open_link(address, "a", KEY, 1 << 20, "b")
    link.send({"id": 1, "method": "info"})
    _, reply = await anext(link.frames())
    link.close()
    assert reply["result"]["node"] == "b"
    assert "refused a node link" in b.output()


async def test_a_relayed_subscription_follows_its_pod_to_another_node(
    a: CapdProcess, b: CapdProcess
) -> None:
    """b shuts down and hands its pods over; a adopts the pod; the subscription through
    a goes on from the last event it sent: every durable event once, in order."""
    await _spawn(a, "mv", "b", scripted({"text": "before"}, {"text": "after"}))
    try:
        async with await Client.connect(a.socket) as daemon:
            await daemon.request({"method": "subscribe", "pod": "mv", "after_seq": 0})
            await daemon.request({"method": "run", "pod": "mv", "text": "one"})
            _, seen = await wait_for(daemon, is_event("turn_end"))
            moved = time.monotonic()
            b.stop()
            status = await _until_answered(daemon, {"method": "status", "pod": "mv"})
            assert status["node"] == "a"
            moved = time.monotonic() - moved
            await daemon.request({"method": "run", "pod": "mv", "text": "two"})
            _, more = await wait_for(daemon, is_event("turn_end"))
            history = await daemon.request({"method": "history", "pod": "mv"})
    finally:
        if b.proc is not None and b.proc.poll() is not None:
            b.start()
    durable = [event for event in seen + more if "seq" in event]
    assert [event["seq"] for event in durable] == list(range(1, len(durable) + 1))
    assert durable == history["events"][: len(durable)]
    assert [e["text"] for e in durable if e["event"] == "assistant_message"] == ["before", "after"]
    print(f"\npod moved and answered on a {moved:.2f} s after b began to shut down")


async def test_a_relayed_subscription_survives_its_hosts_crash(
    a: CapdProcess, b: CapdProcess
) -> None:
    """b is killed mid-turn; a adopts the pod after the lease TTL and restores it paused;
    a live-only subscription through a, made mid-turn, goes on from what was committed when
    it was made: the adopter's `status paused` arrives, gapless, no repeat. Meanwhile, a
    spawn that placement sends to b (fewest pods, still live) is made on a instead."""
    await _spawn(a, "ck", "b", {"provider": "scripted", "script": [slow_text(3000, 2)]})
    for name in ("pa1", "pa2"):
        await _spawn(a, name, "a", scripted())
    try:
        async with await connect_pod(b, "ck") as own:
            await own.request({"method": "run", "text": "go"})
            await wait_for(own, is_event("text_delta"))
        async with await Client.connect(a.socket) as daemon:
            ack = await daemon.request({"method": "subscribe", "pod": "ck"})
            _, before = await wait_for(daemon, is_event("text_delta"))
            await sigkill(b)
            killed = time.monotonic()
            async with await Client.connect(a.socket) as other:
                await other.request({"method": "list"})  # a's shared link to b is gone now
                manifest = {"name": "pz", "model": scripted()}
                placed = await other.request({"method": "spawn", "manifest": manifest})
            assert placed["socket"] == str(a.pod_socket("pz"))
            _, after = await wait_for(daemon, is_event("status", status="paused"), TTL_S + 10)
            back = time.monotonic() - killed
            status = await daemon.request({"method": "status", "pod": "ck"})
            history = await daemon.request({"method": "history", "pod": "ck"})
    finally:
        if b.proc is not None and b.proc.poll() is not None:
            b.start()
    assert (status["node"], status["status"]) == ("a", "paused")
    durable = [event for event in before + after if "seq" in event]
    first = ack["last_seq"] + 1
    assert [event["seq"] for event in durable] == list(range(first, first + len(durable)))
    assert durable == history["events"][first - 1 : first - 1 + len(durable)]
    print(f"\nsubscription through a went on {back:.2f} s after b was killed (ttl {TTL_S} s)")


async def _until_answered(daemon: Client, request: dict[str, Any], timeout: float = 15) -> Any:
    """The request's result once it succeeds (the pod is up again somewhere)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await daemon.request(request)
        except ProtocolError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_capctl_on_one_node_drives_a_pod_on_the_other(a: CapdProcess, b: CapdProcess) -> None:
    """capctl finds `socket: null` for a pod on another node and goes through the daemon
    socket, which relays."""
    spawn = {"method": "spawn", "node": "b", "manifest": {"name": "cw", "model": scripted()}}
    assert "result" in _request(a.socket, spawn, START_TIMEOUT_S)
    sent = ok(a.runtime_dir, "send", "cw", "ping")
    status = ok(a.runtime_dir, "status", "cw")
    listed = ok(a.runtime_dir, "ps")
    assert sent == "You said: ping\n"  # the scripted model's echo, from node b
    assert re.search(r"^node: +b$", status, re.M)
    assert re.search(r"^cw +idle .* on b$", listed, re.M)


@pytest.mark.skipif(not os.environ.get("CAPD_FLEET_BENCH"), reason="CAPD_FLEET_BENCH=1")
async def test_relayed_round_trip_against_a_local_one(a: CapdProcess, b: CapdProcess) -> None:
    """`status` of a pod on b: on its own socket, on b's daemon socket (with `pod`), and
    through a's daemon socket (relayed), in alternating blocks of one run; prints the
    figures the README quotes."""
    await _spawn(a, "rt", "b", scripted())
    async with (
        await Client.connect(b.pod_socket("rt")) as own,
        await Client.connect(b.socket) as local,
        await Client.connect(a.socket) as relayed,
    ):
        paths = {
            "pod socket": (own, {"method": "status"}),
            "b's daemon socket": (local, {"method": "status", "pod": "rt"}),
            "relayed through a": (relayed, {"method": "status", "pod": "rt"}),
        }
        times: dict[str, list[float]] = {label: [] for label in paths}
        for _ in range(10):
            for label, (client, request) in paths.items():
                for _ in range(200):
                    start = time.perf_counter()
                    await client.request(request)
                    times[label].append(time.perf_counter() - start)
    base = statistics.median(times["b's daemon socket"])
    print("\nstatus round trip of a pod on node b:")
    for label, samples in times.items():
        p50 = statistics.median(samples)
        p99 = statistics.quantiles(samples, n=100)[98]
        print(f"  {label}: p50 {p50 * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs, {p50 / base:.2f}x")


def _address(url: str, node: str) -> str:
    with psycopg.connect(url) as db:
        row = db.execute("SELECT address FROM nodes WHERE name = %s", (node,)).fetchone()
    assert row is not None
    assert row[0]
    return str(row[0])


async def test_a_report_reaches_a_parent_on_another_node_once(
    a: CapdProcess, b: CapdProcess
) -> None:
    """A child on b whose parent runs on a: its parent socket is not on b's machine (here a
    path nowhere), so b's outbox delivers through the link to pod lead wherever it runs."""
    await _spawn(a, "lead", "a", scripted({"text": "noted"}))
    elsewhere = f"/nonexistent-{os.getpid()}/pods/lead.sock"
    async with await Client.connect(a.socket) as daemon:
        await daemon.request({"method": "subscribe", "pod": "lead"})
        manifest = {"name": "kid", "model": scripted({"text": "done"})}
        await daemon.request(
            {"method": "spawn", "node": "b", "parent": elsewhere, "manifest": manifest}
        )
        await daemon.request({"method": "run", "pod": "kid", "text": "go"})
        received, _ = await wait_for(daemon, is_event("pod_event_received"))
        await wait_for(daemon, is_event("turn_end"))
        history = await daemon.request({"method": "history", "pod": "lead"})
    assert received["payload"]["pod"] == "kid"
    assert received["payload"]["kind"] == "turn_ended"
    assert received["payload"]["output"] == "done"
    kinds = [event["event"] for event in history["events"]]
    assert kinds.count("pod_event_received") == 1


async def test_a_childs_reports_to_a_parent_deleted_on_another_node_are_dropped(
    nodes: tuple[CapdProcess, CapdProcess, str],
) -> None:
    """Deleting a parent makes its children top-level; a child on another node, which
    still names it, has its next report dropped rather than retried for ever."""
    a, b, url = nodes
    await _spawn(a, "lead", "a", scripted())
    manifest = {"name": "kid", "model": scripted({"text": "done"})}
    parent = str(a.pod_socket("lead"))
    async with await Client.connect(b.socket) as daemon:
        await daemon.request(
            {"method": "spawn", "node": "b", "parent": parent, "manifest": manifest}
        )
        await daemon.request({"method": "delete", "name": "lead"})  # relayed to a
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT parent FROM pods WHERE name = 'kid'").fetchall() == [
                (None,)
            ]
        await daemon.request({"method": "subscribe", "pod": "kid"})
        await daemon.request({"method": "run", "pod": "kid", "text": "go"})
        await wait_for(daemon, is_event("turn_end"))
    with psycopg.connect(url, autocommit=True) as conn:
        async with asyncio.timeout(10):
            while conn.execute("SELECT 1 FROM outbox WHERE pod = 'kid'").fetchall():
                await asyncio.sleep(0.05)
    assert b.log is not None
    dropped = [line for line in b.log.read_text().splitlines() if "pod kid" in line]
    assert any("parent pod lead was deleted" in line for line in dropped), dropped
