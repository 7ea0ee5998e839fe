"""Soak: a pod with a small context window goes through `soak_turns` turns of long prompts,
compacting its context again and again, and capd's memory stays flat.

The pod's model is the `scripted` provider with a 2,048-token `context_window`: it echoes
each prompt (about 300 tokens by capd's estimate), and the script's one step is what a
summary call plays (a summary request holds no assistant message), so the context is
compacted every few turns. The figure is capd's RSS after the last turn against its RSS
after the first tenth of them (the code loaded and the allocator warm by then): flat is a
ratio near 1, where a context that kept its history would grow by the prompts' size.
"""

from bench import servers
from bench.report import Figure
from bench.sizes import Size
from bench.wire import LineClient

WINDOW = 2048
PROMPT = "lorem ipsum dolor sit amet " * 45
"""About 1,200 characters: some 300 tokens by capd's estimate."""
SUMMARY = "Summary: the user sent long prompts and each was echoed back. Nothing is open."


def _turn(pod: LineClient, i: int) -> int:
    """Run one turn and wait for its end; how many compactions it made."""
    turn_id = pod.request({"id": f"run-{i}", "method": "run", "text": f"{i}: {PROMPT}"})["result"][
        "turn_id"
    ]
    compactions = 0
    while True:
        event = pod.read()
        if event.get("event") == "context_compacted":
            compactions += 1
        elif event.get("event") == "turn_end" and event.get("turn_id") == turn_id:
            if event["result"] != "finished":
                raise RuntimeError(f"turn {i} ended {event['result']}: {event.get('error')}")
            return compactions


def run(size: Size) -> list[Figure]:
    turns = size.soak_turns
    warm = max(1, turns // 10)
    model = {**servers.scripted({"text": SUMMARY}), "context_window": WINDOW}
    with servers.capd() as capd, LineClient(capd.socket) as daemon:
        socket = servers.spawn(daemon, "soak", model)
        with LineClient(socket) as pod:
            pod.request({"id": "sub", "method": "subscribe"})
            compactions = sum(_turn(pod, i) for i in range(warm))
            warm_rss = capd.rss_bytes()
            compactions += sum(_turn(pod, i) for i in range(warm, turns))
            end_rss = capd.rss_bytes()
            context = pod.request({"id": "s", "method": "status"})["result"]["context"]
    if compactions < turns // 10:
        raise RuntimeError(f"{turns} turns made only {compactions} compactions")
    if context["tokens"] > WINDOW:
        raise RuntimeError(f"the context holds {context['tokens']} tokens, past the window")
    mb = 1 / 2**20
    return [
        Figure(
            "soak",
            f"capd RSS after {turns:,} turns ({compactions:,} compactions)",
            end_rss * mb,
            "MB",
            "lower",
            warm_rss * mb,
            1.1,
            target_is_ratio=True,
        ),
    ]
