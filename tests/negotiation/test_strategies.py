"""The concession strategy (`negotiation.strategies`): the textbook formula and its time, rounding
to cents on the safe side, and whole games played through the rules: two such sides always make a
deal in mutual interest, never outside [cost, budget], never in conflicting interest; a side
never offers beyond its reservation, concedes monotonically and accepts exactly by AC_next, even
against an opponent that plays at random."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from negotiation.rules import (
    SIDES,
    Game,
    GameOver,
    Move,
    NotYourTurn,
    RuleViolation,
    Side,
    check,
    other,
    play,
)
from negotiation.strategies import Concession, Decision, own_moves, progress

# --- time -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_turns", "opener", "second"),
    [(1, 1, 0), (2, 1, 1), (6, 3, 3), (7, 4, 3), (10, 5, 5), (40, 20, 20)],
)
def test_own_moves_gives_the_opening_side_the_odd_turns(
    max_turns: int, opener: int, second: int
) -> None:
    for opening in SIDES:
        assert own_moves(opening, opening, max_turns) == opener
        assert own_moves(other(opening), opening, max_turns) == second


def test_progress_runs_from_0_on_a_sides_first_move_to_1_on_its_last() -> None:
    assert [progress("seller", "seller", 6, t) for t in (1, 3, 5)] == [0.0, 0.5, 1.0]
    assert [progress("buyer", "seller", 6, t) for t in (2, 4, 6)] == [0.0, 0.5, 1.0]
    assert [progress("buyer", "buyer", 7, t) for t in (1, 3, 5, 7)] == [0, 1 / 3, 2 / 3, 1]
    assert [progress("seller", "buyer", 7, t) for t in (2, 4, 6)] == [0.0, 0.5, 1.0]
    # A single own move is the last one: straight to the reservation.
    assert progress("seller", "seller", 2, 1) == 1.0
    assert progress("buyer", "seller", 2, 2) == 1.0
    assert progress("seller", "seller", 1, 1) == 1.0


@pytest.mark.parametrize(
    ("side", "opening", "max_turns", "turn"),
    [
        ("buyer", "seller", 6, 1),  # the seller's turn
        ("seller", "seller", 6, 2),
        ("seller", "seller", 6, 7),  # beyond max_turns
        ("seller", "seller", 6, 0),
        ("alice", "seller", 6, 1),
        ("seller", "seller", 0, 1),
    ],
)
def test_progress_refuses_a_turn_that_is_not_the_sides(
    side: Any, opening: Any, max_turns: int, turn: int
) -> None:
    with pytest.raises(ValueError):
        progress(side, opening, max_turns, turn)


# --- offers -----------------------------------------------------------------------------------


def test_offer_at_follows_the_textbook_formula() -> None:
    linear = Concession("seller", initial=100, reservation=50)
    assert [linear.offer_at(x) for x in (0, 0.25, 0.5, 1)] == [100.0, 87.5, 75.0, 50.0]
    buyer = Concession("buyer", initial=50, reservation=80)
    assert [buyer.offer_at(x) for x in (0, 0.5, 1)] == [50.0, 65.0, 80.0]
    # Boulware (beta < 1) holds out: F(0.5) = 0.5 ** 2 = 0.25.
    assert Concession("seller", 100, 50, beta=0.5).offer_at(0.5) == 87.5
    # Conceder (beta > 1) gives in early: F(0.5) = 0.5 ** 0.5 = 0.7071...
    assert Concession("seller", 100, 50, beta=2).offer_at(0.5) == 64.65  # 64.644..., rounded up
    assert Concession("buyer", 50, 100, beta=2).offer_at(0.5) == 85.35  # 85.355..., rounded down
    # k is where the concession starts: F(0) = k.
    assert Concession("seller", 100, 50, k=0.2).offer_at(0) == 90.0
    assert Concession("seller", 100, 50, k=0.2).offer_at(1) == 50.0


def test_the_constructors_open_at_the_list_price_and_half_of_it() -> None:
    assert Concession.for_seller(200, 120) == Concession("seller", 200, 120)
    assert Concession.for_buyer(200, 150, beta=0.5) == Concession("buyer", 100, 150, beta=0.5)
    # Custom scenarios: a list price below the cost, a budget below half the list price.
    assert Concession.for_seller(50, 80) == Concession("seller", 80, 80)
    assert Concession.for_buyer(200, 60) == Concession("buyer", 60, 60)
    assert Concession.for_buyer(100, 150).offer_at(0) == 50.0  # a budget above the list price


def test_rounding_is_to_cents_on_the_safe_side_without_float_noise() -> None:
    # 1.1 * 100 is 110.00000000000001 in floats: still $1.10, not (rounded up) $1.11; and
    # 0.57 * 100 is 56.99999999999999: still $0.57, not (rounded down) $0.56.
    assert Concession("seller", 1.1, 1.0).offer_at(0) == 1.1
    assert Concession("seller", 0.07, 0.01).offer_at(0) == 0.07
    assert Concession("buyer", 0.57, 1.0).offer_at(0) == 0.57
    assert Concession("buyer", 4.35, 5.0).offer_at(0) == 4.35
    # A reservation inside a cent: the seller never below its cost, the buyer never above budget.
    seller = Concession("seller", 20, 10.004)
    assert seller.offer_at(1) == 10.01
    buyer = Concession("buyer", 5, 10.009)
    assert buyer.offer_at(1) == 10.0
    # Between cents, the seller rounds up, the buyer down.
    assert Concession("seller", 10.05, 10.0).offer_at(0.5) == 10.03  # 10.025
    assert Concession("buyer", 10.0, 10.05).offer_at(0.5) == 10.02


def test_tiny_prices_never_drop_to_zero() -> None:
    buyer = Concession.for_buyer(0.01, 0.01)  # opens at half a cent
    assert buyer.initial == 0.005
    assert [buyer.offer_at(x) for x in (0, 0.5, 1)] == [0.01, 0.01, 0.01]
    assert Concession.for_buyer(0.03, 0.02).offer_at(0) == 0.01
    assert Concession.for_seller(0.01, 0.01).offer_at(0) == 0.01


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": 0},
        {"beta": -1},
        {"beta": math.nan},
        {"beta": math.inf},
        {"beta": "1"},
        {"k": -0.1},
        {"k": 1.5},
        {"side": "alice"},
        {"initial": 40},  # a seller opening below its cost
        {"initial": 0},
        {"initial": math.inf},
        {"reservation": 0.001},
        {"reservation": math.nan},
        {"reservation": True},
    ],
)
def test_a_concession_refuses_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        base: dict[str, Any] = {"side": "seller", "initial": 100, "reservation": 50}
        Concession(**(base | kwargs))


def test_a_buyer_cannot_open_above_its_budget() -> None:
    with pytest.raises(ValueError):
        Concession("buyer", initial=100, reservation=50)


@pytest.mark.parametrize("x", [-0.1, 1.1, math.nan])
def test_offer_at_takes_x_in_0_1(x: float) -> None:
    with pytest.raises(ValueError):
        Concession("seller", 100, 50).offer_at(x)


# --- decisions --------------------------------------------------------------------------------


def test_decide_opens_at_the_initial_offer_and_accepts_by_ac_next() -> None:
    seller = Concession("seller", 100, 50)
    buyer = Concession("buyer", 40, 90)
    game = Game(max_turns=6, opening="seller")
    assert seller.decide(game) == Decision("offer", 100.0)
    game = play(game, Move(1, "seller", "offer", 100.0, ""))
    assert buyer.decide(game) == Decision("offer", 40.0)
    game = play(game, Move(2, "buyer", "offer", 74.99, ""))  # just below the seller's 75 at x=0.5
    assert seller.decide(game) == Decision("offer", 75.0)
    game = play(game, Move(3, "seller", "offer", 75.0, ""))
    assert buyer.decide(game) == Decision("offer", 65.0)  # 75 > 65: no
    game = play(game, Move(4, "buyer", "offer", 75.0, ""))  # at least the seller's 50 at x=1
    assert seller.decide(game) == Decision("accept", 75.0)


def test_the_last_two_moves_close_the_deal_in_mutual_interest() -> None:
    for opening in SIDES:
        seller, buyer = Concession("seller", 100, 60), Concession("buyer", 20, 60.01)
        sides = {"seller": seller, "buyer": buyer}
        game = Game(max_turns=2, opening=opening)
        first = sides[opening].decide(game)
        assert first == Decision("offer", sides[opening].reservation)
        game = play(game, Move(1, opening, "offer", first.price, ""))
        assert sides[other(opening)].decide(game) == Decision("accept", first.price)


def test_a_price_exactly_at_the_reservation_is_not_accepted() -> None:
    # cost == budget: conflicting interest by the contract; AC_next alone would deal at 60.
    seller, buyer = Concession("seller", 100, 60), Concession("buyer", 20, 60)
    game = play(Game(max_turns=2), Move(1, "seller", "offer", 60.0, ""))
    assert buyer.decide(game) == Decision("offer", 60.0)
    game = play(Game(max_turns=2, opening="buyer"), Move(1, "buyer", "offer", 60.0, ""))
    assert seller.decide(game) == Decision("offer", 60.0)


def test_decide_only_on_its_own_turn_of_a_running_game() -> None:
    seller = Concession("seller", 100, 50)
    with pytest.raises(NotYourTurn):
        seller.decide(Game(opening="buyer"))
    game = play(Game(max_turns=1), Move(1, "seller", "walk_away", None, ""))
    with pytest.raises(GameOver):
        seller.decide(game)


# --- whole games ------------------------------------------------------------------------------

CENTS = st.integers(min_value=1, max_value=500_000)  # $0.01 to $5,000.00, the library's range
BETAS = st.floats(min_value=0.1, max_value=10)


def ac_next(strategy: Concession, price: float, x: float) -> bool:
    """AC_next as the module defines it, restated: at least as good as my offer now, strictly
    better than my reservation."""
    mine = strategy.offer_at(x)
    if strategy.side == "seller":
        return price >= mine and price > strategy.reservation
    return price <= mine and price < strategy.reservation


def play_out(
    strategies: dict[Side, Concession], game: Game, opponent: Any = None
) -> tuple[Game, list[tuple[Side, float, Decision]]]:
    """Play ``game`` to its end, each side of ``strategies`` by its strategy, the others (if any)
    by ``opponent(game)`` -> (action, price). Checks each strategy move against the rules and
    returns the game and the strategies' decisions with their times."""
    decisions: list[tuple[Side, float, Decision]] = []
    while not game.over:
        side = game.next_side
        price: float | None
        if side in strategies:
            x = progress(side, game.opening, game.max_turns, game.turn)
            decision = strategies[side].decide(game)
            decisions.append((side, x, decision))
            action, price = decision.action, decision.price
            stored = check(game, side, action, price)  # the strategy never breaks a rule
            assert stored == price
        else:
            action, price = opponent(game)
            try:
                price = check(game, side, action, price)
            except RuleViolation:
                game = play(game, Move(game.turn, side, action, None, "", invalid=True))
                continue
        game = play(game, Move(game.turn, side, action, price, ""))
    return game, decisions


def assert_concedes_within_reservation_and_accepts_by_ac_next(
    strategy: Concession, game: Game, decisions: list[tuple[Side, float, Decision]]
) -> None:
    side = strategy.side
    offers = [d.price for s, _, d in decisions if s == side and d.action == "offer"]
    for price in offers:
        assert price == round(price, 2)
        if side == "seller":
            assert price >= strategy.reservation
        else:
            assert price <= strategy.reservation
    steps = list(itertools.pairwise(offers))
    if side == "seller":
        assert all(later <= earlier for earlier, later in steps), offers
    else:
        assert all(later >= earlier for earlier, later in steps), offers
    # Accept exactly by AC_next: replay the game up to each of the side's decisions.
    mine = [i for i, m in enumerate(game.moves) if m.side == side]
    ours = [(x, d) for s, x, d in decisions if s == side]
    assert len(mine) == len(ours)
    for i, (x, decision) in zip(mine, ours, strict=True):
        theirs = Game(game.max_turns, game.opening, game.moves[:i]).latest_offer(other(side))
        accept = theirs is not None and ac_next(strategy, theirs.price, x)  # type: ignore[arg-type]
        assert (decision.action == "accept") == accept
        if accept:
            assert theirs is not None and decision.price == theirs.price


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    cost=CENTS,
    budget=CENTS,
    list_price=CENTS,
    seller_beta=BETAS,
    buyer_beta=BETAS,
    max_turns=st.integers(min_value=2, max_value=40),
    opening=st.sampled_from(SIDES),
)
# The edges, whatever the random draw: one cent of room, none, a single move each, extreme betas.
@example(
    cost=6000,
    budget=6001,
    list_price=10000,
    seller_beta=0.1,
    buyer_beta=10,
    max_turns=2,
    opening="seller",
)
@example(
    cost=6000,
    budget=6001,
    list_price=10000,
    seller_beta=10,
    buyer_beta=0.1,
    max_turns=3,
    opening="buyer",
)
@example(
    cost=6000,
    budget=6000,
    list_price=10000,
    seller_beta=1,
    buyer_beta=1,
    max_turns=40,
    opening="seller",
)
@example(cost=1, budget=2, list_price=1, seller_beta=1, buyer_beta=1, max_turns=2, opening="buyer")
@example(
    cost=9000,
    budget=10000,
    list_price=5000,
    seller_beta=1,
    buyer_beta=1,
    max_turns=5,
    opening="seller",
)
def test_two_concession_sides_deal_exactly_in_mutual_interest(
    cost: int,
    budget: int,
    list_price: int,
    seller_beta: float,
    buyer_beta: float,
    max_turns: int,
    opening: Side,
) -> None:
    cost_d, budget_d, list_d = cost / 100, budget / 100, list_price / 100
    seller = Concession.for_seller(list_d, cost_d, beta=seller_beta)
    buyer = Concession.for_buyer(list_d, budget_d, beta=buyer_beta)
    game, decisions = play_out(
        {"seller": seller, "buyer": buyer}, Game(max_turns=max_turns, opening=opening)
    )
    outcome = game.outcome
    assert outcome is not None
    if cost_d < budget_d:
        assert outcome.status == "deal", [m.as_dict() for m in game.moves]
        assert outcome.price is not None and cost_d <= outcome.price <= budget_d
    else:
        assert outcome.status == "no_deal"
        assert outcome.ended_by == "max_turns"
    for strategy in (seller, buyer):
        assert_concedes_within_reservation_and_accepts_by_ac_next(strategy, game, decisions)


@st.composite
def random_opponent(draw: st.DrawFn) -> Any:
    """An opponent that offers, accepts, rejects or walks away at random (and sometimes breaks
    the rules: those moves are stored as invalid)."""

    def move(game: Game) -> tuple[str, Any]:
        action = draw(st.sampled_from(["offer", "offer", "offer", "accept", "reject", "walk_away"]))
        price = draw(st.integers(min_value=-10, max_value=600_000)) / 100
        return action, price if action == "offer" else None

    return move


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    side=st.sampled_from(SIDES),
    initial=CENTS,
    reservation=CENTS,
    beta=BETAS,
    k=st.floats(min_value=0, max_value=1),
    max_turns=st.integers(min_value=2, max_value=40),
    opening=st.sampled_from(SIDES),
    opponent=random_opponent(),
)
def test_against_anyone_it_concedes_within_its_reservation_and_accepts_by_ac_next(
    side: Side,
    initial: int,
    reservation: int,
    beta: float,
    k: float,
    max_turns: int,
    opening: Side,
    opponent: Any,
) -> None:
    lo, hi = sorted((initial / 100, reservation / 100))
    strategy = Concession(side, hi if side == "seller" else lo, lo if side == "seller" else hi)
    strategy = Concession(side, strategy.initial, strategy.reservation, beta=beta, k=k)
    game, decisions = play_out({side: strategy}, Game(max_turns, opening), opponent)
    assert_concedes_within_reservation_and_accepts_by_ac_next(strategy, game, decisions)
    outcome = game.outcome
    assert outcome is not None
    if outcome.status == "deal" and game.moves[-1].side == side:
        # Never accepted beyond (or at) its reservation.
        assert outcome.price is not None and strategy.better(outcome.price, strategy.reservation)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    side=st.sampled_from(SIDES),
    a=st.floats(min_value=0.001, max_value=1e6),
    b=st.floats(min_value=0.01, max_value=1e6),
    beta=st.floats(min_value=0.01, max_value=100),
    k=st.floats(min_value=0, max_value=1),
    x=st.floats(min_value=0, max_value=1),
    y=st.floats(min_value=0, max_value=1),
)
def test_offer_at_is_the_formula_in_cents_monotone_and_never_beyond_the_reservation(
    side: Side, a: float, b: float, beta: float, k: float, x: float, y: float
) -> None:
    initial, reservation = (max(a, b), b) if side == "seller" else (min(a, b), b)
    assume(not (side == "seller" and initial < reservation))
    strategy = Concession(side, initial, reservation, beta=beta, k=k)
    early, late = sorted((x, y))
    first, then = strategy.offer_at(early), strategy.offer_at(late)
    for offer in (first, then):
        assert offer == round(offer, 2)
        assert offer >= 0.01
        assert strategy.better_or_equal(offer, reservation)  # never beyond the reservation
    assert strategy.better_or_equal(first, then)  # concedes: never takes a step back
    # Within a cent of the textbook formula, on the safe side of it (up to float noise).
    raw = reservation + (1 - (k + (1 - k) * early ** (1 / beta))) * (initial - reservation)
    if side == "seller":
        assert raw - 1e-6 <= first < max(raw, reservation) + 0.01 + 1e-6
    else:
        assert min(raw, reservation) - 0.01 - 1e-6 < first <= max(raw, 0.01) + 1e-6
