"""Density: memory per idle pod in one daemon, the rate pods are spawned at, and the time a
restart takes to restore them all.

One pod is spawned first so that code loaded on first use is not counted; then `pods` more
are spawned over one daemon connection with `SPAWNS_IN_FLIGHT` requests sent ahead of the
replies (pipelined, as a script would send them without waiting for each), so the rate is
capd's, not the round trip of a blocking client in another process. The RSS figure is capd's
growth divided by the pods. Then capd is stopped (SIGTERM) and started again on the same
directories: the restore figure is from its start until its daemon socket answers, which it
does once every pod is back up. Its runtime dir (the sockets) is on a tmpfs, as deployed
(systemd's RuntimeDirectory=, XDG_RUNTIME_DIR), its state dir on disk.

Baselines, a uvloop process holding as many listening Unix sockets (the floor of a pod,
which is one listening socket, an actor task and its state): its RSS per socket; its rate
binding one socket per request, pipelined alike; and its start until it has bound them all.
"""

import time

from bench import servers
from bench.report import Figure
from bench.sizes import Size
from bench.wire import LineClient

TOOLS = ["bash", "read_file", "write_file", "edit_file"]
SPAWNS_IN_FLIGHT = 16
"""Requests sent ahead of their replies on the one connection."""
RESTORE_TIMEOUT_S = 600.0


def _pipelined(client: LineClient, frames: list[dict[str, object]]) -> float:
    """Send `frames` with up to SPAWNS_IN_FLIGHT unanswered; the seconds until all are
    answered. Any error fails the bench."""
    start = time.perf_counter()
    sent = 0
    for answered in range(len(frames)):
        while sent < len(frames) and sent - answered < SPAWNS_IN_FLIGHT:
            client.send(frames[sent])
            sent += 1
        reply = client.read()
        if reply.get("event") != "ack":
            raise RuntimeError(f"{frames[answered]['method']}: {reply}")
    return time.perf_counter() - start


def _spawns(names: list[str]) -> list[dict[str, object]]:
    manifest = {"model": servers.scripted(), "tools": TOOLS}
    return [
        {"id": name, "method": "spawn", "manifest": {"name": name, **manifest}} for name in names
    ]


def run(size: Size) -> list[Figure]:
    n = size.density_pods
    listen_one = [{"id": i, "method": "listen", "count": 1} for i in range(n)]
    with (
        servers.baseline("listeners", tmpfs=True) as baseline,
        LineClient(baseline.socket) as client,
    ):
        client.request({"id": "warm", "method": "listen", "count": 1})
        before = baseline.rss_bytes()
        base_rate = n / _pipelined(client, listen_one)
        base_kb = (baseline.rss_bytes() - before) / n / 1024
    started = time.perf_counter()
    with (
        servers.baseline("listeners", tmpfs=True) as baseline,
        LineClient(baseline.socket) as client,
    ):
        client.request({"id": "listen", "method": "listen", "count": n})
        base_restore_s = time.perf_counter() - started
    room = ("--max-pods", str(n + 1))
    with servers.capd(*room, runtime=servers.tmpfs_dir("run")) as capd:
        with LineClient(capd.socket) as daemon:
            servers.spawn(daemon, "warm", servers.scripted(), tools=TOOLS)
            before = capd.rss_bytes()
            rate = n / _pipelined(daemon, _spawns([f"idle-{i}" for i in range(n)]))
            capd_kb = (capd.rss_bytes() - before) / n / 1024
        capd.stop()
        again = servers.capd(*room, workdir=capd.workdir, runtime=capd.runtime)
        again.start_timeout_s = RESTORE_TIMEOUT_S
        started = time.perf_counter()
        with again, LineClient(again.socket) as daemon:
            restore_s = time.perf_counter() - started
            pods = daemon.request({"id": "info", "method": "info"})["result"]["pods"]
    if pods != n + 1:
        raise RuntimeError(f"capd restored {pods} pods, expected {n + 1}")
    flight = f"{SPAWNS_IN_FLIGHT} in flight on one connection"
    return [
        Figure("density", f"RSS per idle pod ({n:,} pods)", capd_kb, "KB", "lower", base_kb, 20),
        Figure(
            "density",
            f"spawn rate, {n:,} pods, {flight}",
            rate,
            "pods/s",
            "higher",
            base_rate,
            1000,
        ),
        Figure(
            "density",
            f"restart until {n:,} idle pods are restored",
            restore_s,
            "s",
            "lower",
            base_restore_s,
            10,
        ),
    ]
