"""How big each benchmark runs: `full` for figures, `tiny` for the test that it runs."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Size:
    round_trips: int
    """Status requests per server, over all rounds."""
    fanout_subscribers: int
    fanout_deltas: int
    pauses: int
    pods: int
    """Idle pods up while the metrics are scraped."""
    density_pods: int
    """Idle pods spawned, measured and restored by `density`."""
    durable_events: int
    capctl_runs: int
    restore_events: int
    restore_rounds: int
    """Stops and starts of each pod whose restore is timed."""
    soak_turns: int
    checkpoint_files: int
    checkpoint_mb: int
    """The cwd checkpointed: how many files, how many MB in all."""
    checkpoint_rounds: int
    """Rounds of one file changed, then a checkpoint and a `git add -A && git commit`."""
    mcp_calls: int
    """MCP `echo` calls timed, through capd and directly (and `bash true` calls)."""
    sandbox_calls: int
    """`bash true` calls timed confined, and as many with sandbox mode `off`."""
    engine_pods: int
    """Pods on the Claude Code stand-in whose idle engines are kept, then stopped."""
    engine_turns: int
    """Turns timed on a live engine, and as many after the engine stopped."""


SIZES = {
    "full": Size(
        round_trips=8000,
        fanout_subscribers=100,
        fanout_deltas=20_000,
        pauses=200,
        pods=1000,
        density_pods=10_000,
        durable_events=50_000,
        capctl_runs=30,
        restore_events=100_000,
        restore_rounds=50,
        soak_turns=2000,
        checkpoint_files=10_000,
        checkpoint_mb=100,
        checkpoint_rounds=15,
        mcp_calls=300,
        sandbox_calls=200,
        engine_pods=20,
        engine_turns=7,
    ),
    "tiny": Size(
        round_trips=80,
        fanout_subscribers=5,
        fanout_deltas=200,
        pauses=3,
        pods=10,
        density_pods=10,
        durable_events=500,
        capctl_runs=2,
        restore_events=600,
        restore_rounds=2,
        soak_turns=30,
        checkpoint_files=200,
        checkpoint_mb=2,
        checkpoint_rounds=3,
        mcp_calls=5,
        sandbox_calls=5,
        engine_pods=2,
        engine_turns=2,
    ),
}
