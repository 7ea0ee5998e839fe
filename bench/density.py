"""Density: memory per idle pod, and the time to spawn them, in one daemon.

One pod is spawned first so that code loaded on first use is not counted; then `pods` more
are spawned one request after another on one daemon connection, as a script calling
`capctl spawn` would (less the process start). The figure is capd's RSS growth divided by
the pods. Baseline: a uvloop process holding as many listening Unix sockets, the floor of
a pod (which is one listening socket, an actor task and its state).
"""

import time

from bench import servers
from bench.report import Figure
from bench.sizes import Size
from bench.wire import LineClient

TOOLS = ["bash", "read_file", "write_file", "edit_file"]


def run(size: Size) -> list[Figure]:
    n = size.pods
    with servers.baseline("listeners") as baseline, LineClient(baseline.socket) as client:
        client.request({"id": "warm", "method": "listen", "count": 1})
        before = baseline.rss_bytes()
        client.request({"id": "listen", "method": "listen", "count": n})
        base_kb = (baseline.rss_bytes() - before) / n / 1024
    with servers.capd() as capd, LineClient(capd.socket) as daemon:
        servers.spawn(daemon, "warm", servers.scripted(), tools=TOOLS)
        before = capd.rss_bytes()
        start = time.perf_counter()
        for i in range(n):
            servers.spawn(daemon, f"idle-{i}", servers.scripted(), tools=TOOLS)
        spawn_s = time.perf_counter() - start
        capd_kb = (capd.rss_bytes() - before) / n / 1024
        pods = daemon.request({"id": "info", "method": "info"})["result"]["pods"]
        if pods != n + 1:
            raise RuntimeError(f"capd reports {pods} pods up, expected {n + 1}")
    return [
        Figure("density", f"RSS per idle pod ({n} pods)", capd_kb, "KB", "lower", base_kb, 50),
        Figure("density", f"time to spawn {n} pods", spawn_s, "s", "lower", None, 5),
    ]
