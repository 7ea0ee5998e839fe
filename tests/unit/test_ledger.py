"""The ledger over a real store: a deleted pod's spending stays in its former ancestors'
sums, across a restart too, while its children, top-level from then on, spend for
themselves only."""

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from capd.budgets import Ledger
from capd.engines.base import BudgetSpent
from capd.registry import PodRegistry
from capd.store import Store
from protocol.events import Usage
from protocol.manifest import Budget, Manifest, ModelConfig
from tests.unit.conftest import STORES


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _pod(ledger: Ledger, registry: PodRegistry, name: str, parent: str | None = None) -> None:
    """Spawn `name`, as the supervisor does: under `parent`, `top` with a budget."""
    budget = Budget(tokens=100) if name == "top" else None
    manifest = Manifest(name=name, model=ModelConfig(provider="scripted"), budget=budget)
    socket = str(registry.socket(parent)) if parent is not None else None
    registry.add(name, manifest.model_dump_json(), socket)
    ledger.added(name, budget)


def _spend(store: Store, ledger: Ledger, pod: str, seq: int, tokens: int, usd: float) -> None:
    """Record a step that spent `tokens` (input) and `usd`, as a journal would."""
    usage = Usage(input_tokens=tokens, cost_usd=usd)
    step = {"event": "assistant_message", "turn_id": "t", "text": "", "usage": usage.model_dump()}
    store.append(pod, [(seq, 0.0, "assistant_message", orjson.dumps(step))])
    ledger.spend(pod, Usage(), usage)


def test_a_deleted_pods_spending_stays_counted_for_its_former_ancestors(
    tmp_path: Path, store: Store, reopen: Callable[[], Store]
) -> None:
    registry = PodRegistry(store, tmp_path)
    ledger = Ledger(registry, store)
    _pod(ledger, registry, "top")
    _pod(ledger, registry, "mid", "top")
    _pod(ledger, registry, "low", "mid")
    _pod(ledger, registry, "leaf", "low")
    _spend(store, ledger, "mid", 1, 10, 1.0)
    _spend(store, ledger, "low", 1, 40, 2.0)
    _spend(store, ledger, "leaf", 1, 50, 4.0)
    with pytest.raises(BudgetSpent):
        ledger.check("top")

    # Deleting `low` (then `mid`) takes none of what it and `leaf` spent out of `top`:
    # `top` stays paused on its budget.
    for name in ("low", "mid"):
        carried = ledger.carried_past(name)
        registry.delete(name, carried)
        ledger.deleted(name, carried)
    assert ledger.spent("top") == {"tokens": 100, "usd": 7.0}
    with pytest.raises(BudgetSpent):
        ledger.check("top")
    # `leaf` is top-level now: what it spends from here on is its own.
    assert ledger.spent("leaf") == {"tokens": 50, "usd": 4.0}
    _spend(store, ledger, "leaf", 2, 5, 0.5)
    assert ledger.spent("leaf") == {"tokens": 55, "usd": 4.5}
    assert ledger.spent("top") == {"tokens": 100, "usd": 7.0}

    store.close()
    reopened = reopen()
    try:
        restarted = Ledger(PodRegistry(reopened, tmp_path), reopened)
        assert restarted.spent("top") == {"tokens": 100, "usd": 7.0}
        assert restarted.spent("leaf") == {"tokens": 55, "usd": 4.5}
        with pytest.raises(BudgetSpent):
            restarted.check("top")
    finally:
        reopened.close()


def test_an_adopted_family_counts_what_it_spent_elsewhere(tmp_path: Path, store: Store) -> None:
    """Pods another node made and ran, learnt here in parts (as a fleet adoption does):
    their own spending, their deleted descendants' and their subtree sums."""
    here = PodRegistry(store, tmp_path)
    ledger = Ledger(here, store)
    there = PodRegistry(store, tmp_path)
    elsewhere = Ledger(there, store)
    for name, parent in (("top", None), ("mid", "top"), ("gone", "mid"), ("leaf", "mid")):
        _pod(elsewhere, there, name, parent)
    _spend(store, elsewhere, "mid", 1, 10, 1.0)
    _spend(store, elsewhere, "gone", 1, 30, 2.0)
    _spend(store, elsewhere, "leaf", 1, 60, 4.0)
    carried = elsewhere.carried_past("gone")
    there.delete("gone", carried)
    elsewhere.deleted("gone", carried)

    records = [record for record in store.pods() if here.get(record.name) is None]
    for record in records:
        here.learn(record)
    ledger.adopting(records[:2], store)
    ledger.adopting(records[2:], store)
    ledger.adopted(records, store)
    assert ledger.spent("top") == {"tokens": 100, "usd": 7.0}
    assert ledger.spent("mid") == {"tokens": 100, "usd": 7.0}
    assert ledger.spent("leaf") == {"tokens": 60, "usd": 4.0}
    with pytest.raises(BudgetSpent):
        ledger.check("leaf")
