"""`python -m bench [--size tiny|full] [--only NAME ...] [--json] [--check]`: run the
benchmarks and print one table (or one JSON object per figure); `--check` exits 1 when a
figure misses its target."""

import argparse
import sys
import time
from collections.abc import Callable

import orjson

from bench import (
    capctl_wall,
    checkpoint,
    control,
    density,
    durable,
    engines,
    fanout,
    mcp,
    metrics,
    pause,
    pgstore,
    restore,
    sandbox,
    soak,
    tracing,
)
from bench.report import Figure, table
from bench.sizes import SIZES, Size

BENCHMARKS: dict[str, Callable[[Size], list[Figure]]] = {
    "control": control.run,
    "fanout": fanout.run,
    "pause": pause.run,
    "density": density.run,
    "durable": durable.run,
    "pgstore": pgstore.run,
    "capctl": capctl_wall.run,
    "restore": restore.run,
    "soak": soak.run,
    "checkpoint": checkpoint.run,
    "mcp": mcp.run,
    "sandbox": sandbox.run,
    "metrics": metrics.run,
    "tracing": tracing.run,
    "engines": engines.run,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--json", action="store_true", help="one JSON object per figure")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    size = SIZES[args.size]
    figures: list[Figure] = []
    for name in args.only:
        started = time.monotonic()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        figures += BENCHMARKS[name](size)
        print(f"  {name} took {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    if args.json:
        for fig in figures:
            print(orjson.dumps(fig.as_dict()).decode())
    else:
        print(table(figures))
    missed = [fig for fig in figures if fig.met is False]
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
