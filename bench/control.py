"""Control round trip: `status` request → ack on a pod socket, from another process.

Baseline: the same frames to the uvloop echo server. Requests go to the two in alternating
blocks of BLOCK, with client and servers on one CPU (see `servers.pinned`): short enough
that whatever else the machine does at a moment hits both alike, long enough that each
server runs warm as it does for a client that polls it.
"""

import time

from bench import servers
from bench.report import Figure, median, percentile
from bench.sizes import Size
from bench.wire import LineClient

BLOCK = 50


def _timed(client: LineClient, rid: int) -> float:
    """Milliseconds for one `status` round trip."""
    start = time.perf_counter()
    client.request({"id": rid, "method": "status"})
    return (time.perf_counter() - start) * 1000


def run(size: Size) -> list[Figure]:
    capd_ms: list[float] = []
    echo_ms: list[float] = []
    warm_up = size.round_trips // 10
    with servers.capd() as capd, servers.baseline("echo") as echo:
        with LineClient(capd.socket) as daemon:
            pod = servers.spawn(daemon, "ctl", servers.scripted())
        with (
            servers.pinned(capd, echo),
            LineClient(pod) as pod_client,
            LineClient(echo.socket) as echo_client,
        ):
            for block in range(0, warm_up + size.round_trips, BLOCK):
                capd_block = [_timed(pod_client, block + i) for i in range(BLOCK)]
                echo_block = [_timed(echo_client, block + i) for i in range(BLOCK)]
                if block >= warm_up:
                    capd_ms += capd_block
                    echo_ms += echo_block
    return [
        Figure(
            "control",
            "status round trip, median",
            median(capd_ms),
            "ms",
            "lower",
            median(echo_ms),
            1.5,
            target_is_ratio=True,
        ),
        Figure(
            "control",
            "status round trip, p99",
            percentile(capd_ms, 0.99),
            "ms",
            "lower",
            percentile(echo_ms, 0.99),
            1.5,
            target_is_ratio=True,
        ),
    ]
