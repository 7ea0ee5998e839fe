"""What a scrape reads of capd's state for capd.metrics: the pods, the ledger, the
subscribers and connections, the outbox table. Apart from capd.metrics because it reads the
supervisor, which imports capd.metrics for its hooks."""

from typing import TYPE_CHECKING

from capd.metrics import HOT, DaemonSample, PodSample, render
from protocol import VERSION

if TYPE_CHECKING:
    from capd.server import Endpoint
    from capd.supervisor import Supervisor


def scrape(supervisor: "Supervisor", endpoint: "Endpoint", start_time: float) -> str:
    """The exposition of capd now: `endpoint` is the daemon socket's."""
    reports, targets = supervisor.store.outbox_counts()
    pods = supervisor.pods.values()
    daemon = DaemonSample(
        version=VERSION,
        start_time=start_time,
        subscribers={
            "daemon": len(supervisor.hub.subscriptions)
            + len(supervisor.activity.hub.subscriptions),
            "pod": sum(len(pod.controller.hub.subscriptions) for pod in pods),
        },
        connections={
            "daemon": len(endpoint._connections),
            "pod": sum(len(pod.endpoint._connections) for pod in pods),
        },
        outbox_reports=reports,
        outbox_targets=targets,
        engine_processes=len(supervisor.engine_slots.live),
    )
    return render(daemon, pod_samples(supervisor))


def pod_samples(supervisor: "Supervisor") -> list[PodSample]:
    """Every pod capd knows, in creation order."""
    samples = []
    for record in supervisor.registry.all():
        name = record.name
        spent = supervisor.ledger.spent(name)
        pod = supervisor.running(name)
        if pod is None:
            usage = HOT.stopped_usage.get(name)
            if usage is None:
                usage = HOT.stopped_usage[name] = supervisor.store.usage_totals(name)
            status = "error" if supervisor.is_broken(name) else "stopped"
            samples.append(PodSample(name, status, *usage, spent["tokens"], spent["usd"]))
            continue
        live = pod.journal.usage
        samples.append(
            PodSample(
                name,
                pod.status,
                live.input_tokens,
                live.output_tokens,
                live.cost_usd,
                spent["tokens"],
                spent["usd"],
                context_tokens=pod.context.tokens(
                    pod.manifest.system_prompt, pod.toolbox.spec_tokens
                ),
                context_window=pod._context_window(),
                queued_runs=len(pod._queue),
                notifications=len(pod.notes),
                permission_requests=len(pod.journal.asked),
            )
        )
    return samples
