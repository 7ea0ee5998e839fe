"""Known list prices (capd/prices.py): which names match, and what a call costs."""

import pytest

from capd.prices import cost_usd, known_price, price_of
from protocol.events import Usage
from protocol.manifest import ModelConfig, Price


@pytest.mark.parametrize(
    ("name", "prices"),
    [
        ("gpt-4.1-mini", (0.40, 1.60)),
        ("openai/gpt-4.1-mini", (0.40, 1.60)),
        ("gpt-4.1-2025-04-14", (2.00, 8.00)),
        ("claude-sonnet-4-5-20250929", (3.00, 15.00)),
        ("Claude-Haiku-4-5", (1.00, 5.00)),
        ("o3-mini", None),  # not o3's price
        ("gpt-4o-2024-05-13", None),  # gpt-4o's first snapshot cost more
        ("gpt-4.1-mini-fast", None),
        ("", None),
    ],
)
def test_a_known_models_price_is_found_by_its_name_or_a_dated_snapshot(
    name: str, prices: tuple[float, float] | None
) -> None:
    found = known_price(name)
    shown = (found.input_per_mtok, found.output_per_mtok) if found else None
    assert shown == prices


def test_model_price_wins_and_a_call_costs_its_tokens_at_it() -> None:
    own = Price(input_per_mtok=1.0, output_per_mtok=4.0)
    model = ModelConfig(provider="openai", name="gpt-4o", price=own)
    assert price_of(model) == own
    assert cost_usd(own, Usage(input_tokens=2_000_000, output_tokens=500_000)) == 4.0
    assert cost_usd(None, Usage(input_tokens=1)) is None
