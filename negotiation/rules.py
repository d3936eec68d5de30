"""The game a buyer and a seller play, as the server enforces it, and the metrics of a finished one.

Pure: no Django, no database, no I/O. The orchestrator, the API and the policies build on it, and
every move, whoever proposes it (a model, a person, the concession strategy), goes through `check`
before it is stored with `play`. The rules are the contract's (``../shared/CONTRACT.md``,
"Negotiations"), after Xia et al. 2024 (arXiv 2402.15813):

- the sides alternate, the ``opening`` side on odd turns; an invalid move still uses its turn;
- ``offer`` needs a finite price of at least a cent (prices are rounded to cents);
- ``accept`` takes the other side's latest offer, and the deal is at that offer's price: a price
  given with it that differs by more than half a cent is a "fake deal" and is refused;
  no side accepts its own offer;
- ``reject`` needs an offer of the other side to reject and takes no price;
- ``walk_away`` is always allowed and ends with no deal;
- ``max_turns`` moves without a deal end with no deal.

A refusal is a `RuleViolation` whose ``reason`` is shown to the mover (a model is re-prompted
with it), so it says what was wrong and what to do instead. Its two subclasses `NotYourTurn` and
`GameOver` carry their own contract codes; all three are `llm.exceptions.ClientError`s, so faces
map them by reading ``exc.code`` / ``exc.status`` like every other error.

`Game` is an immutable value: `play` returns a new one. Offers are never withdrawn: a ``reject``
or an invalid move leaves both sides' latest offers standing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Literal, TypedDict, get_args

from llm.exceptions import ClientError

__all__ = [
    "ACTIONS",
    "MAX_PRICE",
    "MIN_PRICE",
    "SIDES",
    "Action",
    "EndedBy",
    "Game",
    "GameOver",
    "Metrics",
    "Move",
    "NotYourTurn",
    "Outcome",
    "RuleViolation",
    "Side",
    "Status",
    "check",
    "finite_float",
    "format_price",
    "is_number",
    "metrics",
    "other",
    "play",
    "replay",
    "round_cents",
]

Side = Literal["buyer", "seller"]
Action = Literal["offer", "accept", "reject", "walk_away"]
Status = Literal["deal", "no_deal"]
EndedBy = Literal["accept", "walk_away", "max_turns"]

SIDES: tuple[Side, ...] = get_args(Side)
ACTIONS: tuple[Action, ...] = get_args(Action)

# The smallest price there is: an offer that rounds to $0.00 is refused.
MIN_PRICE = 0.01
# A sanity bound, not a business rule: it keeps every price and profit a finite JSON number and
# fits a DecimalField(max_digits=12, decimal_places=2). The library's dearest item is ~$4,300.
MAX_PRICE = 1_000_000_000.0
# "More than half a cent" apart, with room for the float noise of prices that went through JSON.
_CENT_TOLERANCE = 0.005 + 1e-9


def other(side: Side) -> Side:
    """The opponent of ``side``."""
    if side == "buyer":
        return "seller"
    if side == "seller":
        return "buyer"
    raise ValueError(f"side must be 'buyer' or 'seller', not {side!r}")


def is_number(value: object) -> bool:
    """A real number (int, float, Fraction, Decimal), not a bool, a string or None.

    Finiteness is checked separately (`finite_float`): NaN and infinities are numbers here.
    """
    if isinstance(value, bool):
        return False
    return isinstance(value, (numbers.Real, Decimal))


def finite_float(value: object) -> float | None:
    """``value`` as a finite float, or None when it is not a number or not finite (NaN, an
    infinity, an int too large for a float, a signalling Decimal NaN)."""
    if not is_number(value):
        return None
    try:
        result = float(value)  # type: ignore[arg-type]
    except (OverflowError, ValueError):
        return None
    return result if math.isfinite(result) else None


def round_cents(value: float) -> float:
    """``value`` rounded to the nearest cent (Python's round-half-even on the binary value)."""
    return round(float(value), 2)


def format_price(price: float) -> str:
    """``$1,234.50``: the form prices take in reasons and messages."""
    return f"${price:,.2f}"


class RuleViolation(ClientError):
    """A move the rules refuse. ``reason`` is a sentence the mover can act on."""

    code = "INVALID_MOVE"
    status = 422

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotYourTurn(RuleViolation):
    """The other side is to move."""

    code = "NOT_YOUR_TURN"
    status = 409


class GameOver(RuleViolation):
    """The negotiation has ended: no move is taken any more."""

    code = "NEGOTIATION_OVER"
    status = 409


@dataclass(frozen=True, slots=True)
class Move:
    """One stored move. ``price`` is the offer's price, the accepted offer's price for an accept,
    None for reject and walk_away; an invalid move keeps the price it was proposed with (if any)."""

    turn: int
    side: Side
    action: Action
    price: float | None
    message: str
    invalid: bool = False
    session_id: str | None = None

    def __post_init__(self) -> None:
        # Programming errors, not rule violations: callers build moves from validated input.
        if isinstance(self.turn, bool) or not isinstance(self.turn, int) or self.turn < 1:
            raise ValueError(f"turn must be an int >= 1, not {self.turn!r}")
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, not {self.side!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {self.action!r}")

    def as_dict(self) -> dict[str, Any]:
        """The contract's move shape."""
        return {
            "turn": self.turn,
            "side": self.side,
            "action": self.action,
            "price": self.price,
            "message": self.message,
            "invalid": self.invalid,
            "session_id": self.session_id,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a game ended: a deal at ``price`` (ended by accept), or no deal."""

    status: Status
    ended_by: EndedBy
    price: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "ended_by": self.ended_by, "price": self.price}


@dataclass(frozen=True, slots=True)
class Game:
    """The state of a negotiation: its settings and the moves so far (build it with `play` or
    `replay`, which check every move; the constructor trusts ``moves``)."""

    max_turns: int = 10
    opening: Side = "seller"
    moves: tuple[Move, ...] = ()

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_turns, bool)
            or not isinstance(self.max_turns, int)
            or self.max_turns < 1
        ):
            raise ValueError(f"max_turns must be an int >= 1, not {self.max_turns!r}")
        if self.opening not in SIDES:
            raise ValueError(f"opening must be one of {SIDES}, not {self.opening!r}")

    @property
    def turn(self) -> int:
        """The number of the next move (1-based)."""
        return len(self.moves) + 1

    @property
    def next_side(self) -> Side:
        """Who moves next: the opening side on odd turns. Defined even once the game is over."""
        return self.opening if self.turn % 2 == 1 else other(self.opening)

    def latest_offer(self, side: Side) -> Move | None:
        """``side``'s latest valid offer, or None if it has made none."""
        for move in reversed(self.moves):
            if move.side == side and move.action == "offer" and not move.invalid:
                return move
        return None

    @property
    def pending_offer(self) -> Move | None:
        """The offer the next side may accept (the other side's latest offer); None once over."""
        if self.over:
            return None
        return self.latest_offer(other(self.next_side))

    @property
    def invalid_moves(self) -> int:
        return sum(1 for move in self.moves if move.invalid)

    @property
    def outcome(self) -> Outcome | None:
        """How the game ended, or None while it goes on."""
        for move in self.moves:
            if move.invalid:
                continue
            if move.action == "accept":
                return Outcome("deal", "accept", move.price)
            if move.action == "walk_away":
                return Outcome("no_deal", "walk_away", None)
        if len(self.moves) >= self.max_turns:
            return Outcome("no_deal", "max_turns", None)
        return None

    @property
    def over(self) -> bool:
        return self.outcome is not None


def _over_reason(game: Game, outcome: Outcome) -> str:
    if outcome.ended_by == "accept":
        assert outcome.price is not None
        return f"the negotiation is over: a deal was made at {format_price(outcome.price)}"
    if outcome.ended_by == "walk_away":
        walker = next(m.side for m in game.moves if m.action == "walk_away" and not m.invalid)
        return f"the negotiation is over: the {walker} walked away"
    return f"the negotiation is over: all {game.max_turns} turns were used without a deal"


def _check_turn(game: Game, side: object) -> Side:
    """The game goes on and it is ``side``'s turn; returns ``side`` typed."""
    outcome = game.outcome
    if outcome is not None:
        raise GameOver(_over_reason(game, outcome))
    if side not in SIDES:
        raise RuleViolation(f"side must be 'buyer' or 'seller', not {_show(side)}")
    if side != game.next_side:
        raise NotYourTurn(
            f"it is the {game.next_side}'s turn (turn {game.turn}), not the {side}'s; "
            f"wait for the {game.next_side}'s move"
        )
    return game.next_side


def _show(value: object) -> str:
    """A short rendering of a bad value for a reason (it may come from a model: keep it short)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check(game: Game, side: Side, action: Action, price: object = None) -> float | None:
    """Validate a proposed move; return the price it will be stored with, or raise.

    Raises `GameOver` once the game has ended, `NotYourTurn` when ``side`` is not to move, and a
    plain `RuleViolation` for any other refusal. Returns the offer's price rounded to cents for
    ``offer``, the accepted offer's exact price for ``accept``, None for ``reject`` and
    ``walk_away`` (a price given with ``walk_away`` is ignored).
    """
    side = _check_turn(game, side)
    if action not in ACTIONS:
        raise RuleViolation(
            f"action must be one of offer, accept, reject, walk_away, not {_show(action)}"
        )
    theirs = game.latest_offer(other(side))

    if action == "offer":
        return _offer_price(price)

    if action == "accept":
        if theirs is None:
            if game.latest_offer(side) is not None:
                raise RuleViolation(
                    f"you cannot accept your own offer; wait for the {other(side)}'s offer, "
                    "or make another offer"
                )
            raise RuleViolation(
                f"there is no offer from the {other(side)} to accept yet; make an offer instead"
            )
        assert theirs.price is not None  # a valid offer always has one
        given = finite_float(price)
        # NaN compares as "not more than half a cent away" from anything: refuse it explicitly.
        if price is not None and (given is None or abs(given - theirs.price) > _CENT_TOLERANCE):
            # A "fake deal": accepting a price the other side never offered.
            raise RuleViolation(
                f"accept only takes the {other(side)}'s latest offer "
                f"({format_price(theirs.price)}); to propose another price, make an offer"
            )
        return theirs.price

    if action == "reject":
        if theirs is None:
            raise RuleViolation(
                f"there is no offer from the {other(side)} to reject yet; make an offer instead"
            )
        if price is not None:
            raise RuleViolation("reject takes no price; to propose a price, make an offer instead")
        return None

    # walk_away: always allowed, whatever it came with.
    return None


def _offer_price(price: object) -> float:
    if price is None:
        raise RuleViolation("an offer needs a price: say how many dollars, e.g. 120.00")
    if not is_number(price):
        raise RuleViolation(f"an offer's price must be a number of dollars, not {_show(price)}")
    value = finite_float(price)
    if value is None:
        raise RuleViolation(
            f"an offer's price must be a finite number of dollars, not {_show(price)}"
        )
    rounded = round_cents(value)
    if rounded < MIN_PRICE:
        raise RuleViolation(
            f"an offer's price must be at least {format_price(MIN_PRICE)}, not {_show(price)}"
        )
    if rounded > MAX_PRICE:
        raise RuleViolation(f"an offer's price must be at most {format_price(MAX_PRICE)}")
    return rounded


def play(game: Game, move: Move) -> Game:
    """The game after ``move``.

    A valid move is checked again (so nothing can slip past the rules) and stored with the price
    `check` returns. A move with ``invalid=True`` passes the turn and changes no offer; a price
    it carries that is not a finite number is stored as None, so every stored move is JSON-safe.
    Raises `GameOver` / `NotYourTurn` for an invalid move too, `RuleViolation` for a valid one the
    rules refuse, ValueError when ``move.turn`` is not ``game.turn`` (a caller's bug).
    """
    if move.turn != game.turn:
        raise ValueError(f"move.turn is {move.turn}, but the next turn is {game.turn}")
    if move.invalid:
        _check_turn(game, move.side)
        move = replace(move, price=finite_float(move.price))
    else:
        move = replace(move, price=check(game, move.side, move.action, move.price))
    return replace(game, moves=(*game.moves, move))


def replay(moves: Iterable[Move], *, max_turns: int = 10, opening: Side = "seller") -> Game:
    """A game rebuilt from stored moves, each checked with `play` (e.g. to resume one)."""
    game = Game(max_turns=max_turns, opening=opening)
    for move in moves:
        game = play(game, move)
    return game


class Metrics(TypedDict):
    """The contract's metrics of a negotiation."""

    deal: bool
    price: float | None
    mutual_interest: bool
    buyer_profit: float | None
    seller_profit: float | None
    turns: int
    invalid_moves: int
    tokens: int
    duration_ms: int


def metrics(*, budget: float, cost: float, game: Game, tokens: int, duration_ms: int) -> Metrics:
    """The contract's metrics for ``game`` (finished or not), the paper's definitions.

    For a deal at price p: ``buyer_profit = (budget - p) / |budget - cost|`` and
    ``seller_profit = (p - cost) / |budget - cost|``, at full float precision. Both are None
    without a deal, and None when ``budget == cost``: the zone of agreement is a single point and
    the normalisation divides by zero. Every value is JSON-safe (no NaN, no infinity): a profit
    that would overflow a float is None too, which a price within `MAX_PRICE` never causes for
    budgets and costs in whole cents.
    """
    for name, value in (("budget", budget), ("cost", cost)):
        if finite_float(value) is None:
            raise ValueError(f"{name} must be a finite number, not {value!r}")
    for name, count in (("tokens", tokens), ("duration_ms", duration_ms)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} must be an int >= 0, not {count!r}")
    budget, cost = float(budget), float(cost)  # finite: checked above
    outcome = game.outcome
    price = outcome.price if outcome is not None and outcome.status == "deal" else None
    buyer_profit = seller_profit = None
    if price is not None:
        zone = abs(budget - cost)
        if zone > 0:
            buyer_profit = _finite_or_none((budget - price) / zone)
            seller_profit = _finite_or_none((price - cost) / zone)
    return {
        "deal": price is not None,
        "price": price,
        "mutual_interest": cost < budget,
        "buyer_profit": buyer_profit,
        "seller_profit": seller_profit,
        "turns": len(game.moves),
        "invalid_moves": game.invalid_moves,
        "tokens": tokens,
        "duration_ms": duration_ms,
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
