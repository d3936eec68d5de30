"""The game's rules (`negotiation.rules`): each refusal and its reason, the end of a game, and the
metrics; then properties over random move sequences, valid and not: no deal is ever made at a
price the other side did not offer as its latest offer, and the metrics are the contract's."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm.exceptions import ClientError
from negotiation.rules import (
    ACTIONS,
    MAX_PRICE,
    SIDES,
    Game,
    GameOver,
    Move,
    NotYourTurn,
    Outcome,
    RuleViolation,
    check,
    metrics,
    other,
    play,
    replay,
)

MOVE_KEYS = {"turn", "side", "action", "price", "message", "invalid", "session_id"}
METRIC_KEYS = {
    "deal",
    "price",
    "mutual_interest",
    "buyer_profit",
    "seller_profit",
    "turns",
    "invalid_moves",
    "tokens",
    "duration_ms",
}


def step(game: Game, action: str, price: Any = None, *, invalid: bool = False) -> Game:
    """The next side's move, checked first unless ``invalid``."""
    side = game.next_side
    if not invalid:
        price = check(game, side, action, price)  # type: ignore[arg-type]
    return play(game, Move(game.turn, side, action, price, f"{action} {price}", invalid))  # type: ignore[arg-type]


def game_of(*moves: tuple[str, Any], opening: str = "seller", max_turns: int = 10) -> Game:
    game = Game(max_turns=max_turns, opening=opening)  # type: ignore[arg-type]
    for action, price in moves:
        game = step(game, action, price)
    return game


def refusal(game: Game, side: str, action: str, price: Any = None) -> RuleViolation:
    with pytest.raises(RuleViolation) as caught:
        check(game, side, action, price)  # type: ignore[arg-type]
    return caught.value


# --- the basics -------------------------------------------------------------------------------


def test_the_core_is_pure_and_exported_lazily() -> None:
    """Importing the package and every public name loads neither Django nor a network client
    (the package is a Django app: its __init__ runs before models are ready)."""
    code = (
        "import sys, negotiation\n"
        "for name in negotiation.__all__: getattr(negotiation, name)\n"
        "heavy = {m.split('.')[0] for m in sys.modules} & {'django', 'httpx', 'ninja'}\n"
        "print(sorted(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],  # the project, whatever pytest's cwd
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == "[]"


# --- the game ---------------------------------------------------------------------------------


def test_other_side() -> None:
    assert other("buyer") == "seller"
    assert other("seller") == "buyer"
    with pytest.raises(ValueError):
        other("alice")  # type: ignore[arg-type]


def test_move_as_dict_is_the_contract_shape() -> None:
    move = Move(3, "buyer", "offer", 99.5, "How about 99.50?", session_id="abc")
    data = move.as_dict()
    assert set(data) == MOVE_KEYS
    assert data == {
        "turn": 3,
        "side": "buyer",
        "action": "offer",
        "price": 99.5,
        "message": "How about 99.50?",
        "invalid": False,
        "session_id": "abc",
    }
    json.dumps(data, allow_nan=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"turn": 0},
        {"turn": True},
        {"side": "alice"},
        {"action": "bid"},
    ],
)
def test_a_move_outside_the_contract_cannot_be_built(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "turn": 1,
        "side": "seller",
        "action": "offer",
        "price": 1.0,
        "message": "",
    }
    with pytest.raises(ValueError):
        Move(**(fields | kwargs))


@pytest.mark.parametrize("kwargs", [{"max_turns": 0}, {"max_turns": True}, {"opening": "alice"}])
def test_a_game_outside_the_contract_cannot_be_built(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Game(**kwargs)


@pytest.mark.parametrize("opening", SIDES)
def test_the_sides_alternate_from_the_opening_side(opening: str) -> None:
    game = Game(max_turns=6, opening=opening)  # type: ignore[arg-type]
    seen = []
    for action in ("offer", "offer", "offer"):
        seen.append((game.turn, game.next_side))
        game = step(game, action, 100.0)
    # An invalid move uses its turn too.
    seen.append((game.turn, game.next_side))
    game = step(game, "accept", 1.0, invalid=True)
    seen.append((game.turn, game.next_side))
    first, second = opening, other(opening)  # type: ignore[arg-type]
    assert seen == [(1, first), (2, second), (3, first), (4, second), (5, first)]


def test_latest_offer_is_the_sides_latest_valid_offer() -> None:
    game = game_of(("offer", 120), ("offer", 60), ("offer", 110))
    assert game.latest_offer("seller") == game.moves[2]
    assert game.latest_offer("buyer") == game.moves[1]
    game = step(game, "offer", 80.0, invalid=True)  # the buyer's invalid offer changes nothing
    assert game.latest_offer("buyer") == game.moves[1]
    assert game.latest_offer("seller") == game.moves[2]
    game = step(game, "reject")  # nor does a reject: offers are never withdrawn
    assert game.latest_offer("buyer") == game.moves[1]
    assert Game().latest_offer("seller") is None


def test_pending_offer_is_what_the_next_side_may_accept() -> None:
    game = Game()
    assert game.pending_offer is None
    game = step(game, "offer", 120)
    assert game.pending_offer == game.moves[0]  # the buyer may accept the seller's offer
    game = step(game, "offer", 60)
    assert game.pending_offer == game.moves[1]  # the seller may accept the buyer's
    game = step(game, "accept")
    assert game.pending_offer is None  # over


# --- the three exceptions ---------------------------------------------------------------------


def test_the_violations_carry_their_contract_codes() -> None:
    assert issubclass(NotYourTurn, RuleViolation)
    assert issubclass(GameOver, RuleViolation)
    assert issubclass(RuleViolation, ClientError)
    assert (RuleViolation.code, RuleViolation.status) == ("INVALID_MOVE", 422)
    assert (NotYourTurn.code, NotYourTurn.status) == ("NOT_YOUR_TURN", 409)
    assert (GameOver.code, GameOver.status) == ("NEGOTIATION_OVER", 409)
    error = RuleViolation("make an offer")
    assert error.reason == error.message == str(error) == "make an offer"
    assert error.as_dict() == {"code": "INVALID_MOVE", "message": "make an offer"}


def test_moving_out_of_turn_is_not_your_turn() -> None:
    game = Game(opening="seller")
    error = refusal(game, "buyer", "walk_away")
    assert type(error) is NotYourTurn
    assert (
        error.reason
        == "it is the seller's turn (turn 1), not the buyer's; wait for the seller's move"
    )
    game = step(game, "offer", 100)
    assert type(refusal(game, "seller", "offer", 90)) is NotYourTurn


@pytest.mark.parametrize(
    ("moves", "reason"),
    [
        ([("offer", 120), ("accept", None)], "the negotiation is over: a deal was made at $120.00"),
        ([("offer", 120), ("walk_away", None)], "the negotiation is over: the buyer walked away"),
        (
            [("offer", 120), ("offer", 60)],
            "the negotiation is over: all 2 turns were used without a deal",
        ),
    ],
)
def test_any_move_after_the_end_is_game_over(moves: list[tuple[str, Any]], reason: str) -> None:
    game = game_of(*moves, max_turns=2)
    assert game.over
    for side in SIDES:
        for action in ACTIONS:
            error = refusal(game, side, action, 100)
            assert type(error) is GameOver
            assert error.reason == reason
    with pytest.raises(GameOver):  # an invalid move cannot be stored after the end either
        play(game, Move(game.turn, game.next_side, "offer", 1.0, "", invalid=True))


def test_an_unknown_side_or_action_is_a_plain_violation() -> None:
    game = Game()
    error = refusal(game, "alice", "offer", 10)
    assert type(error) is RuleViolation
    assert error.reason == "side must be 'buyer' or 'seller', not 'alice'"
    error = refusal(game, "seller", "bid", 10)
    assert type(error) is RuleViolation
    assert error.reason == "action must be one of offer, accept, reject, walk_away, not 'bid'"


# --- offer ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "reason"),
    [
        (None, "an offer needs a price: say how many dollars, e.g. 120.00"),
        ("120", "an offer's price must be a number of dollars, not '120'"),
        (True, "an offer's price must be a number of dollars, not True"),
        ([120], "an offer's price must be a number of dollars, not [120]"),
        (math.nan, "an offer's price must be a finite number of dollars, not nan"),
        (math.inf, "an offer's price must be a finite number of dollars, not inf"),
        (-math.inf, "an offer's price must be a finite number of dollars, not -inf"),
        (
            10**400,
            "an offer's price must be a finite number of dollars, not 1" + "0" * 36 + "...",
        ),
        (
            Decimal("sNaN"),
            "an offer's price must be a finite number of dollars, not Decimal('sNaN')",
        ),
        (0, "an offer's price must be at least $0.01, not 0"),
        (-5, "an offer's price must be at least $0.01, not -5"),
        (0.004, "an offer's price must be at least $0.01, not 0.004"),
        (MAX_PRICE + 1, "an offer's price must be at most $1,000,000,000.00"),
    ],
)
def test_an_offer_needs_a_finite_price_of_a_cent_or_more(price: Any, reason: str) -> None:
    error = refusal(Game(), "seller", "offer", price)
    assert type(error) is RuleViolation
    assert error.reason == reason


@pytest.mark.parametrize(
    ("price", "stored"),
    [
        (120, 120.0),
        (120.456, 120.46),
        (0.005, 0.01),
        (Fraction(1, 3), 0.33),
        (Decimal("19.99"), 19.99),
        (MAX_PRICE, MAX_PRICE),
    ],
)
def test_an_offers_price_is_rounded_to_cents(price: Any, stored: float) -> None:
    result = check(Game(), "seller", "offer", price)
    assert result == stored
    assert type(result) is float


# --- accept -----------------------------------------------------------------------------------


def test_accept_needs_an_offer_of_the_other_side() -> None:
    error = refusal(Game(), "seller", "accept")
    assert type(error) is RuleViolation
    assert error.reason == "there is no offer from the buyer to accept yet; make an offer instead"


def test_no_side_accepts_its_own_offer() -> None:
    game = game_of(("offer", 120), ("reject", None))  # the seller offered, the buyer rejected
    for price in (None, 120):
        error = refusal(game, "seller", "accept", price)
        assert error.reason == (
            "you cannot accept your own offer; wait for the buyer's offer, or make another offer"
        )


def test_accept_is_only_for_the_latest_offer_a_fake_deal_is_refused() -> None:
    game = game_of(("offer", 120), ("offer", 60), ("offer", 110))
    for price in (120, 110.01, 109.99, 60, 0, math.nan, math.inf, "110", True):
        error = refusal(game, "buyer", "accept", price)
        assert error.reason == (
            "accept only takes the seller's latest offer ($110.00); to propose another price, "
            "make an offer"
        )


@pytest.mark.parametrize("price", [None, 60, 60.0, 60.004, 59.996, Decimal("60.00")])
def test_accept_is_at_the_other_sides_latest_offer(price: Any) -> None:
    game = game_of(("offer", 120), ("offer", 60))
    assert check(game, "seller", "accept", price) == 60.0
    game = step(game, "accept", price)
    assert game.moves[-1].price == 60.0
    assert game.outcome == Outcome("deal", "accept", 60.0)


def test_an_offer_rejected_can_still_be_accepted() -> None:
    game = game_of(("offer", 120), ("reject", None), ("offer", 118))
    assert check(game, "buyer", "accept") == 118.0


# --- reject and walk_away ---------------------------------------------------------------------


def test_reject_needs_an_offer_of_the_other_side_and_no_price() -> None:
    error = refusal(Game(), "seller", "reject")
    assert error.reason == "there is no offer from the buyer to reject yet; make an offer instead"
    game = game_of(("offer", 120))
    error = refusal(game, "buyer", "reject", 100)
    assert error.reason == "reject takes no price; to propose a price, make an offer instead"
    assert check(game, "buyer", "reject") is None
    assert not step(game, "reject").over


@pytest.mark.parametrize("price", [None, 50, math.nan, "junk"])
def test_walk_away_is_always_allowed_and_ends_without_a_deal(price: Any) -> None:
    game = Game()
    assert check(game, "seller", "walk_away", price) is None
    game = step(game, "walk_away", price)
    assert game.moves[0].price is None
    assert game.outcome == Outcome("no_deal", "walk_away", None)
    assert game.over


# --- play and the end of a game ---------------------------------------------------------------


def test_play_checks_a_valid_move_again() -> None:
    game = game_of(("offer", 120), ("offer", 60))
    with pytest.raises(RuleViolation, match="latest offer"):
        play(game, Move(3, "seller", "accept", 120.0, "deal at my price!"))
    with pytest.raises(NotYourTurn):
        play(game, Move(3, "buyer", "offer", 70.0, ""))
    with pytest.raises(ValueError, match="next turn is 3"):
        play(game, Move(5, "seller", "offer", 70.0, ""))
    # The stored price is the one check gives: rounded for an offer, the offer's for an accept.
    assert play(game, Move(3, "seller", "offer", 99.999, "")).moves[-1].price == 100.0
    assert play(game, Move(3, "seller", "accept", None, "")).moves[-1].price == 60.0


def test_an_invalid_move_passes_the_turn_and_changes_nothing_else() -> None:
    game = game_of(("offer", 120))
    before = (game.latest_offer("seller"), game.latest_offer("buyer"))
    for action in ACTIONS:  # even an invalid accept or walk_away does not end the game
        game = step(game, action, 1.0, invalid=True)
        assert not game.over
        assert (game.latest_offer("seller"), game.latest_offer("buyer")) == before
    assert game.turn == 6
    assert game.invalid_moves == 4


@pytest.mark.parametrize(("price", "stored"), [(math.nan, None), ("abc", None), (-3, -3.0)])
def test_an_invalid_moves_price_is_stored_json_safe(price: Any, stored: Any) -> None:
    game = step(Game(), "offer", price, invalid=True)
    assert game.moves[0].price == stored
    json.dumps(game.moves[0].as_dict(), allow_nan=False)


def test_max_turns_moves_without_a_deal_end_with_no_deal() -> None:
    game = game_of(("offer", 120), ("offer", 60), ("offer", 100), max_turns=4)
    assert not game.over
    assert game.outcome is None
    game = step(game, "offer", 1.0, invalid=True)  # invalid moves count
    assert game.outcome == Outcome("no_deal", "max_turns", None)


def test_an_accept_on_the_last_turn_is_a_deal() -> None:
    game = game_of(("offer", 120), ("offer", 60), ("offer", 100), ("accept", None), max_turns=4)
    assert game.outcome == Outcome("deal", "accept", 100.0)


def test_replay_rebuilds_a_game_from_its_moves() -> None:
    game = game_of(
        ("offer", 120), ("offer", 60), ("reject", None), ("accept", 120), opening="buyer"
    )
    assert replay(game.moves, max_turns=10, opening="buyer") == game
    with pytest.raises(NotYourTurn):  # the same moves from the other opening are out of turn
        replay(game.moves, max_turns=10, opening="seller")


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_of_a_deal() -> None:
    game = game_of(("offer", 120), ("offer", 60))
    game = step(game, "offer", 5, invalid=True)
    game = step(game, "offer", 70)
    game = step(game, "accept")  # the seller accepts the buyer's 70
    result = metrics(budget=110, cost=50, game=game, tokens=321, duration_ms=4567)
    assert set(result) == METRIC_KEYS
    assert result == {
        "deal": True,
        "price": 70.0,
        "mutual_interest": True,
        "buyer_profit": (110 - 70) / 60,
        "seller_profit": (70 - 50) / 60,
        "turns": 5,
        "invalid_moves": 1,
        "tokens": 321,
        "duration_ms": 4567,
    }


def test_metrics_without_a_deal() -> None:
    game = game_of(("offer", 120), ("walk_away", None))
    assert metrics(budget=50, cost=80, game=game, tokens=0, duration_ms=0) == {
        "deal": False,
        "price": None,
        "mutual_interest": False,
        "buyer_profit": None,
        "seller_profit": None,
        "turns": 2,
        "invalid_moves": 0,
        "tokens": 0,
        "duration_ms": 0,
    }


def test_metrics_of_a_deal_in_conflicting_interest_and_at_a_single_point() -> None:
    game = game_of(("offer", 90), ("accept", None))
    result = metrics(budget=80, cost=100, game=game, tokens=1, duration_ms=1)
    assert (result["mutual_interest"], result["buyer_profit"], result["seller_profit"]) == (
        False,
        (80 - 90) / 20,
        (90 - 100) / 20,
    )
    # budget == cost: |budget - cost| is 0, the profits are undefined, not NaN or infinite.
    result = metrics(budget=90, cost=90, game=game, tokens=1, duration_ms=1)
    assert (result["deal"], result["price"], result["mutual_interest"]) == (True, 90.0, False)
    assert result["buyer_profit"] is None
    assert result["seller_profit"] is None


def test_a_profit_that_would_overflow_is_none() -> None:
    game = game_of(("offer", MAX_PRICE), ("accept", None))
    result = metrics(budget=1e-300, cost=0.0, game=game, tokens=0, duration_ms=0)
    assert result["buyer_profit"] is None
    assert result["seller_profit"] is None
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget": math.nan},
        {"cost": math.inf},
        {"budget": "100"},
        {"tokens": -1},
        {"duration_ms": 1.5},
        {"tokens": True},
    ],
)
def test_metrics_refuse_nonsense(kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {
        "budget": 100.0,
        "cost": 50.0,
        "game": Game(),
        "tokens": 0,
        "duration_ms": 0,
    }
    with pytest.raises(ValueError):
        metrics(**(arguments | kwargs))


# --- properties over random move sequences ----------------------------------------------------

FRESH_PRICES = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1, max_value=300),
    st.integers(min_value=-5, max_value=300),
    st.sampled_from(["60", True, Decimal("NaN"), 1e-9]),
)
# Prices near an earlier offer: what a fake deal would try (off by a cent, half a cent, less).
NUDGES = st.sampled_from([-0.01, -0.0051, -0.005, -0.004, 0.0, 0.004, 0.005, 0.0051, 0.01])


@st.composite
def random_games(draw: st.DrawFn) -> tuple[Game, list[str]]:
    """A game played by random proposals (right side or wrong, any action, any price), each
    stored when the rules take it, stored as invalid or dropped when they refuse it. Asserts,
    step by step, what the rules promise against a model of the game kept here."""
    game = Game(
        max_turns=draw(st.integers(min_value=1, max_value=12)),
        opening=draw(st.sampled_from(SIDES)),
    )
    latest: dict[str, float | None] = {"buyer": None, "seller": None}
    offered: list[float] = []
    log: list[str] = []
    for _ in range(draw(st.integers(min_value=0, max_value=30))):
        expected_side = game.opening if len(game.moves) % 2 == 0 else other(game.opening)
        assert game.next_side == expected_side
        assert game.turn == len(game.moves) + 1
        side = draw(st.sampled_from([expected_side, expected_side, other(expected_side)]))
        action = draw(st.sampled_from(ACTIONS))
        echo = draw(st.booleans())
        if offered and echo:
            price: Any = draw(st.sampled_from(offered)) + draw(NUDGES)
        else:
            price = draw(FRESH_PRICES)
        was_over = game.over
        theirs = latest[other(side)]
        try:
            stored = check(game, side, action, price)
        except GameOver:
            assert was_over
            log.append("over")
            continue
        except NotYourTurn:
            assert not was_over and side != expected_side
            log.append("not your turn")
            continue
        except RuleViolation:
            assert not was_over and side == expected_side
            if action == "accept":
                near = isinstance(price, (int, float)) and not isinstance(price, bool)
                assert (
                    theirs is None
                    or (price is not None and not near)
                    or (near and not math.isfinite(price))
                    or (near and abs(price - theirs) > 0.005 + 1e-9)
                )
            if draw(st.booleans()):
                game = play(game, Move(game.turn, side, action, price, "", invalid=True))
                log.append("invalid")
            continue
        assert not was_over and side == expected_side
        if action == "offer":
            assert stored == round(float(price), 2) and stored >= 0.01
            latest[side] = stored
            offered.append(stored)
        elif action == "accept":
            assert theirs is not None and stored == theirs
            # A price given with it names that offer, to within half a cent: no fake deal.
            assert price is None or abs(float(price) - theirs) <= 0.005 + 1e-9
        else:
            assert stored is None
            if action == "reject":
                assert theirs is not None and price is None
        # Half the time the move goes straight to play, as it came (play must check it again).
        raw = price if draw(st.booleans()) else stored
        game = play(game, Move(game.turn, side, action, raw, ""))
        assert game.moves[-1].price == stored
        log.append(action)
    return game, log


def _deal_is_at_the_other_sides_latest_offer(game: Game) -> None:
    outcome = game.outcome
    if outcome is None or outcome.status != "deal":
        return
    accept = game.moves[-1]
    assert accept.action == "accept" and not accept.invalid
    # Independently of the rules' code: the other side's latest valid offer before the accept.
    offers = [
        m.price
        for m in game.moves[:-1]
        if m.side != accept.side and m.action == "offer" and not m.invalid
    ]
    assert offers, "a deal without an offer of the other side"
    assert outcome.price == accept.price == offers[-1]


@settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(random_games())
def test_no_move_sequence_makes_a_deal_at_a_price_not_offered(
    played: tuple[Game, list[str]],
) -> None:
    game, _ = played
    _deal_is_at_the_other_sides_latest_offer(game)
    # A game ends at its first valid accept or walk_away, or after max_turns moves.
    enders = [
        i for i, m in enumerate(game.moves) if not m.invalid and m.action in ("accept", "walk_away")
    ]
    assert len(enders) <= 1
    if enders:
        assert enders[0] == len(game.moves) - 1
    assert game.over == (bool(enders) or len(game.moves) >= game.max_turns)
    assert len(game.moves) <= game.max_turns
    # Replaying the stored moves gives the same game: stored moves are all legal.
    assert replay(game.moves, max_turns=game.max_turns, opening=game.opening) == game
    for move in game.moves:
        json.dumps(move.as_dict(), allow_nan=False)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    random_games(),
    st.integers(min_value=1, max_value=500_000),
    st.integers(min_value=1, max_value=500_000),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**7),
)
def test_metrics_agree_with_the_contracts_definitions(
    played: tuple[Game, list[str]], budget_cents: int, cost_cents: int, tokens: int, ms: int
) -> None:
    game, _ = played
    budget, cost = budget_cents / 100, cost_cents / 100
    result = metrics(budget=budget, cost=cost, game=game, tokens=tokens, duration_ms=ms)
    accepts = [m for m in game.moves if m.action == "accept" and not m.invalid]
    price = accepts[0].price if accepts else None
    expected: dict[str, Any] = {
        "deal": bool(accepts),
        "price": price,
        "mutual_interest": cost < budget,
        "buyer_profit": None,
        "seller_profit": None,
        "turns": len(game.moves),
        "invalid_moves": sum(m.invalid for m in game.moves),
        "tokens": tokens,
        "duration_ms": ms,
    }
    if price is not None and budget != cost:
        expected["buyer_profit"] = (budget - price) / abs(budget - cost)
        expected["seller_profit"] = (price - cost) / abs(budget - cost)
    assert result == expected
    json.dumps(result, allow_nan=False)
