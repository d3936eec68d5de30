"""`negotiation.bench`: one pair's row from many negotiations' metrics, by hand-computed figures,
and the paper's reference figures."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from negotiation.bench import (
    PAIR_FIELDS,
    REFERENCE,
    Result,
    pair_row,
    percentile,
    reference_json,
)
from negotiation.rules import Game, Move, metrics, play

CONTRACT_FIELDS = {
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
}


def result(
    budget: float,
    cost: float,
    price: float | None = None,
    *,
    turns: int = 4,
    invalid: int = 0,
    tokens: int = 10,
    duration: int = 100,
) -> Result:
    """A negotiation's stored metrics, by the contract's formulas."""
    zone = abs(budget - cost)
    deal = price is not None
    return Result(
        {
            "deal": deal,
            "price": price,
            "mutual_interest": cost < budget,
            "buyer_profit": (budget - price) / zone if price is not None and zone else None,
            "seller_profit": (price - cost) / zone if price is not None and zone else None,
            "turns": turns,
            "invalid_moves": invalid,
            "tokens": tokens,
            "duration_ms": duration,
        },
        buyer_budget=budget,
        seller_cost=cost,
    )


# Four negotiations, computed by hand below.
SAMPLE = [
    # mutual interest (budget 100, cost 60: zone 40), a deal at 80: profits 0.5 / 0.5
    result(100, 60, 80, turns=4, invalid=0, tokens=100, duration=1000),
    # the same zone, a deal at 70: buyer (100 - 70) / 40 = 0.75, seller (70 - 60) / 40 = 0.25
    result(100, 60, 70, turns=6, invalid=1, tokens=200, duration=2000),
    # the same zone, no deal
    result(100, 60, None, turns=10, invalid=2, tokens=300, duration=3000),
    # conflicting interest (budget 50 < cost 80: |zone| 30), a deal at 65: both -0.5, outside
    result(50, 80, 65, turns=2, invalid=0, tokens=400, duration=4000),
]


def test_the_row_has_exactly_the_contracts_fields_in_order() -> None:
    row = pair_row("narrated", "narrated", SAMPLE)
    assert set(row) == CONTRACT_FIELDS
    assert tuple(row) == PAIR_FIELDS


def test_hand_computed_row() -> None:
    row = pair_row("llm", "narrated", SAMPLE)
    assert row["buyer"] == "llm" and row["seller"] == "narrated"
    assert row["scenarios"] == 4
    assert row["deal_rate"] == pytest.approx(3 / 4)
    assert row["deal_rate_mutual"] == pytest.approx(2 / 3)
    assert row["deal_rate_conflicting"] == pytest.approx(1.0)
    # Profits over the three deals only: buyer 0.5, 0.75, -0.5; seller 0.5, 0.25, -0.5.
    assert row["buyer_profit_mean"] == pytest.approx(0.75 / 3)
    assert row["seller_profit_mean"] == pytest.approx(0.25 / 3)
    assert row["buyer_profit_median"] == pytest.approx(0.5)
    assert row["seller_profit_median"] == pytest.approx(0.25)
    # 3 invalid moves of 22.
    assert row["invalid_move_rate"] == pytest.approx(3 / 22)
    # The conflicting deal: no price lies in [80, 50].
    assert row["deals_outside_zone"] == 1
    assert row["turns_mean"] == pytest.approx(22 / 4)
    # Durations 1000..4000: p50 between 2000 and 3000; p95 at rank 3 x 0.95 = 2.85.
    assert row["duration_ms_p50"] == pytest.approx(2500)
    assert row["duration_ms_p95"] == pytest.approx(3000 + 0.85 * 1000)
    assert row["tokens_mean"] == pytest.approx(250)


def test_nothing_to_average_is_none() -> None:
    row = pair_row("narrated", "narrated", [])
    assert row["scenarios"] == 0
    assert row["deals_outside_zone"] == 0
    for field in CONTRACT_FIELDS - {"buyer", "seller", "scenarios", "deals_outside_zone"}:
        assert row[field] is None, field


def test_no_conflicting_scenario_and_no_deal() -> None:
    row = pair_row("narrated", "narrated", [result(100, 60, None), result(200, 10, None)])
    assert row["deal_rate"] == 0.0
    assert row["deal_rate_mutual"] == 0.0
    assert row["deal_rate_conflicting"] is None
    for side in ("buyer", "seller"):
        assert row[f"{side}_profit_mean"] is None
        assert row[f"{side}_profit_median"] is None
    assert row["deals_outside_zone"] == 0


def test_no_move_at_all_has_no_invalid_move_rate() -> None:
    row = pair_row("llm", "llm", [result(100, 60, None, turns=0, invalid=0)])
    assert row["invalid_move_rate"] is None
    assert row["turns_mean"] == 0


def test_zone_edges_and_a_deal_just_outside() -> None:
    inside = [result(100, 60, 60.0), result(100, 60, 100.0)]
    assert pair_row("b", "s", inside)["deals_outside_zone"] == 0
    outside = [result(100, 60, 100.01), result(100, 60, 59.99)]
    row = pair_row("b", "s", outside)
    assert row["deals_outside_zone"] == 2
    assert row["buyer_profit_mean"] == pytest.approx(((-0.01 / 40) + (40.01 / 40)) / 2)


def test_a_single_point_zone_has_no_profits_but_its_deal_is_inside() -> None:
    row = pair_row("b", "s", [result(50, 50, 50.0)])
    assert row["deal_rate"] == 1.0
    assert row["deal_rate_conflicting"] == 1.0  # cost < budget is false: not mutual
    assert row["buyer_profit_mean"] is None and row["seller_profit_median"] is None
    assert row["deals_outside_zone"] == 0


def test_failed_negotiations_count_as_no_deal() -> None:
    failed = Result(
        {
            "deal": False,
            "price": None,
            "mutual_interest": True,
            "buyer_profit": None,
            "seller_profit": None,
            "turns": 1,
            "invalid_moves": 0,
            "tokens": 0,
            "duration_ms": 5,
        },
        100,
        60,
    )
    row = pair_row("b", "s", [failed, result(100, 60, 80)])
    assert row["scenarios"] == 2
    assert row["deal_rate"] == 0.5


def test_the_runners_own_metrics_fit() -> None:
    """The metrics `rules.metrics` stores (what the runner keeps) feed the row as they are."""
    game = Game(max_turns=6, opening="seller")
    game = play(game, Move(1, "seller", "offer", 80.0, "80?"))
    game = play(game, Move(2, "buyer", "accept", 80.0, "Deal."))
    stored: dict[str, Any] = dict(
        metrics(budget=100.0, cost=60.0, game=game, tokens=12, duration_ms=300)
    )
    row = pair_row("narrated", "narrated", [Result(stored, 100.0, 60.0)])
    assert row["deal_rate"] == 1.0
    assert row["buyer_profit_mean"] == pytest.approx(0.5)
    assert row["turns_mean"] == 2 and row["tokens_mean"] == 12
    assert row["duration_ms_p50"] == row["duration_ms_p95"] == 300


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7], 0.95) == 7
    assert percentile([3, 1, 2], 0.5) == 2
    assert percentile([1, 2], 0.5) == pytest.approx(1.5)
    assert percentile([1, 2], 0.95) == pytest.approx(1.95)
    assert percentile([10, 20, 30, 40, 50], 0.0) == 10
    assert percentile([10, 20, 30, 40, 50], 1.0) == 50
    with pytest.raises(ValueError):
        percentile([1], 1.5)


def test_reference_figures_are_the_papers() -> None:
    rates = {ref.buyer_policy: ref.deal_rate for ref in REFERENCE}
    assert rates == {"llm": 0.2667, "narrated": 0.8888}
    data = reference_json()
    assert "Xia et al. 2024" in data["source"] and "2402.15813" in data["source"]
    assert data["deal_rate"]["llm_buyer"]["value"] == 0.2667
    assert data["deal_rate"]["og_narrator"]["value"] == 0.8888
    assert "not measured" in data["note"]


# Properties ------------------------------------------------------------------------------------

cents = st.integers(min_value=1, max_value=10_000_000)


@st.composite
def any_result(draw: st.DrawFn) -> Result:
    """Any negotiation: mutual or conflicting, a deal at any price or none."""
    budget, cost = draw(cents) / 100, draw(cents) / 100
    price = draw(st.none() | cents.map(lambda c: c / 100))
    turns = draw(st.integers(0, 40))
    return result(
        budget,
        cost,
        price,
        turns=turns,
        invalid=draw(st.integers(0, turns)),
        tokens=draw(st.integers(0, 10**6)),
        duration=draw(st.integers(0, 10**7)),
    )


@st.composite
def result_inside_zone(draw: st.DrawFn) -> Result:
    """A mutual-interest negotiation whose deal, if any, is in [cost, budget]."""
    cost = draw(cents)
    budget = draw(st.integers(cost + 1, cost + 10_000_000))
    price = draw(st.none() | st.integers(cost, budget))
    return result(budget / 100, cost / 100, None if price is None else price / 100)


RATES = ("deal_rate", "deal_rate_mutual", "deal_rate_conflicting", "invalid_move_rate")
PROFITS = ("buyer_profit_mean", "seller_profit_mean", "buyer_profit_median", "seller_profit_median")


@settings(max_examples=200, deadline=None)
@given(st.lists(any_result(), max_size=30))
def test_rates_are_fractions(results: list[Result]) -> None:
    row = pair_row("b", "s", results)
    assert row["scenarios"] == len(results)
    for field in RATES:
        assert row[field] is None or 0.0 <= row[field] <= 1.0, (field, row[field])
    deals = sum(1 for r in results if r.metrics["deal"])
    assert 0 <= row["deals_outside_zone"] <= deals
    if results:
        assert row["duration_ms_p50"] <= row["duration_ms_p95"]


@settings(max_examples=200, deadline=None)
@given(st.lists(result_inside_zone(), max_size=30))
def test_profits_of_deals_inside_the_zone_are_fractions(results: list[Result]) -> None:
    row = pair_row("b", "s", results)
    assert row["deals_outside_zone"] == 0
    for field in PROFITS:
        value = row[field]
        assert value is None or -1e-9 <= value <= 1 + 1e-9, (field, value)
        assert value is None or math.isfinite(value)
    if any(r.metrics["deal"] for r in results):
        # The two profits of one deal add up to 1: so do their means.
        assert row["buyer_profit_mean"] + row["seller_profit_mean"] == pytest.approx(1.0)
