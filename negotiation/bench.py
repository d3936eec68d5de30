"""The benchmark's arithmetic: many negotiations' metrics folded into one row per policy pair, and
the figures the research published to read them against.

Pure: no Django, no database, no I/O. `manage.py negotiation_bench` runs the negotiations and
feeds each one's stored metrics here (`Result`); `pair_row` returns exactly the contract's fields
(``../shared/CONTRACT.md``, "Negotiations", CLI):

- ``scenarios``: how many negotiations the pair played (failed ones included: a failure is part
  of the measurement, it counts as no deal);
- ``deal_rate`` (and its split by ``mutual_interest``, cost < budget, and conflicting interest):
  deals / negotiations, a fraction in [0, 1]; None when there is no negotiation of that kind;
- ``buyer_profit_*`` / ``seller_profit_*``: the normalised profits of the deals only (the mean and
  the median); None without a deal (or when every deal's profit is undefined, budget == cost);
- ``invalid_move_rate``: invalid moves / all moves, over every negotiation; None without a move;
- ``deals_outside_zone``: deals at a price outside [cost, budget], the zone of possible agreement.
  A conflicting-interest scenario (cost > budget) has no such zone: every deal there counts;
- ``turns_mean``, ``tokens_mean``: over every negotiation;
- ``duration_ms_p50`` / ``_p95``: percentiles of the durations, interpolated linearly between the
  closest ranks (numpy's default method), over every negotiation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PAIR_FIELDS",
    "REFERENCE",
    "REFERENCE_CITATION",
    "REFERENCE_SOURCE",
    "Reference",
    "Result",
    "pair_row",
    "percentile",
    "reference_json",
]

# The contract's row of a policy pair, in its order.
PAIR_FIELDS = (
    "buyer",
    "seller",
    "scenarios",
    "deal_rate",
    "deal_rate_mutual",
    "deal_rate_conflicting",
    "buyer_profit_mean",
    "seller_profit_mean",
    "buyer_profit_median",
    "seller_profit_median",
    "invalid_move_rate",
    "deals_outside_zone",
    "turns_mean",
    "duration_ms_p50",
    "duration_ms_p95",
    "tokens_mean",
)

# Prices are whole cents; this absorbs the float noise of values that went through JSON.
_PRICE_TOLERANCE = 1e-6


@dataclass(frozen=True, slots=True)
class Result:
    """One finished negotiation: its stored metrics (the contract's shape) and its scenario's two
    private numbers, which the metrics do not repeat."""

    metrics: Mapping[str, Any]
    buyer_budget: float
    seller_cost: float

    @property
    def mutual_interest(self) -> bool:
        return self.seller_cost < self.buyer_budget

    @property
    def deal(self) -> bool:
        return bool(self.metrics.get("deal")) and self.metrics.get("price") is not None

    @property
    def inside_zone(self) -> bool:
        """Whether its deal's price lies in [cost, budget] (False without a deal)."""
        if not self.deal:
            return False
        price = float(self.metrics["price"])
        return self.seller_cost - _PRICE_TOLERANCE <= price <= self.buyer_budget + _PRICE_TOLERANCE


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` (0 to 1) percentile of ``values``, interpolated linearly between the two
    closest ranks (numpy's default); None for no values."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be from 0 to 1, not {fraction!r}")
    if not values:
        return None
    ordered = sorted(float(v) for v in values)
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _number(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def pair_row(buyer: str, seller: str, results: Iterable[Result]) -> dict[str, Any]:
    """The contract's row for the ``buyer``/``seller`` policy pair over ``results``."""
    results = list(results)
    deals = [r for r in results if r.deal]
    mutual = [r for r in results if r.mutual_interest]
    conflicting = [r for r in results if not r.mutual_interest]
    profits = {
        side: [
            float(r.metrics[f"{side}_profit"])
            for r in deals
            if r.metrics.get(f"{side}_profit") is not None
        ]
        for side in ("buyer", "seller")
    }
    moves = sum(int(_number(r.metrics, "turns")) for r in results)
    invalid = sum(int(_number(r.metrics, "invalid_moves")) for r in results)
    durations = [_number(r.metrics, "duration_ms") for r in results]
    row = {
        "buyer": buyer,
        "seller": seller,
        "scenarios": len(results),
        "deal_rate": _rate(len(deals), len(results)),
        "deal_rate_mutual": _rate(sum(r.deal for r in mutual), len(mutual)),
        "deal_rate_conflicting": _rate(sum(r.deal for r in conflicting), len(conflicting)),
        "buyer_profit_mean": _mean(profits["buyer"]),
        "seller_profit_mean": _mean(profits["seller"]),
        "buyer_profit_median": _median(profits["buyer"]),
        "seller_profit_median": _median(profits["seller"]),
        "invalid_move_rate": _rate(invalid, moves),
        "deals_outside_zone": sum(not r.inside_zone for r in deals),
        "turns_mean": _mean([_number(r.metrics, "turns") for r in results]),
        "duration_ms_p50": percentile(durations, 0.50),
        "duration_ms_p95": percentile(durations, 0.95),
        "tokens_mean": _mean([_number(r.metrics, "tokens") for r in results]),
    }
    assert tuple(row) == PAIR_FIELDS
    return row


# The published figures --------------------------------------------------------------------------

REFERENCE_CITATION = "Xia et al. 2024 (arXiv 2402.15813)"
REFERENCE_SOURCE = (
    "Xia et al. 2024, Measuring Bargaining Abilities of Large Language Models: A Benchmark and "
    "A Buyer-Enhancement Method (arXiv 2402.15813)"
)
REFERENCE_NOTE = (
    "Published by the paper for its own models and data; not measured by this benchmark. Its "
    "OG-Narrator (a deterministic offer generator, the model only narrating) is what the "
    "'narrated' policy follows; its LLM buyer decides alone, as the 'llm' policy does."
)


@dataclass(frozen=True, slots=True)
class Reference:
    """A deal rate the paper published, and the buyer policy here that plays that way."""

    key: str
    label: str
    buyer_policy: str
    deal_rate: float


REFERENCE = (
    Reference("llm_buyer", "LLM buyer", "llm", 0.2667),  # 26.67 %
    Reference("og_narrator", "OG-Narrator buyer", "narrated", 0.8888),  # 88.88 %
)


def reference_json() -> dict[str, Any]:
    """The published figures, labelled as the paper's, as the JSON report carries them."""
    return {
        "source": REFERENCE_SOURCE,
        "note": REFERENCE_NOTE,
        "deal_rate": {
            ref.key: {"label": ref.label, "buyer_policy": ref.buyer_policy, "value": ref.deal_rate}
            for ref in REFERENCE
        },
    }
