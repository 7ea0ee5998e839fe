"""Pause latency while a turn streams about 1,000 text deltas a second.

Each sample: wait for a few deltas of the running turn, send `pause`, and time until both
its ack and the `status paused` event have arrived; then `resume`, which continues the same
turn, and wait until it streams again. The baseline is the echo server's round trip for
the same client, the least any request could take.
"""

import random
import time

from bench import servers
from bench.report import Figure, median, percentile
from bench.sizes import Size
from bench.wire import LineClient

DELAY_MS = 1.0
"""Between deltas: about 1,000 a second."""
DELTAS_BETWEEN = (5, 40)
"""Deltas to wait for after a resume before the next pause, chosen at random."""
SEED = 20261121


def _pause_once(client: LineClient, rid: int) -> float:
    """Milliseconds from sending `pause` until its ack and `status paused` are both in."""
    start = time.perf_counter()
    client.send({"id": rid, "method": "pause"})
    acked = paused = False
    while not (acked and paused):
        event = client.read()
        kind = event.get("event")
        if kind == "error":
            raise RuntimeError(f"pause: {event['code']}: {event['message']}")
        acked = acked or (kind == "ack" and event.get("id") == rid)
        paused = paused or (kind == "status" and event.get("status") == "paused")
    return (time.perf_counter() - start) * 1000


def _wait_deltas(client: LineClient, count: int) -> None:
    seen = 0
    while seen < count:
        event = client.read()
        if event.get("event") == "turn_end":
            raise RuntimeError("the scripted turn ended: make its text longer")
        seen += event.get("event") == "text_delta"


def run(size: Size) -> list[Figure]:
    rng = random.Random(SEED)
    samples: list[float] = []
    echo_ms: list[float] = []
    # Long enough for every pause: resume continues the text where the pause cut it.
    text = "x" * (size.pauses * DELTAS_BETWEEN[1] * 2 + 1000)
    step = {"text": text, "chunk_chars": 1, "delay_ms": DELAY_MS}
    with servers.capd() as capd, servers.baseline("echo") as echo:
        with LineClient(capd.socket) as daemon:
            manifest = {"limits": {"max_steps": size.pauses + 10}}
            pod = servers.spawn(daemon, "streamer", servers.scripted(step), **manifest)
        with LineClient(pod) as client, LineClient(echo.socket) as echo_client:
            client.request({"id": "sub", "method": "subscribe"})
            client.request({"id": "run", "method": "run", "text": "stream"})
            for i in range(size.pauses):
                _wait_deltas(client, rng.randint(*DELTAS_BETWEEN))
                samples.append(_pause_once(client, i))
                start = time.perf_counter()
                echo_client.request({"id": i, "method": "status"})
                echo_ms.append((time.perf_counter() - start) * 1000)
                client.request({"id": f"resume-{i}", "method": "resume"})
            client.request({"id": "end", "method": "cancel"})
    return [
        Figure("pause", "pause → paused, median", median(samples), "ms", "lower", median(echo_ms)),
        Figure(
            "pause",
            "pause → paused, p99",
            percentile(samples, 0.99),
            "ms",
            "lower",
            percentile(echo_ms, 0.99),
            10.0,
        ),
    ]
