"""Dollars per million tokens: the manifest's `model.price`, else a well-known model's list
price, and what a model call cost at that price.

Every list price below was checked on 2026-11-29 (docs/protocol.md, "Budgets", names the
pages). A model whose price could not be confirmed is left out: its spending is counted in
tokens only until `model.price` says what it costs. Input counts cached prompt tokens at
the full input price, so a figure may be a little above the bill, never below it.
"""

import re

from protocol.events import Usage
from protocol.manifest import ModelConfig, Price

OPENAI_PRICING = "https://developers.openai.com/api/docs/pricing"
ANTHROPIC_MODELS = "https://platform.claude.com/docs/en/about-claude/models/overview"

KNOWN_PRICES: dict[str, tuple[Price, str]] = {
    name: (Price(input_per_mtok=inp, output_per_mtok=out), source)
    for name, inp, out, source in (
        ("gpt-5", 1.25, 10.00, OPENAI_PRICING),
        ("gpt-5-mini", 0.25, 2.00, OPENAI_PRICING),
        ("gpt-5-nano", 0.05, 0.40, OPENAI_PRICING),
        ("gpt-4.1", 2.00, 8.00, OPENAI_PRICING),
        ("gpt-4.1-mini", 0.40, 1.60, OPENAI_PRICING),
        ("gpt-4.1-nano", 0.10, 0.40, OPENAI_PRICING),
        ("gpt-4o", 2.50, 10.00, OPENAI_PRICING),
        ("gpt-4o-mini", 0.15, 0.60, OPENAI_PRICING),
        ("o3", 2.00, 8.00, OPENAI_PRICING),
        ("o4-mini", 1.10, 4.40, OPENAI_PRICING),
        ("claude-opus-4-5", 5.00, 25.00, ANTHROPIC_MODELS),
        ("claude-sonnet-4-6", 3.00, 15.00, ANTHROPIC_MODELS),
        ("claude-sonnet-4-5", 3.00, 15.00, ANTHROPIC_MODELS),
        ("claude-haiku-4-5", 1.00, 5.00, ANTHROPIC_MODELS),
    )
}
"""Model name → (list price, the page it was read on). Exact names, not prefixes: o3-mini,
o3-pro and gpt-4o's first snapshot cost something else."""

_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")
"""A dated snapshot's suffix (`gpt-4.1-2025-04-14`, `claude-sonnet-4-5-20250929`)."""
_OTHER_PRICE = frozenset({"gpt-4o-2024-05-13"})
"""Snapshots of a listed model sold at another price."""


def known_price(model_name: str) -> Price | None:
    """The list price of a well-known model, by its name or a dated snapshot of it; a
    provider prefix ("openai/gpt-4o") is dropped first. None for others."""
    name = model_name.rsplit("/", 1)[-1].lower()
    if name in _OTHER_PRICE:
        return None
    found = KNOWN_PRICES.get(name) or KNOWN_PRICES.get(_SNAPSHOT.sub("", name))
    return found[0] if found else None


def price_of(model: ModelConfig) -> Price | None:
    """What the pod's model costs: `model.price`, else a known list price."""
    return model.price or known_price(model.name)


def cost_usd(price: Price | None, usage: Usage) -> float | None:
    """What a call with this usage cost; None when the price is unknown."""
    if price is None:
        return None
    return (
        usage.input_tokens * price.input_per_mtok + usage.output_tokens * price.output_per_mtok
    ) / 1_000_000


def add_usage(usage: Usage, more: Usage) -> Usage:
    """Two usages added up, their dollars as `add_usd` adds them."""
    return Usage(
        input_tokens=usage.input_tokens + more.input_tokens,
        output_tokens=usage.output_tokens + more.output_tokens,
        cost_usd=add_usd(usage.cost_usd, more.cost_usd),
    )


def add_usd(total: float | None, more: float | None) -> float | None:
    """Dollars added up, where None is "no known price": it stays None only while
    every part is."""
    if more is None:
        return total
    return more if total is None else total + more
