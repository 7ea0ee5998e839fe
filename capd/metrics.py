"""capd's metrics in the Prometheus text exposition format 0.0.4 (docs/protocol.md: Metrics).

Nearly every figure is read when a scrape asks, from state capd keeps anyway (the pods'
journals, the ledger, the registry, the outbox table). What happens and is gone — a turn
ending, a model or tool call, a subscriber lagging — is counted as it happens in `HOT`,
through the hooks below: a dict update each, cheap enough for the paths they sit on
(bench/metrics.py). The text is written by hand: prometheus-client would cost an import
and ~10x per observation and per scrape, and only its parser is used, in the tests.
"""

import asyncio
import functools
import os
import resource
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, get_args

from capd.tools.base import ToolOutcome
from protocol.events import PodStatusName, Usage
from protocol.manifest import Manifest, ModelConfig

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MODEL_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
"""Seconds, for a model call with its retries."""
TOOL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
STATUSES = (*get_args(PodStatusName), "stopped", "error")
"""`capd_pods`' statuses: a pod's own, then those of pods not up."""
UNKNOWN_TOOL = "unknown"
"""The `tool` label of a call to a tool the pod does not offer: the model names those,
so they would make series without bound."""

PER_POD = (
    (
        "capd_cost_usd_total",
        "counter",
        "cost_usd",
        "Dollars the pod's model calls cost; absent while no call had a known price.",
    ),
    (
        "capd_subtree_spent_tokens",
        "gauge",
        "spent_tokens",
        "Tokens the pod and its descendants spent, as its budget counts them.",
    ),
    (
        "capd_subtree_spent_usd",
        "gauge",
        "spent_usd",
        "Dollars the pod and its descendants spent, as its budget counts them.",
    ),
    (
        "capd_context_tokens",
        "gauge",
        "context_tokens",
        "The size of the context the pod's next model call sends (pods up).",
    ),
    (
        "capd_context_window_tokens",
        "gauge",
        "context_window",
        "The context window of the pod's model, where known (pods up).",
    ),
    ("capd_queued_runs", "gauge", "queued_runs", "Runs queued behind the pod's turn (pods up)."),
    (
        "capd_buffered_notifications",
        "gauge",
        "notifications",
        "Notifications buffered for the pod's next model call (pods up).",
    ),
    (
        "capd_open_permission_requests",
        "gauge",
        "permission_requests",
        "Permission questions of the pod waiting for an answer (pods up).",
    ),
)
"""The per-pod families after capd_tokens_total: (name, type, PodSample field, help)."""

Labels = tuple[str, ...]
T = TypeVar("T")


class _ModelCaller(Protocol):
    """What `timed_model_call` reads of the engine (capd.engines.builtin)."""

    _model: ModelConfig


class _ToolRunner(Protocol):
    """What `timed_tool_run` asks of the toolbox (capd.tools.toolbox)."""

    def offers(self, name: str) -> bool: ...


class Histogram:
    """Observations by label values: per series the count in each bucket (not yet
    cumulative; the last one is +Inf's own) and then the sum."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.series: dict[Labels, list[float]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0] * (len(self.bounds) + 1) + [0.0]
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value


class Hot:
    """What is counted as it happens; a capd restart starts it again at zero (which
    Prometheus takes for a counter reset)."""

    def __init__(self) -> None:
        self.turns: dict[tuple[str, str], int] = {}
        """(pod, result) → turns ended."""
        self.model_calls = Histogram(MODEL_BUCKETS)
        """(provider, model, outcome) → seconds per call."""
        self.retries: dict[str, int] = {}
        """provider → model calls sent again."""
        self.tool_calls = Histogram(TOOL_BUCKETS)
        """(tool, outcome) → seconds per call."""
        self.lagged = 0
        self.engine_stops: dict[str, int] = {}
        """reason (`idle`, `limit`) → engine processes capd stopped."""
        self.engine_limit_exceeded = 0
        self.stopped_usage: dict[str, tuple[int, int, float | None]] = {}
        """A stopped pod's usage totals, which cannot change while it is stopped: taken
        when it stops, or from the store at capd's start, rather than at every scrape."""

    def forget_pod(self, name: str) -> None:
        """A deleted pod's series go away."""
        self.stopped_usage.pop(name, None)
        for key in [key for key in self.turns if key[0] == name]:
            del self.turns[key]


HOT = Hot()


# -- the hooks --------------------------------------------------------------------------


def turn_ended(pod: str, result: str) -> None:
    key = (pod, result)
    HOT.turns[key] = HOT.turns.get(key, 0) + 1


def model_retried(provider: str) -> None:
    HOT.retries[provider] = HOT.retries.get(provider, 0) + 1


def subscription_lagged() -> None:
    HOT.lagged += 1


def engine_stopped(reason: str) -> None:
    HOT.engine_stops[reason] = HOT.engine_stops.get(reason, 0) + 1


def engine_limit_exceeded() -> None:
    HOT.engine_limit_exceeded += 1


def usage_stored(name: str, totals: tuple[int, int, float | None]) -> None:
    """A pod's usage totals as the store has them at capd's start (the ledger reads them
    anyway), for the scrapes while it is stopped."""
    HOT.stopped_usage[name] = totals


def pod_stopped(name: str, usage: Usage) -> None:
    HOT.stopped_usage[name] = (usage.input_tokens, usage.output_tokens, usage.cost_usd)


def pod_deleted(name: str, manifests: Iterable[str]) -> None:
    """The deleted pod's series go away, and the model calls' series of the models no pod
    left uses (`manifests`: the pods', as JSON): model names come from manifests, so over a
    long life they would grow without bound."""
    HOT.forget_pod(name)
    used = set()
    for text in manifests:
        try:
            model = Manifest.model_validate_json(text).model
        except ValueError:
            continue  # a pod that cannot be restored runs no model
        if model is not None:
            used.add((model.provider, model.name))
    series = HOT.model_calls.series
    for labels in [labels for labels in series if labels[:2] not in used]:
        del series[labels]


def timed_model_call(call: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorates `BuiltinEngine._retrying`: one logical model call, its retries included, by
    outcome `ok` or `error`. A call cut short by a pause, cancel or stop is not counted."""

    @functools.wraps(call)
    async def timed(engine: _ModelCaller, *args: Any) -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            reply = await call(engine, *args)
            outcome = "ok"
            return reply
        except asyncio.CancelledError:
            outcome = ""
            raise
        finally:
            if outcome:
                model = engine._model
                labels = (model.provider, model.name, outcome)
                HOT.model_calls.observe(labels, time.perf_counter() - started)

    return timed


def timed_tool_run(
    run: Callable[..., Awaitable[ToolOutcome]],
) -> Callable[..., Awaitable[ToolOutcome]]:
    """Decorates `Toolbox._run`: every call, by tool and outcome (`error` when its result
    is an error), a permission question's wait included. A call cut short by a pause,
    cancel or stop is not counted."""

    @functools.wraps(run)
    async def timed(
        toolbox: _ToolRunner, name: str, arguments: dict[str, Any], approve: Any = None
    ) -> ToolOutcome:
        started = time.perf_counter()
        outcome = await run(toolbox, name, arguments, approve)
        labels = (
            name if toolbox.offers(name) else UNKNOWN_TOOL,
            "error" if outcome.is_error else "ok",
        )
        HOT.tool_calls.observe(labels, time.perf_counter() - started)
        return outcome

    return timed


# -- what a scrape reads ----------------------------------------------------------------


@dataclass(slots=True)
class PodSample:
    """One pod's figures at a scrape; the live-only ones are None for a pod not up."""

    name: str
    status: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    spent_tokens: int
    spent_usd: float | None
    context_tokens: int | None = None
    context_window: int | None = None
    queued_runs: int | None = None
    notifications: int | None = None
    permission_requests: int | None = None


@dataclass(slots=True)
class DaemonSample:
    """capd's own figures at a scrape."""

    version: str
    start_time: float
    subscribers: dict[str, int]
    """socket kind (`daemon`, `pod`) → subscriptions."""
    connections: dict[str, int]
    outbox_reports: int
    outbox_targets: int
    engine_processes: int = 0
    """External engine processes running."""


def render(daemon: DaemonSample, pods: list[PodSample], hot: Hot = HOT) -> str:
    """The exposition: every family once, HELP and TYPE first, each series once."""
    out = _Writer()
    out.family("capd_build_info", "gauge", "capd's version; always 1.")
    out.sample("capd_build_info", f'{{version="{_escape(daemon.version)}"}}', 1)
    out.family("capd_start_time_seconds", "gauge", "When capd started, in Unix time.")
    out.sample("capd_start_time_seconds", "", daemon.start_time)
    out.family("capd_pods", "gauge", "Pods capd knows, by status.")
    counts = dict.fromkeys(STATUSES, 0)
    for pod in pods:
        counts[pod.status] += 1
    for status, count in counts.items():
        out.sample("capd_pods", f'{{status="{status}"}}', count)

    names = {pod.name: _escape(pod.name) for pod in pods}
    out.family("capd_turns_total", "counter", "Turns ended since capd started, by result.")
    for (pod, result), count in hot.turns.items():
        if pod in names:
            out.sample("capd_turns_total", f'{{pod="{names[pod]}",result="{result}"}}', count)
    out.family("capd_tokens_total", "counter", "Tokens the pod's model calls used, by type.")
    for pod in pods:
        label = names[pod.name]
        out.sample("capd_tokens_total", f'{{pod="{label}",type="input"}}', pod.input_tokens)
        out.sample("capd_tokens_total", f'{{pod="{label}",type="output"}}', pod.output_tokens)
    for family, kind, field, help_text in PER_POD:
        out.family(family, kind, help_text)
        for pod in pods:
            if (value := getattr(pod, field)) is not None:
                out.sample(family, f'{{pod="{names[pod.name]}"}}', value)
    _histogram(
        out,
        "capd_model_call_duration_seconds",
        hot.model_calls,
        ("provider", "model", "outcome"),
        "Model calls of the builtin engine, retries included, in seconds.",
    )
    out.family("capd_model_call_retries_total", "counter", "Model calls sent again.")
    for provider, count in hot.retries.items():
        out.sample("capd_model_call_retries_total", f'{{provider="{_escape(provider)}"}}', count)
    _histogram(
        out,
        "capd_tool_call_duration_seconds",
        hot.tool_calls,
        ("tool", "outcome"),
        "Tool calls of the builtin engine, in seconds.",
    )

    out.family("capd_subscribers", "gauge", "Subscribed connections, by socket.")
    for socket, count in daemon.subscribers.items():
        out.sample("capd_subscribers", f'{{socket="{socket}"}}', count)
    out.family("capd_subscriptions_lagged_total", "counter", "Subscriptions ended with `lagged`.")
    out.sample("capd_subscriptions_lagged_total", "", hot.lagged)
    out.family("capd_outbox_reports", "gauge", "Reports to parents not delivered yet.")
    out.sample("capd_outbox_reports", "", daemon.outbox_reports)
    out.family("capd_outbox_targets", "gauge", "Parent sockets with reports waiting.")
    out.sample("capd_outbox_targets", "", daemon.outbox_targets)
    out.family("capd_connections", "gauge", "Open client connections, by socket.")
    for socket, count in daemon.connections.items():
        out.sample("capd_connections", f'{{socket="{socket}"}}', count)
    _engines(out, daemon, hot)
    _process(out)
    return out.text()


def _engines(out: "_Writer", daemon: DaemonSample, hot: Hot) -> None:
    out.family("capd_engine_processes", "gauge", "External engine processes running.")
    out.sample("capd_engine_processes", "", daemon.engine_processes)
    out.family(
        "capd_engine_stops_total",
        "counter",
        "Engine processes capd stopped, idle or over --max-engine-processes, by reason.",
    )
    for reason in ("idle", "limit"):
        out.sample(
            "capd_engine_stops_total", f'{{reason="{reason}"}}', hot.engine_stops.get(reason, 0)
        )
    out.family(
        "capd_engine_limit_exceeded_total",
        "counter",
        "Engine processes started over --max-engine-processes: every other one was busy.",
    )
    out.sample("capd_engine_limit_exceeded_total", "", hot.engine_limit_exceeded)


def _histogram(out: "_Writer", family: str, hist: Histogram, names: Labels, help_text: str) -> None:
    out.family(family, "histogram", help_text)
    bounds = [*map(repr, hist.bounds), "+Inf"]
    for values, series in hist.series.items():
        labels = ",".join(
            f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True)
        )
        running = 0
        for bound, count in zip(bounds, series, strict=False):
            running += int(count)
            out.sample(f"{family}_bucket", f'{{{labels},le="{bound}"}}', running)
        out.sample(f"{family}_sum", f"{{{labels}}}", series[-1])
        out.sample(f"{family}_count", f"{{{labels}}}", running)


def _process(out: "_Writer") -> None:
    """The standard process_* figures, from /proc (absent where there is none)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.family("process_cpu_seconds_total", "counter", "CPU time capd used, in seconds.")
    out.sample("process_cpu_seconds_total", "", usage.ru_utime + usage.ru_stime)
    try:
        with open("/proc/self/statm", "rb") as statm:
            resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        return
    out.family("process_resident_memory_bytes", "gauge", "capd's resident memory, in bytes.")
    out.sample("process_resident_memory_bytes", "", resident)
    out.family("process_open_fds", "gauge", "File descriptors capd has open.")
    out.sample("process_open_fds", "", fds)


class _Writer:
    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}")

    def sample(self, name: str, labels: str, value: float) -> None:
        self._lines.append(f"{name}{labels} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _number(value: float) -> str:
    if type(value) is int:
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    """A label value as 0.0.4 writes it: backslash, double quote and newline escaped."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value
