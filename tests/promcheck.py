"""A strict check of the Prometheus text exposition format 0.0.4.

prometheus-client's parser (used by the tests for the values) accepts much the format
forbids: a histogram without `+Inf`, buckets that are not cumulative, a bad escape, no
final newline, a series twice, TYPE after the samples. `check` refuses each of them, and
also a family split in two groups, an illegal name, and `_total` on anything but a counter.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|\Z)')
SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^\n]*\})?[ \t]+(\S+)(?:[ \t]+-?\d+)?\Z")
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\Z|NaN\Z|[-+]Inf\Z")
HELP_ESCAPE = re.compile(r"\\(?![\\n])")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
Fail = Callable[[str], "NotExposition"]
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""Every sample of an exposition: (sample name, labels) → value."""


class NotExposition(AssertionError):
    """The text breaks a rule of the format; the message says which, and on which line."""


@dataclass
class _Family:
    kind: str = "untyped"
    helped: bool = False
    typed: bool = False
    sampled: bool = False
    series: set[tuple[str, frozenset[tuple[str, str]]]] = field(default_factory=set)
    buckets: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = field(
        default_factory=dict
    )
    counts: dict[frozenset[tuple[str, str]], float] = field(default_factory=dict)


def check(text: str) -> None:
    """Raise NotExposition at the first rule `text` breaks."""
    if not text.endswith("\n"):
        raise NotExposition("the last line does not end with a newline")
    families: dict[str, _Family] = {}
    finished: set[str] = set()
    current: str | None = None
    for number, line in enumerate(text.split("\n")[:-1], 1):

        def fail(why: str, number: int = number, line: str = line) -> NotExposition:
            return NotExposition(f"line {number}: {why}: {line!r}")

        if "\r" in line:
            raise fail("carriage return")
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue  # a comment
            name = parts[2]
            if not NAME.match(name):
                raise fail("illegal metric name")
            family = families.setdefault(name, _Family())
            if family.sampled:
                raise fail(f"{parts[1]} after the family's samples")
            if parts[1] == "HELP":
                if family.helped:
                    raise fail("a second HELP")
                if HELP_ESCAPE.search(parts[3] if len(parts) > 3 else ""):
                    raise fail("an escape other than \\\\ and \\n in HELP")
                family.helped = True
            else:
                kind = parts[3] if len(parts) > 3 else ""
                if family.typed:
                    raise fail("a second TYPE")
                if kind not in TYPES:
                    raise fail("unknown type")
                if name.endswith("_total") != (kind == "counter"):
                    raise fail("_total is for counters, and counters end in _total")
                family.typed, family.kind = True, kind
        else:
            match = SAMPLE.match(line)
            if match is None:
                raise fail("not a sample")
            sample, labels_text, value_text = match.groups()
            if not NUMBER.match(value_text):
                raise fail("not a number")
            labels = _labels(labels_text or "", fail)
            name = _family_of(sample, families)
            family = families.setdefault(name, _Family())
            family.sampled = True
            key = (sample, frozenset(labels.items()))
            if key in family.series:
                raise fail("the same series twice")
            family.series.add(key)
            _collect_histogram(family, sample, name, labels, float(value_text), fail)
        if name != current:
            if name in finished:
                raise fail(f"family {name} continues after another family")
            if current is not None:
                finished.add(current)
            current = name
    for name, family in families.items():
        if family.kind == "histogram":
            _check_histogram(name, family)


def samples(text: str) -> Samples:
    """`text` checked strictly, then read by prometheus-client's parser."""
    check(text)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when there is no such series."""
    return found.get((name, frozenset(labels.items())), 0.0)


def _labels(text: str, fail: Fail) -> dict[str, str]:
    if not text:
        return {}
    inner, labels = text[1:-1], {}
    while inner:
        match = LABEL.match(inner)
        if match is None:
            raise fail("bad labels (names, quoting or escapes)")
        name, value, _ = match.groups()
        if name in labels:
            raise fail(f"label {name} twice")
        labels[name] = value
        inner = inner[match.end() :]
    return labels


def _family_of(sample: str, families: dict[str, _Family]) -> str:
    if sample in families and families[sample].kind not in SUFFIXES:
        return sample
    for kind, suffixes in SUFFIXES.items():
        for suffix in suffixes:
            base = sample.removesuffix(suffix)
            if base != sample and base in families and families[base].kind == kind:
                return base
    return sample


def _collect_histogram(
    family: _Family,
    sample: str,
    name: str,
    labels: dict[str, str],
    value: float,
    fail: Fail,
) -> None:
    if family.kind != "histogram":
        if "le" in labels and family.kind != "untyped":
            raise fail("label le outside a histogram")
        return
    if sample == f"{name}_bucket":
        if "le" not in labels:
            raise fail("a bucket without le")
        le = labels.pop("le")
        if not NUMBER.match(le):
            raise fail("le is not a number")
        family.buckets.setdefault(frozenset(labels.items()), []).append((float(le), value))
    elif "le" in labels:
        raise fail("le on a histogram's _sum or _count")
    elif sample == f"{name}_count":
        family.counts[frozenset(labels.items())] = value


def _check_histogram(name: str, family: _Family) -> None:
    sums = {labels for sample, labels in family.series if sample == f"{name}_sum"}
    for labels, buckets in family.buckets.items():
        where = f"histogram {name}{dict(labels)}"
        bounds = [le for le, _ in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise NotExposition(f"{where}: le not increasing")
        if not bounds or bounds[-1] != math.inf:
            raise NotExposition(f'{where}: no le="+Inf" bucket last')
        counts = [count for _, count in buckets]
        if counts != sorted(counts):
            raise NotExposition(f"{where}: buckets not cumulative")
        if family.counts.get(labels) != counts[-1]:
            raise NotExposition(f"{where}: +Inf bucket is not _count")
        if labels not in sums:
            raise NotExposition(f"{where}: no _sum")
    if set(family.counts) != set(family.buckets):
        raise NotExposition(f"histogram {name}: _count without buckets, or buckets without it")
