"""What pods spend and may spend: one ledger for the daemon, kept by the supervisor.

Each pod's own spending (tokens, input plus output, and dollars when a price is known) is
read from the store at start-up, so stopped pods count too, and grows as its journal
records usage. Each pod's subtree sum (itself and every descendant) is kept up the parent
chain as spending comes in, so a check at each step walks the ancestors only. A pod's
budget comes from its manifest; `set_budget` replaces it there, in the store, so a restart
keeps it. A deleted pod's subtree sum is carried by its parent (in the store, with the
delete), so its former ancestors' sums keep it: deleting the pods that spent a budget
does not give it back. Its children, top-level from then on, take their sums with them.
"""

import logging
from dataclasses import dataclass
from typing import Any

from capd import metrics
from capd.engines.base import BudgetSpent
from capd.prices import add_usd, price_of
from capd.registry import PodRegistry
from capd.store import Carried, PodRecord, Store
from protocol.errors import ProtocolError
from protocol.events import BudgetLimits, Spent, Usage
from protocol.manifest import Budget, BuiltinEngine, Manifest, stored_field

log = logging.getLogger(__name__)


@dataclass
class _Sum:
    tokens: int = 0
    usd: float | None = None

    def add(self, tokens: int, usd: float | None) -> None:
        self.tokens += tokens
        self.usd = add_usd(self.usd, usd)

    def spent(self) -> Spent:
        return Spent(tokens=self.tokens, usd=self.usd)

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "usd": self.usd}


class Ledger:
    def __init__(self, registry: PodRegistry, store: Store) -> None:
        self._registry = registry
        self.version = 0
        """Grows with every change to what `spent` and `budget` say, of any pod (a
        status made since a change of none of them is still right)."""
        self._own: dict[str, _Sum] = {}
        self._subtree: dict[str, _Sum] = {}
        self._budgets: dict[str, Budget] = {}
        self._carried: dict[str, _Sum] = {
            c.pod: _Sum(c.tokens, c.usd) for c in store.carried() if registry.get(c.pod)
        }
        """What each pod's deleted descendants spent: part of its subtree sum."""
        for record in registry.all():
            self._load(record, store)
        self._sum_subtrees()

    # -- spending -----------------------------------------------------------------------

    def spend(self, name: str, before: Usage, after: Usage) -> None:
        """Count what the pod's usage totals grew by, for it and each ancestor."""
        tokens = (
            after.input_tokens + after.output_tokens - before.input_tokens - before.output_tokens
        )
        usd = None
        if after.cost_usd is not None:
            usd = after.cost_usd - (before.cost_usd or 0.0)
        if tokens == 0 and not usd:
            return
        self.version += 1
        self._own.setdefault(name, _Sum()).add(tokens, usd)
        for pod in self._chain(name):
            self._subtree.setdefault(pod, _Sum()).add(tokens, usd)

    def spent(self, name: str) -> dict[str, Any]:
        """What the pod and all its descendants have spent (a `Spent`, as a plain dict:
        `status` is polled, and building models would cost more than the rest of it)."""
        return self._subtree.get(name, _Sum()).as_dict()

    def check(self, name: str) -> None:
        """Raise BudgetSpent for the nearest of the pod and its ancestors whose budget its
        subtree has reached."""
        for pod in self._chain(name):
            budget = self._budgets.get(pod)
            if budget is None:
                continue
            used = self._subtree.get(pod, _Sum())
            tokens_out = budget.tokens is not None and used.tokens >= budget.tokens
            usd_out = budget.usd is not None and (used.usd or 0.0) >= budget.usd
            if tokens_out or usd_out:
                limits = BudgetLimits(tokens=budget.tokens, usd=budget.usd)
                raise BudgetSpent(pod, used.spent(), limits)

    # -- budgets ------------------------------------------------------------------------

    def budget(self, name: str) -> dict[str, Any]:
        """The pod's own budget (a `BudgetLimits`, as a plain dict like `spent`)."""
        budget = self._budgets.get(name)
        if budget is None:
            return {"tokens": None, "usd": None}
        return {"tokens": budget.tokens, "usd": budget.usd}

    def set_budget(self, name: str, budget: Budget) -> None:
        """Make `budget` the pod's, in its stored manifest too."""
        if budget.usd is not None:
            self._check_priced(name, budget)
        record = self._registry.get(name)
        if record is not None:
            manifest = Manifest.model_validate_json(record.manifest)
            stored = None if budget == Budget() else budget
            manifest = manifest.model_copy(update={"budget": stored})
            self._registry.set_manifest(name, manifest.model_dump_json())
        self.budget_changed(name, None if budget == Budget() else budget)

    def budget_changed(self, name: str, budget: Budget | None) -> None:
        """The pod's manifest has `budget` now (stored by the caller)."""
        self.version += 1
        if budget is None:
            self._budgets.pop(name, None)
        else:
            self._budgets[name] = budget

    def check_spawn(self, manifest: Manifest, parent: str | None) -> None:
        """Refuse a pod a dollar budget could not follow: one with `budget.usd`, or under
        an ancestor with one, whose own model has no price (see `unpriced`)."""
        reason = unpriced(manifest)
        if reason is None:
            return
        name = manifest.name
        if manifest.budget is not None and manifest.budget.usd is not None:
            raise ProtocolError("invalid_request", f"pod {name} has budget.usd but its {reason}")
        for pod in self._chain(parent) if parent is not None else []:
            budget = self._budgets.get(pod)
            if budget is not None and budget.usd is not None:
                raise ProtocolError(
                    "invalid_request",
                    f"pod {pod}'s budget.usd would cover pod {name}, but its {reason}",
                )

    def check_reconfigure(self, manifest: Manifest, parent: str | None) -> None:
        """`check_spawn` for a pod taking a new manifest, whose dollar budget covers its
        descendants too."""
        self.check_spawn(manifest, parent)
        budget = manifest.budget
        if budget is not None and budget.usd is not None:
            self._check_priced(manifest.name, budget, descendants_only=True)

    def _check_priced(self, name: str, budget: Budget, descendants_only: bool = False) -> None:
        """A dollar budget over a pod whose spending has no price is refused."""
        pods = [record.name for record, _ in self._registry.descendants(name)]
        for pod in pods if descendants_only else [name, *pods]:
            record = self._registry.get(pod)
            if record is None:
                continue
            try:
                reason = unpriced(Manifest.model_validate_json(record.manifest))
            except ValueError:
                continue
            if reason is not None:
                raise ProtocolError(
                    "invalid_request",
                    f"cannot set budget.usd={budget.usd:g} on pod {name}: pod {pod}'s {reason}",
                )

    # -- the tree -----------------------------------------------------------------------

    def adopting(self, records: list[PodRecord], store: Store) -> None:
        """Pods another fleet node held, known here from now on: what they spent so far,
        from the store (as at start-up). Called a part of an adoption at a time (a read
        per pod); `adopted` then completes it."""
        for record in records:
            self._load(record, store)

    def adopted(self, records: list[PodRecord], store: Store) -> None:
        """The adoption of `records` is loaded (`adopting`): what their deleted
        descendants spent too, then every subtree summed, once."""
        names = {record.name for record in records}
        for carried in store.carried():
            if carried.pod in names:
                self._carried[carried.pod] = _Sum(carried.tokens, carried.usd)
        self._sum_subtrees()

    def _load(self, record: PodRecord, store: Store) -> None:
        """A stored pod's spending so far and its budget."""
        inp, out, usd = store.usage_totals(record.name)
        metrics.usage_stored(record.name, (inp, out, usd))
        self.version += 1
        self._own[record.name] = _Sum(inp + out, usd)
        if (budget := _stored_budget(record.manifest)) is not None:
            self._budgets[record.name] = budget

    def added(self, name: str, budget: Budget | None) -> None:
        """A new pod: nothing spent yet."""
        self.version += 1
        self._own[name] = _Sum()
        if budget is not None:
            self._budgets[name] = budget
        for pod in self._chain(name):
            self._subtree.setdefault(pod, _Sum())

    def carried_past(self, name: str) -> Carried | None:
        """What the pod's parent carries once the pod is deleted: what it carried, plus
        the pod's subtree sum. None for a top-level pod, or one that spent nothing."""
        parent = self._registry.parent_of(name)
        spent = self._subtree.get(name)
        if parent is None or spent is None or (spent.tokens == 0 and spent.usd is None):
            return None
        carried = self._carried.get(parent, _Sum())
        total = _Sum(carried.tokens, carried.usd)
        total.add(spent.tokens, spent.usd)
        return Carried(parent, total.tokens, total.usd)

    def deleted(self, name: str, carried: Carried | None) -> None:
        """The pod is gone (its children are top-level now), what it and its descendants
        spent `carried` by its parent (`carried_past`)."""
        self._own.pop(name, None)
        self._budgets.pop(name, None)
        self._carried.pop(name, None)
        if carried is not None:
            self._carried[carried.pod] = _Sum(carried.tokens, carried.usd)
        self._sum_subtrees()

    def _sum_subtrees(self) -> None:
        self.version += 1
        self._subtree = {}
        for name, own in self._own.items():
            carried = self._carried.get(name, _Sum())
            for pod in self._chain(name):
                subtree = self._subtree.setdefault(pod, _Sum())
                subtree.add(own.tokens, own.usd)
                subtree.add(carried.tokens, carried.usd)

    def _chain(self, name: str) -> list[str]:
        """The pod, then its parent, grandparent, ... up to a top-level pod."""
        chain, seen = [name], {name}
        while (parent := self._registry.parent_of(chain[-1])) is not None and parent not in seen:
            chain.append(parent)
            seen.add(parent)
        return chain


def unpriced(manifest: Manifest) -> str | None:
    """Why the pod's spending cannot be priced, or None when it can: a builtin model with
    neither `model.price` nor a known list price. External engines report their own cost
    (Claude Code always, ACP agents when they do), so they are not refused."""
    if not isinstance(manifest.engine, BuiltinEngine) or manifest.model is None:
        return None
    if price_of(manifest.model) is not None:
        return None
    label = manifest.model.name or manifest.model.provider
    return (
        f"model {label} has no known price: set its model.price "
        "{input_per_mtok, output_per_mtok}, or budget tokens only"
    )


def _stored_budget(manifest: str) -> Budget | None:
    """The budget of a stored manifest, without parsing all of it (a tenth of a restore of
    many pods); None when it has none or it does not parse (the supervisor reports such a
    pod as not restorable)."""
    raw = stored_field(manifest, "budget")
    try:
        return None if raw is None else Budget.model_validate(raw)
    except ValueError:
        return None
