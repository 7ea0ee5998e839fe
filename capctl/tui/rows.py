"""The rows `capctl top` shows, from `pod_activity` objects: the pod tree in order (each
child under its parent, indented) and each row's cells. Shared by the live view and
`top --once`; no terminal code here."""

from collections.abc import Iterable, Mapping
from typing import Any

from capctl.render import duration, token_count, usd

Pod = dict[str, Any]

COLUMNS: tuple[tuple[str, int], ...] = (
    ("POD", 22),
    ("STATUS", 11),
    ("TURN", 8),
    ("STEP", 4),
    ("TOOL/PHASE", 16),
    ("FOR", 9),
    ("CTX%", 4),
    ("TOKENS", 9),
    ("USD", 7),
)
"""Each column and its width: the table's layout must not follow its first rows."""
QUESTION = "!"
"""Marks a pod with open permission questions, their count after it (`running !1`)."""


def tree(pods: Mapping[str, Pod]) -> list[tuple[Pod, int]]:
    """The pods in tree order with their depth: each top-level pod (in the order given),
    then its children, theirs, and so on. A pod whose parent is not among them (another
    capd's, or deleted) is top-level."""
    name_at = {pod.get("socket"): name for name, pod in pods.items()}
    children: dict[str | None, list[Pod]] = {}
    for name, pod in pods.items():
        parent = name_at.get(pod.get("parent"))
        children.setdefault(parent if parent != name else None, []).append(pod)
    ordered: list[tuple[Pod, int]] = []
    seen: set[str] = set()

    def add(pod: Pod, depth: int) -> None:
        if pod["pod"] in seen:
            return
        seen.add(pod["pod"])
        ordered.append((pod, depth))
        for child in children.get(pod["pod"], ()):
            add(child, depth + 1)

    for pod in children.get(None, ()):
        add(pod, 0)
    for pod in pods.values():  # a cycle of parents has no top: show it anyway
        add(pod, 0)
    return ordered


def status_cell(pod: Pod) -> str:
    status = "error" if pod.get("error") else str(pod.get("status", "?"))
    asked = pod.get("permissions") or 0
    return f"{status} {QUESTION}{asked}" if asked else status


def phase_cell(pod: Pod) -> str:
    """The running tool, else what the turn waits for; for an idle pod, how its last turn
    ended."""
    phase = pod.get("phase")
    if phase == "tool":
        return str(pod.get("tool") or "tool")
    if phase:
        return str(phase)
    if pod.get("error"):
        return "not restored"
    if pod.get("status") == "idle" and pod.get("last_result"):
        return str(pod["last_result"])
    return "-"


def for_cell(pod: Pod, now: float) -> str:
    """How long the pod has been in its phase, else in its status."""
    since = pod.get("phase_since") if pod.get("phase") else pod.get("since")
    if not since:
        return "-"
    return duration(max(0.0, now - since))


def context_cell(pod: Pod) -> str:
    window = pod.get("context_window")
    if not window:
        return "-"
    return f"{100 * (pod.get('context_tokens') or 0) // window}"


def cells(pod: Pod, depth: int, now: float) -> tuple[str, ...]:
    usage = pod.get("usage") or {}
    turn = pod.get("turn_id")
    return (
        "  " * depth + str(pod.get("pod", "?")),
        status_cell(pod),
        turn[:8] if turn else "-",
        str(pod.get("step", 0)) if turn else "-",
        phase_cell(pod),
        for_cell(pod, now),
        context_cell(pod),
        token_count((usage.get("input_tokens") or 0) + (usage.get("output_tokens") or 0)),
        usd(usage.get("cost_usd")),
    )


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def plain_table(rows: Iterable[tuple[str, ...]]) -> str:
    """Rows as text in the columns' widths, the header first (`top --once`)."""
    widths = [width for _, width in COLUMNS]
    lines = []
    for row in [tuple(name for name, _ in COLUMNS), *rows]:
        cut = [clip(cell, width).ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cut).rstrip())
    return "\n".join(lines)


def once(pods: Mapping[str, Pod], now: float) -> str:
    return plain_table(cells(pod, depth, now) for pod, depth in tree(pods))
