"""Figures and the table they are printed in."""

import statistics
from dataclasses import dataclass
from typing import Any, Literal

Better = Literal["lower", "higher"]


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure, its baseline from the same run, and its target.

    `target` bounds the ratio when `target_is_ratio`, else the value itself."""

    bench: str
    name: str
    value: float
    unit: str
    better: Better
    baseline: float | None = None
    target: float | None = None
    target_is_ratio: bool = False

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        measured = self.ratio if self.target_is_ratio else self.value
        if measured is None:
            return None
        return measured <= self.target if self.better == "lower" else measured >= self.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "bench": self.bench,
            "figure": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": self.target_text() or None,
            "met": self.met,
        }

    def target_text(self) -> str:
        if self.target is None:
            return ""
        sign = "≤" if self.better == "lower" else "≥"
        return f"{sign} {self.target:g}x" if self.target_is_ratio else f"{sign} {self.target:g}"


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of `values`."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values)


def _number(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


HEADER = ("benchmark", "figure", "capd", "baseline", "ratio", "target", "")


def table(figures: list[Figure]) -> str:
    rows = [HEADER]
    for fig in figures:
        verdict = {True: "ok", False: "MISSED", None: ""}[fig.met]
        rows.append(
            (
                fig.bench,
                fig.name,
                f"{_number(fig.value)} {fig.unit}",
                "" if fig.baseline is None else f"{_number(fig.baseline)} {fig.unit}",
                "" if fig.ratio is None else f"{fig.ratio:.2f}x",
                fig.target_text(),
                verdict,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)
