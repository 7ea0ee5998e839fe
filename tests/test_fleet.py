"""A fleet of capd nodes on one real PostgreSQL database (issue 22): takeover after a
node dies mid-turn, a partitioned node that stops writing once its lease is gone, a
restart that takes its pods back at once, fencing of a store that lost its lease.

Nodes run with a short lease (`--lease-ttl-s 3`, or CAPD_FLEET_TTL_S); every wait has a
deadline."""

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from capd.fleet.schema import LeaseLost
from capd.store.base import StoredEvent
from capd.store.batch import StoreFailed
from capd.store.postgres import PostgresStore
from protocol.client import Client, ConnectionClosed
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.gitrepo import make_repo
from tests.helpers import Event, connect_pod, daemon_request, is_event, scripted, sigkill, wait_for

TTL_S = float(os.environ.get("CAPD_FLEET_TTL_S") or 3)
HELD_TOOL = {"name": "bash", "arguments": {"command": "sleep 20"}}
"""A tool call that keeps a turn open long enough to kill its node in."""

AUDIT = """
CREATE TABLE audit (pod TEXT, seq BIGINT, app TEXT, at TIMESTAMPTZ);
CREATE FUNCTION audit_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit VALUES (NEW.pod, NEW.seq, current_setting('application_name'),
                              clock_timestamp());
    RETURN NEW;
END $$;
CREATE TRIGGER audit AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION audit_event();
"""
"""Who committed each event (capd names its store connection capd/<node>/<incarnation>);
installed by the test, not by capd."""


def _node(base: Path, name: str, url: str, ttl_s: float = TTL_S) -> CapdProcess:
    runtime = Path(f"/tmp/capd-fleet-{os.getpid()}-{name}-{time.monotonic_ns() % 10**6}")
    proc = CapdProcess(runtime_dir=runtime, state_dir=base / f"{name}-state", store=url)
    proc.extra_args = ["--node", name, "--lease-ttl-s", str(ttl_s)]
    proc.log = base / f"{name}.log"
    return proc


@pytest.fixture
def fleet_dirs(tmp_path: Path) -> Iterator[list[CapdProcess]]:
    """The nodes a test starts (append them); each killed at the end."""
    nodes: list[CapdProcess] = []
    yield nodes
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)
        shutil.rmtree(node.runtime_dir, ignore_errors=True)


@pytest.fixture
def audited(pg_url: str) -> str:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(AUDIT)  # type: ignore[arg-type]
    return pg_url


def _sql(url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


async def _pod_request(node: CapdProcess, pod: str, request: dict[str, Any]) -> dict[str, Any]:
    return await daemon_request(node, {**request, "pod": pod})


async def _answers(node: CapdProcess, pod: str, deadline_s: float) -> dict[str, Any]:
    """The pod's status through `node`'s daemon socket, as soon as `node` hosts it."""
    async with asyncio.timeout(deadline_s):
        while True:
            try:
                return await _pod_request(node, pod, {"method": "status"})
            except ProtocolError as exc:
                if exc.code not in ("not_found", "not_running"):
                    raise
            await asyncio.sleep(0.02)


async def _spawn_holding(node: CapdProcess, name: str, **fields: Any) -> None:
    model = scripted({"tool_calls": [HELD_TOOL]}, {"text": "done"})
    manifest = {"name": name, "model": model, **fields}
    await daemon_request(node, {"method": "spawn", "manifest": {**manifest, "tools": ["bash"]}})


async def _start_held_turn(node: CapdProcess, name: str) -> tuple[Client, dict[int, Event]]:
    """Run a turn that stays open on its tool call; the durable events seen so far."""
    client = await connect_pod(node, name)
    await client.request({"method": "run", "text": "go"})
    _, events = await wait_for(client, is_event("assistant_message"))  # its tool runs
    return client, {e["seq"]: e for e in events if "seq" in e}


async def _read_until_closed(client: Client, seen: dict[int, Event]) -> None:
    """Every durable event the pod's node sent before it died."""
    try:
        while True:
            event = await client.next_event(5)
            if "seq" in event:
                seen[event["seq"]] = event
    except ConnectionClosed:
        return


def _check_history(history: list[Event], seen: dict[int, Event]) -> None:
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1)), "seqs gapless"
    for seq, event in seen.items():
        assert history[seq - 1] == event, f"seq {seq} changed"


async def test_a_node_killed_mid_turn_has_its_pod_restored_paused_on_another(
    fleet_dirs: list[CapdProcess], tmp_path: Path, audited: str
) -> None:
    n1, n2 = _node(tmp_path, "n1", audited), _node(tmp_path, "n2", audited)
    fleet_dirs += [n1, n2]
    await asyncio.gather(asyncio.to_thread(n1.start), asyncio.to_thread(n2.start))
    (tmp_path / "w1" / "c1").mkdir(parents=True)  # on storage both nodes see
    await _spawn_holding(n1, "w1", cwd=str(tmp_path / "w1"))
    # Its child and a stopped pod go with it: a family moves together, a stopped pod
    # stays stopped on its new node.
    child = {"name": "c1", "model": scripted({"text": "hi"}), "cwd": str(tmp_path / "w1/c1")}
    parent = str(n1.pod_socket("w1"))
    await daemon_request(n1, {"method": "spawn", "manifest": child, "parent": parent})
    # A child on n2 of a parent on n1: once n2 adopts the parent, its reports go to it there.
    remote = {"name": "c3", "model": scripted({"text": "hi"})}
    await daemon_request(n2, {"method": "spawn", "manifest": remote, "parent": parent})
    await daemon_request(n1, {"method": "spawn", "manifest": {"name": "s1", "model": scripted()}})
    await daemon_request(n1, {"method": "stop", "name": "s1"})
    client, seen = await _start_held_turn(n1, "w1")
    async with client:
        turn_id = next(e["turn_id"] for e in seen.values() if e["event"] == "turn_start")
        assert n1.proc is not None
        killed = time.monotonic()
        n1.proc.kill()
        await _read_until_closed(client, seen)
    status = await _answers(n2, "w1", TTL_S + 5)
    failover = time.monotonic() - killed
    print(f"failover (SIGKILL -> status on the survivor, ttl {TTL_S:g} s): {failover:.2f} s")
    assert (status["status"], status["turn_id"], status["node"]) == ("paused", turn_id, "n2")
    history = await _history(n2, "w1")
    _check_history(history, seen)
    _committed_once_by_n1_then_n2(audited, len(history))
    leases = _sql(audited, "SELECT pod, node, epoch, family FROM leases ORDER BY pod")
    assert leases == [
        ("c1", "n2", 2, "w1"),
        ("c3", "n2", 1, "w1"),
        ("s1", "n2", 2, "s1"),
        ("w1", "n2", 2, "w1"),
    ]
    assert (await _answers(n2, "c1", 5))["status"] == "idle"
    # The child's parent socket moved with its parent, to n2's pods dir: the tree holds.
    assert (await _pod_request(n2, "w1", {"method": "status"}))["children"] == ["c1"]
    assert _sql(audited, "SELECT parent FROM pods WHERE name = 'c1'") == [
        (str(n2.pod_socket("w1")),)
    ]
    with pytest.raises(ProtocolError) as stopped:
        await _pod_request(n2, "s1", {"method": "status"})
    assert stopped.value.code == "not_running"
    await daemon_request(n2, {"method": "start", "name": "s1"})
    assert (await _answers(n2, "s1", 5))["status"] == "idle"
    # The survivor carries the pod on: the paused turn can be cancelled and a new one run.
    await _pod_request(n2, "w1", {"method": "cancel"})
    # Both children's reports reach the adopted parent: c1's at its moved socket, c3's
    # (which still names n1's socket) too, though n2 takes no links (no --node-listen).
    async with await Client.connect(n2.socket) as daemon:
        await daemon.request({"method": "subscribe", "pod": "w1"})
        for kid in ("c1", "c3"):
            await daemon.request({"method": "run", "pod": kid, "text": "go"})
            received, _ = await wait_for(daemon, is_event("pod_event_received"), 10)
            assert (received["payload"]["pod"], received["payload"]["output"]) == (kid, "hi")


async def _history(node: CapdProcess, pod: str) -> list[Event]:
    """The pod's whole durable history, through `node`'s daemon socket."""
    events: list[Event] = []
    async with await Client.connect(node.socket) as daemon:
        while True:
            after = events[-1]["seq"] if events else 0
            request = {"method": "history", "after_seq": after, "limit": 500, "pod": pod}
            page = await daemon.request(request)
            if not page["events"]:
                return events
            events.extend(page["events"])


async def test_a_node_restarted_under_its_name_takes_its_pods_back_at_once(
    fleet_dirs: list[CapdProcess], tmp_path: Path, pg_url: str
) -> None:
    """No TTL wait (the lease is 30 s here), epoch +1; and a second capd under a live
    node's name, from another state dir, is refused."""
    n1 = _node(tmp_path, "n1", pg_url, ttl_s=30)
    fleet_dirs.append(n1)
    await asyncio.to_thread(n1.start)
    await _spawn_holding(n1, "w1")
    client, _ = await _start_held_turn(n1, "w1")
    await client.close()
    await sigkill(n1)
    restarted = time.monotonic()
    await asyncio.to_thread(n1.start)
    status = await _answers(n1, "w1", 5)
    assert time.monotonic() - restarted < 10, "well within the 30 s lease"
    assert status["status"] == "paused"
    assert _sql(pg_url, "SELECT node, epoch FROM leases") == [("n1", 2)]

    impostor = _node(tmp_path, "n1", pg_url)
    impostor.state_dir = tmp_path / "elsewhere"
    fleet_dirs.append(impostor)
    with pytest.raises(RuntimeError, match="another capd uses this name"):
        await asyncio.to_thread(impostor.start)
    assert impostor.proc is not None
    assert impostor.proc.returncode == 1


async def test_a_node_restoring_many_pods_keeps_its_lease(
    fleet_dirs: list[CapdProcess], tmp_path: Path, pg_url: str
) -> None:
    """Restoring 1,200 idle pods takes longer than a 2 s lease (3-4 s here): the restore
    must let the heartbeat renew it, or the node stops itself (exit 75) as it comes up —
    and would again at every restart. The pods are copies of one, made in SQL."""
    n1 = _node(tmp_path, "n1", pg_url, ttl_s=2)
    fleet_dirs.append(n1)
    await asyncio.to_thread(n1.start)
    await daemon_request(n1, {"method": "spawn", "manifest": {"name": "r0", "model": scripted()}})
    await sigkill(n1)
    _sql(  # no lease rows: the node takes them when it joins, as pods of a pre-fleet capd
        pg_url,
        "INSERT INTO pods (name, manifest, created) SELECT 'r' || i, "
        'replace(manifest, \'"name":"r0"\', \'"name":"r\' || i || \'"\'), created + i '
        "FROM pods, generate_series(1, 1199) AS i WHERE name = 'r0' RETURNING 1",
    )
    n2 = _node(tmp_path, "n2", pg_url, ttl_s=2)
    fleet_dirs.append(n2)
    await asyncio.to_thread(n1.start)
    assert (await _pod_request(n1, "r1199", {"method": "status"}))["status"] == "idle"
    assert n1.proc.poll() is None
    await asyncio.to_thread(n2.start)
    # n2 adopts them all, as long a restore: meanwhile the last one says it is on its way
    # (not "stopped", which invites a `start` that would bring it up twice).
    n1.proc.kill()
    async with asyncio.timeout(20):
        while True:
            with pytest.raises(ProtocolError) as waiting:
                await _pod_request(n2, "r1199", {"method": "status"})
            if "on node n1" not in waiting.value.message:  # n1's lease has run out
                break
            await asyncio.sleep(0.02)
        while waiting.value.code == "not_found":  # not adopted yet
            with pytest.raises(ProtocolError) as waiting:
                await _pod_request(n2, "r1199", {"method": "status"})
            await asyncio.sleep(0.02)
    assert waiting.value.message == "pod r1199 is being restored; try again"
    assert (await _answers(n2, "r0", 20))["node"] == "n2"
    assert (await _answers(n2, "r1198", 20))["node"] == "n2"
    assert (await _pod_request(n2, "r1199", {"method": "status"}))["status"] == "idle"
    assert n2.proc is not None
    assert n2.proc.poll() is None
    assert "r1199" not in "".join(
        line for line in n2.output().splitlines(keepends=True) if "ERROR" in line
    )


NODE_LOG = """
CREATE TABLE node_log (id BIGSERIAL PRIMARY KEY, name TEXT, incarnation BIGINT, draining BOOL);
CREATE FUNCTION node_logged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO node_log (name, incarnation, draining)
        VALUES (NEW.name, NEW.incarnation, NEW.draining);
    RETURN NULL;
END $$;
CREATE TRIGGER node_logged AFTER UPDATE OF incarnation, draining ON nodes
    FOR EACH ROW EXECUTE FUNCTION node_logged();
"""
"""Every change of a node's incarnation or draining mark, in order (installed by the test)."""


async def test_a_graceful_leave_hands_the_pods_over_without_a_ttl_wait(
    fleet_dirs: list[CapdProcess], tmp_path: Path, pg_url: str
) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(NODE_LOG)  # type: ignore[arg-type]
    n1 = _node(tmp_path, "n1", pg_url, ttl_s=30)
    n2 = _node(tmp_path, "n2", pg_url, ttl_s=30)
    fleet_dirs += [n1, n2]
    await asyncio.gather(asyncio.to_thread(n1.start), asyncio.to_thread(n2.start))
    await _spawn_holding(n1, "w1")
    client, _ = await _start_held_turn(n1, "w1")
    await client.close()
    with pytest.raises(ProtocolError) as taken:  # the name is n1's: n2 says so, and stays up
        await _spawn_holding(n2, "w1")
    assert taken.value.code == "already_exists"
    assert (await daemon_request(n2, {"method": "info"}))["node"] == "n2"
    assert await asyncio.to_thread(n1.signal, signal.SIGTERM) == 0
    status = await _answers(n2, "w1", 10)  # a scan (1 s) and a restore, not 30 s
    assert (status["status"], status["node"]) == ("paused", "n2")
    # n1 was marked draining (no spawn placed on it) from its shutdown's start until it left.
    rows = _sql(
        pg_url, "SELECT incarnation <> 0, draining FROM node_log WHERE name = 'n1' ORDER BY id"
    )
    live_draining = [row for row in rows if row == (True, True)]
    assert live_draining, rows
    assert rows.index(live_draining[0]) < rows.index((False, True))


FAULT = """
CREATE SCHEMA fault;
CREATE SEQUENCE fault.shots;
CREATE FUNCTION fault.check() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF txid_current_if_assigned() IS DISTINCT FROM current_setting('fault.armed')::bigint
       AND nextval('fault.shots') = 1 THEN
        RAISE EXCEPTION 'injected: the adopted pods cannot be read';
    END IF;
    RETURN true;
END $$;
CREATE VIEW fault.pods AS SELECT * FROM public.pods WHERE fault.check();
CREATE FUNCTION fault_arm() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('application_name') = 'capd/n2/control' THEN
        PERFORM set_config('fault.armed', txid_current()::text, false);
        PERFORM set_config('search_path', 'fault, public', false);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER fault_arm AFTER UPDATE OF node ON leases
    FOR EACH STATEMENT EXECUTE FUNCTION fault_arm();
"""
"""Once: the first read of `pods` by n2's control connection after the transaction that
moved leases to it committed fails. The move points that session (only) at a view over
`pods` that fails once outside that transaction, so the scan itself reads `pods` unharmed."""


async def test_a_scan_that_fails_after_the_leases_moved_brings_the_pods_up_next_time(
    fleet_dirs: list[CapdProcess], tmp_path: Path, pg_url: str
) -> None:
    n1 = _node(tmp_path, "n1", pg_url, ttl_s=30)
    n2 = _node(tmp_path, "n2", pg_url, ttl_s=30)
    fleet_dirs += [n1, n2]
    await asyncio.gather(asyncio.to_thread(n1.start), asyncio.to_thread(n2.start))
    for name in ("w1", "w2"):
        await daemon_request(
            n1, {"method": "spawn", "manifest": {"name": name, "model": scripted()}}
        )
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(FAULT)  # type: ignore[arg-type]
    assert await asyncio.to_thread(n1.signal, signal.SIGTERM) == 0
    for name in ("w1", "w2"):
        status = await _answers(n2, name, 10)  # the failed scan, then the next (1 s)
        assert (status["status"], status["node"]) == ("idle", "n2")
    assert _sql(pg_url, "SELECT pod, node FROM leases ORDER BY pod") == [("w1", "n2"), ("w2", "n2")]
    assert n2.log is not None
    failed = [line for line in n2.log.read_text().splitlines() if "takeover scan failed" in line]
    assert len(failed) == 1
    assert "injected: the adopted pods cannot be read; 2 adopted pods wait for it" in failed[0]


PROXY = r"""
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def serve(client_reader, client_writer):
    server_reader, server_writer = await asyncio.open_unix_connection(sys.argv[1])
    await asyncio.gather(
        pipe(client_reader, server_writer), pipe(server_reader, client_writer),
        return_exceptions=True,
    )

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""
"""A TCP proxy to the server's Unix socket: SIGSTOP it and its connections go silent, as
in a network partition (no iptables needed)."""


@pytest.fixture
def proxy(pg_server: Any) -> Iterator[tuple[subprocess.Popen[str], int]]:
    socket = next(pg_server.socket_dir.glob(".s.PGSQL.*"))
    proc = subprocess.Popen(
        [sys.executable, "-c", PROXY, str(socket)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    yield proc, port
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait(10)


async def test_a_partitioned_node_stops_and_its_late_commit_never_lands(
    fleet_dirs: list[CapdProcess],
    tmp_path: Path,
    audited: str,
    proxy: tuple[subprocess.Popen[str], int],
) -> None:
    proxy_proc, port = proxy
    database = audited.split("/")[3].split("?")[0]
    via_proxy = f"postgresql://capd@127.0.0.1:{port}/{database}"
    n1, n2 = _node(tmp_path, "n1", via_proxy), _node(tmp_path, "n2", audited)
    fleet_dirs += [n1, n2]
    await asyncio.gather(asyncio.to_thread(n1.start), asyncio.to_thread(n2.start))
    streaming = {"text": "x" * 20000, "chunk_chars": 1, "delay_ms": 1}
    manifest = {"name": "w1", "model": scripted(streaming, {"text": "done"})}
    await daemon_request(n1, {"method": "spawn", "manifest": manifest})
    async with await connect_pod(n1, "w1") as client:
        await client.request({"method": "run", "text": "go"})
        await wait_for(client, is_event("text_delta"))
        cut = time.monotonic()
        os.kill(proxy_proc.pid, signal.SIGSTOP)
        # A read now waits on the frozen connection: it must not freeze capd's loop past
        # the moment its lease watchdog has to stop it.
        reading = asyncio.create_task(client.request({"method": "history", "after_seq": 0}))
        assert n1.proc is not None
        code = await asyncio.to_thread(n1.proc.wait, TTL_S + 5)
        with contextlib.suppress(ConnectionClosed):
            await reading
    stopped = time.monotonic() - cut
    print(f"partitioned node exited {stopped:.2f} s after the cut (ttl {TTL_S:g} s)")
    assert code == 75
    assert stopped < TTL_S + 1
    output = n1.output()
    assert "could not renew its lease" in output or "did not answer a read in time" in output
    status = await _answers(n2, "w1", TTL_S + 5)
    adopted = time.monotonic() - cut
    print(f"survivor answers for the pod {adopted:.2f} s after the cut")
    assert status["node"] == "n2"
    os.kill(proxy_proc.pid, signal.SIGCONT)  # whatever n1 sent last reaches the server now
    await _pod_request(n2, "w1", {"method": "cancel"})
    await asyncio.sleep(0.5)  # room for a late COMMIT to land, were it able to
    _committed_once_by_n1_then_n2(audited)


def _committed_once_by_n1_then_n2(url: str, events: int | None = None) -> None:
    """Pod w1's events as the audit trigger saw them committed: each seq once with no gap
    (`events` of them, when given), and all of n1's before any of n2's."""
    rows = _sql(url, "SELECT app, seq FROM audit WHERE pod = 'w1' ORDER BY seq")
    count = len(rows) if events is None else events
    assert [seq for _, seq in rows] == list(range(1, count + 1)), "each event once"
    by_n1 = [seq for app, seq in rows if app.startswith("capd/n1/")]
    by_n2 = [seq for app, seq in rows if app.startswith("capd/n2/")]
    assert by_n1
    assert by_n2
    assert max(by_n1) < min(by_n2)


def _event(seq: int) -> StoredEvent:
    return (seq, time.time(), "status", b"{}")


def _join(url: str, node: str, ttl_s: float) -> int:
    """What Fleet.join does to the node's row, without a capd: its new incarnation."""
    [(incarnation,)] = _sql(
        url,
        "INSERT INTO nodes (name, incarnation, expires) VALUES (%s, nextval('node_incarnation'),"
        " clock_timestamp() + make_interval(secs => %s)) ON CONFLICT (name) DO UPDATE SET "
        "incarnation = excluded.incarnation, expires = excluded.expires RETURNING incarnation",
        node,
        ttl_s,
    )
    return int(incarnation)


async def test_a_store_that_lost_its_lease_commits_nothing_more(pg_url: str) -> None:
    """The fence before COMMIT: once another node ended this node's incarnation, the
    batch in flight rolls back whole and the store fails (capd would exit 75)."""
    failures: list[BaseException] = []
    store = PostgresStore(pg_url, failures.append)
    try:
        store.join_fleet("n1", _join(pg_url, "n1", 30), 30)
        store.add_pod("p0", "{}", None, time.time())
        store.append("p0", [_event(1)])
        await store.flush()
        assert _sql(pg_url, "SELECT node, epoch, family FROM leases") == [("n1", 1, "p0")]
        store.append("p0", [_event(2)])  # open, not committed yet, when n1 is ended
        _sql(pg_url, "UPDATE nodes SET incarnation = 0 WHERE name = 'n1' RETURNING 1")
        with pytest.raises(StoreFailed):
            await store.flush()
        assert [type(exc) for exc in failures] == [LeaseLost]
        assert _sql(pg_url, "SELECT seq FROM events") == [(1,)]
    finally:
        store.close()


async def test_a_name_another_node_took_is_already_exists(pg_url: str) -> None:
    """Two nodes spawning one name: the second INSERT does nothing and says so, instead of
    aborting its whole batch (and stopping its capd)."""
    one, two = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        one.join_fleet("n1", _join(pg_url, "n1", 30), 30)
        two.join_fleet("n2", _join(pg_url, "n2", 30), 30)
        one.add_pod("p0", "{}", None, time.time())
        await one.flush()
        with pytest.raises(ProtocolError) as refused:
            two.add_pod("p0", "{}", None, time.time())
        assert refused.value.code == "already_exists"
        two.add_pod("p1", "{}", "/run/capd/pods/p0.sock", time.time())
        await two.flush()
        assert _sql(pg_url, "SELECT pod, node, family FROM leases ORDER BY pod") == [
            ("p0", "n1", "p0"),
            ("p1", "n2", "p0"),
        ]
        assert [record.name for record in two.pods()] == ["p1"]
    finally:
        one.close()
        two.close()


COMMIT_WAITS = """
CREATE SEQUENCE commit_waits_once;
CREATE FUNCTION commit_waits() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('application_name') = 'capd/n2/control'
       AND nextval('commit_waits_once') = 1 THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER commit_waits AFTER UPDATE OF node ON leases
    FOR EACH STATEMENT EXECUTE FUNCTION commit_waits();
"""
"""The first scan of n2 that moves leases waits at its COMMIT for a standby that does not
exist (synchronous_standby_names is set, every other transaction commits `local`)."""


@contextlib.contextmanager
def _no_standby(url: str) -> Iterator[None]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER DATABASE " + conn.info.dbname + " SET synchronous_commit = local")
        conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            yield
        finally:
            conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
            conn.execute("SELECT pg_reload_conf()")


async def test_a_scan_whose_commit_went_through_unanswered_brings_its_pods_up(
    fleet_dirs: list[CapdProcess], tmp_path: Path, pg_url: str
) -> None:
    """n2's scan moves w1's lease, and its connection is cut while the COMMIT waits for
    synchronous replication: the move committed, n2 never heard. Its next scan finds the
    leases that transaction wrote and brings the pod up."""
    with _no_standby(pg_url):
        n1 = _node(tmp_path, "n1", pg_url, ttl_s=30)
        n2 = _node(tmp_path, "n2", pg_url, ttl_s=30)
        fleet_dirs += [n1, n2]
        await asyncio.gather(asyncio.to_thread(n1.start), asyncio.to_thread(n2.start))
        await daemon_request(
            n1, {"method": "spawn", "manifest": {"name": "w1", "model": scripted()}}
        )
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(COMMIT_WAITS)  # type: ignore[arg-type]
            assert await asyncio.to_thread(n1.signal, signal.SIGTERM) == 0
            async with asyncio.timeout(10):
                while not (
                    waiting := conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' "
                        "AND application_name = 'capd/n2/control'"
                    ).fetchall()
                ):
                    await asyncio.sleep(0.02)
            conn.execute("SELECT pg_terminate_backend(%s)", waiting[0])
        status = await _answers(n2, "w1", 10)
        assert (status["status"], status["node"]) == ("idle", "n2")


async def test_a_fleet_node_refuses_a_work_tree_that_could_not_move(
    fleet_dirs: list[CapdProcess], tmp_path: Path, pg_url: str
) -> None:
    n1 = _node(tmp_path, "n1", pg_url, ttl_s=30)
    fleet_dirs.append(n1)
    await asyncio.to_thread(n1.start)
    repo = make_repo(tmp_path / "repo")
    manifest = {"name": "w1", "model": scripted(), "workspace": {"git": {"repo": str(repo)}}}
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(n1, {"method": "spawn", "manifest": manifest})
    assert refused.value.code == "invalid_request"
    assert refused.value.message.startswith("workspace.git is refused on a fleet node")
    assert "\n" not in refused.value.message
    assert (await daemon_request(n1, {"method": "list"}))["pods"] == []
    assert not (n1.state_dir / "worktrees").exists()


async def test_placement_picks_the_live_node_with_fewest_pods(pg_url: str) -> None:
    from capd.fleet.control import Control
    from capd.fleet.placement import place

    for node in ("n1", "n2", "n3"):
        _join(pg_url, node, 30)
    _sql(pg_url, "UPDATE nodes SET expires = clock_timestamp() WHERE name = 'n3' RETURNING 1")
    _sql(pg_url, "INSERT INTO pods (name, manifest, created) VALUES ('p0', '{}', 0) RETURNING 1")
    _sql(pg_url, "INSERT INTO leases VALUES ('p0', 'n1', 1, 'p0') RETURNING 1")
    control = await Control.connect(pg_url, "n1")
    try:
        placed = await place(control, None, 30)
        assert placed is not None
        assert (placed.name, placed.pods) == ("n2", 0)
        placed = await place(control, "n1", 30)
        assert placed is not None
        assert (placed.name, placed.pods) == ("n1", 1)
        for dead in ("n3", "nope"):
            with pytest.raises(ProtocolError) as refused:
                await place(control, dead, 30)
            assert refused.value.code == "not_found"
        assert [info.name for info in await control.live_nodes(30)] == ["n1", "n2"]
        host = await control.host_of("p0", 30)
        assert host is not None
        assert (host.name, host.pods) == ("n1", 1)
    finally:
        await control.close()


def test_lease_ttl_option(capsys: pytest.CaptureFixture[str]) -> None:
    from capd.config import Config

    assert Config.from_args([]).lease_ttl_s == 15
    assert Config.from_args(["--lease-ttl-s", "2.5"]).lease_ttl_s == 2.5
    for bad in ("1.9", "inf", "nan"):
        with pytest.raises(SystemExit):
            Config.from_args(["--lease-ttl-s", bad])
        assert "--lease-ttl-s must be at least 2 seconds" in capsys.readouterr().err


SLOW = pytest.mark.skipif(
    not os.environ.get("CAPD_FLEET_SLOW"), reason="slower fleet tests: CAPD_FLEET_SLOW=1"
)


@SLOW
async def test_a_frozen_node_is_fenced_when_it_wakes(
    fleet_dirs: list[CapdProcess], tmp_path: Path, audited: str
) -> None:
    """SIGSTOP the node itself (a VM pause, a long GC) until its pod is adopted: once
    woken, it exits 75 and commits nothing more."""
    n1, n2 = _node(tmp_path, "n1", audited), _node(tmp_path, "n2", audited)
    fleet_dirs += [n1, n2]
    await asyncio.gather(asyncio.to_thread(n1.start), asyncio.to_thread(n2.start))
    streaming = {"text": "x" * 20000, "chunk_chars": 1, "delay_ms": 1}
    manifest = {"name": "w1", "model": scripted(streaming, {"text": "done"})}
    await daemon_request(n1, {"method": "spawn", "manifest": manifest})
    assert n1.proc is not None
    async with await connect_pod(n1, "w1") as client:
        await client.request({"method": "run", "text": "go"})
        await wait_for(client, is_event("text_delta"))
        n1.proc.send_signal(signal.SIGSTOP)
        try:
            assert (await _answers(n2, "w1", TTL_S + 5))["node"] == "n2"
        finally:
            n1.proc.send_signal(signal.SIGCONT)
        assert await asyncio.to_thread(n1.proc.wait, 10) == 75
    _committed_once_by_n1_then_n2(audited)


@SLOW
async def test_three_nodes_share_a_dead_nodes_pods(
    fleet_dirs: list[CapdProcess], tmp_path: Path, pg_url: str
) -> None:
    nodes = [_node(tmp_path, f"n{i}", pg_url) for i in (1, 2, 3)]
    fleet_dirs += nodes
    await asyncio.gather(*(asyncio.to_thread(node.start) for node in nodes))
    pods = [f"p{i}" for i in range(6)]
    for pod in pods:
        manifest = {"name": pod, "model": scripted()}
        await daemon_request(nodes[0], {"method": "spawn", "manifest": manifest})
    assert nodes[0].proc is not None
    nodes[0].proc.kill()
    hosts: dict[str, str] = {}
    async with asyncio.timeout(TTL_S + 8):
        while len(hosts) < len(pods):
            for pod in sorted(set(pods) - set(hosts)):
                for survivor in nodes[1:]:
                    with contextlib.suppress(ProtocolError):
                        status = await _pod_request(survivor, pod, {"method": "status"})
                        hosts[pod] = status["node"]
            await asyncio.sleep(0.05)
    assert sorted(hosts) == pods
    assert set(hosts.values()) == {"n2", "n3"}, hosts
    leases = _sql(pg_url, "SELECT pod, node, epoch FROM leases ORDER BY pod")
    assert leases == [(pod, hosts[pod], 2) for pod in pods]
