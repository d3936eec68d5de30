"""The concession strategy that decides the `narrated` policy's moves (the model only words them).

A textbook time-dependent tactic (Faratin, Sierra and Jennings 1998): the offer at time x in
[0, 1] is ``reservation + (1 - F(x)) * (initial - reservation)`` with
``F(x) = k + (1 - k) * x ** (1 / beta)``: beta < 1 holds out and concedes late (Boulware),
beta = 1 concedes linearly, beta > 1 early (Conceder). It accepts by AC_next: the other side's
latest offer when it is at least as good for it as the offer it would make now. That is the
deterministic "offer generator" with which the paper's OG-Narrator buyer reached 88.88 % deals
(Xia et al. 2024, arXiv 2402.15813).

Time is the side's own progress, so each side reaches its reservation exactly on its own last
move (``own_moves``, ``progress``): with ``max_turns`` moves in all, the last two moves are one of
each side, the first of them offers its reservation, and the second accepts it whenever
``cost < budget``. So two sides playing this strategy always make a deal in mutual interest.

Decisions made where the textbook is silent:
- Offers are whole cents, rounded away from the opponent (the seller up, the buyer down) and
  clamped to the reservation, so rounding never crosses it; the buyer never offers less than a
  cent (the rules refuse $0.00).
- A price exactly at the reservation is never accepted (a tie-break of AC_next): such a deal
  leaves that side nothing, and with ``cost == budget`` (conflicting interest by the contract's
  definition) it is the only deal possible, whose profits are undefined (zero over zero). Mutual
  interest loses nothing: the final offer at one side's reservation is strictly better than the
  other's. Hence: never a deal when ``cost >= budget``.
- The deal guarantee needs cost and budget in whole cents (scenarios always are): two
  reservations inside the same cent leave no price in cents between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from negotiation.rules import (
    MAX_PRICE,
    MIN_PRICE,
    SIDES,
    Game,
    GameOver,
    NotYourTurn,
    Side,
    finite_float,
    other,
)

__all__ = ["Concession", "Decision", "own_moves", "progress"]

# Float noise below this many cents is noise, not a price: 120.00000000000001 is $120.00, not
# (rounded up) $120.01.
_NOISE_CENTS = 1e-6
_MIN_CENTS = round(MIN_PRICE * 100)


def own_moves(side: Side, opening: Side, max_turns: int) -> int:
    """How many of the ``max_turns`` moves are ``side``'s: the opening side has the odd turns."""
    if side not in SIDES or opening not in SIDES:
        raise ValueError(f"side and opening must be one of {SIDES}")
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns must be an int >= 1, not {max_turns!r}")
    return (max_turns + 1) // 2 if side == opening else max_turns // 2


def progress(side: Side, opening: Side, max_turns: int, turn: int) -> float:
    """``side``'s own time at ``turn``: its i-th of n own moves is at ``(i - 1) / (n - 1)``, so 0 on
    its first move and 1 on its last (1 when it has a single move).

    Raises ValueError when ``turn`` is not one of ``side``'s turns within ``max_turns``.
    """
    n = own_moves(side, opening, max_turns)
    if isinstance(turn, bool) or not isinstance(turn, int) or not 1 <= turn <= max_turns:
        raise ValueError(f"turn must be an int in 1..{max_turns}, not {turn!r}")
    mover = opening if turn % 2 == 1 else other(opening)
    if mover != side:
        raise ValueError(f"turn {turn} is the {mover}'s, not the {side}'s")
    i = (turn + 1) // 2 if side == opening else turn // 2
    return 1.0 if n == 1 else (i - 1) / (n - 1)


def _cents_up(value: float) -> int:
    cents = value * 100
    nearest = round(cents)
    return nearest if abs(cents - nearest) <= _NOISE_CENTS else math.ceil(cents)


def _cents_down(value: float) -> int:
    cents = value * 100
    nearest = round(cents)
    return nearest if abs(cents - nearest) <= _NOISE_CENTS else math.floor(cents)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the strategy does on its turn: ``offer`` at ``price``, or ``accept`` the other side's
    latest offer (``price`` is that offer's)."""

    action: Literal["offer", "accept"]
    price: float


@dataclass(frozen=True, slots=True)
class Concession:
    """A side's time-dependent concession from ``initial`` to ``reservation`` (its walk-away
    price: the seller's cost, the buyer's budget)."""

    side: Side
    initial: float
    reservation: float
    beta: float = 1.0
    k: float = 0.0

    def __post_init__(self) -> None:
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, not {self.side!r}")
        initial, reservation = finite_float(self.initial), finite_float(self.reservation)
        if initial is None or not 0 < initial <= MAX_PRICE:
            raise ValueError(
                f"initial must be a price in (0, {MAX_PRICE:.0f}], not {self.initial!r}"
            )
        if reservation is None or not MIN_PRICE <= reservation <= MAX_PRICE:
            raise ValueError(
                f"reservation must be a price in [{MIN_PRICE}, {MAX_PRICE:.0f}], "
                f"not {self.reservation!r}"
            )
        beta = finite_float(self.beta)
        if beta is None or beta <= 0:
            raise ValueError(f"beta must be a finite number > 0, not {self.beta!r}")
        k = finite_float(self.k)
        if k is None or not 0 <= k <= 1:
            raise ValueError(f"k must be a number in [0, 1], not {self.k!r}")
        if self.side == "seller" and initial < reservation:
            raise ValueError("a seller's initial offer cannot be below its reservation (cost)")
        if self.side == "buyer" and initial > reservation:
            raise ValueError("a buyer's initial offer cannot be above its reservation (budget)")

    @classmethod
    def for_seller(
        cls, list_price: float, cost: float, beta: float = 1.0, k: float = 0.0
    ) -> Concession:
        """The seller opens at the list price (or its cost, if dearer) and concedes to its cost."""
        return cls("seller", max(list_price, cost), cost, beta, k)

    @classmethod
    def for_buyer(
        cls, list_price: float, budget: float, beta: float = 1.0, k: float = 0.0
    ) -> Concession:
        """The buyer opens at half the list price (or its budget, if lower) and concedes to its
        budget."""
        return cls("buyer", min(0.5 * list_price, budget), budget, beta, k)

    @property
    def _reservation_cents(self) -> int:
        """The reservation in whole cents on this side of it (up for the seller, down for the
        buyer), so the strategy's prices never cross it."""
        if self.side == "seller":
            cents = _cents_up(self.reservation)
            return cents + 1 if cents / 100 < self.reservation else cents
        cents = _cents_down(self.reservation)
        return cents - 1 if cents / 100 > self.reservation else cents

    def offer_at(self, x: float) -> float:
        """The offer at own time ``x`` in [0, 1], in whole cents, never beyond the reservation;
        the seller's offers never rise with x, the buyer's never fall."""
        if not 0 <= x <= 1:  # also refuses NaN
            raise ValueError(f"x must be in [0, 1], not {x!r}")
        limit = self._reservation_cents
        if x == 1:
            # The last own move offers the reservation by definition, not by float arithmetic.
            return limit / 100
        f = self.k + (1 - self.k) * x ** (1 / self.beta)
        raw = self.reservation + (1 - f) * (self.initial - self.reservation)
        if self.side == "seller":
            cents = max(_cents_up(raw), limit)
        else:
            cents = min(max(_cents_down(raw), _MIN_CENTS), limit)
        return cents / 100

    def better_or_equal(self, price: float, than: float) -> bool:
        """Whether ``price`` is at least as good for this side as ``than``."""
        return price >= than if self.side == "seller" else price <= than

    def better(self, price: float, than: float) -> bool:
        """Whether ``price`` is strictly better for this side than ``than``."""
        return price > than if self.side == "seller" else price < than

    def acceptable(self, price: float, x: float) -> bool:
        """AC_next at own time ``x``: ``price`` is at least as good as this side's offer now, and
        strictly better than its reservation (the module's tie-break)."""
        now = self.offer_at(x)
        return self.better_or_equal(price, now) and self.better(price, self.reservation)

    def decide(self, game: Game) -> Decision:
        """This side's move in ``game``: accept the other side's latest offer if AC_next holds,
        else offer ``offer_at`` this side's progress.

        Raises `GameOver` / `NotYourTurn` (the rules' refusals) when it is not this side's move.
        """
        if game.over:
            raise GameOver("the negotiation is over")
        if game.next_side != self.side:
            raise NotYourTurn(f"it is the {game.next_side}'s turn, not the {self.side}'s")
        x = progress(self.side, game.opening, game.max_turns, game.turn)
        theirs = game.latest_offer(other(self.side))
        if theirs is not None and theirs.price is not None and self.acceptable(theirs.price, x):
            return Decision("accept", theirs.price)
        return Decision("offer", self.offer_at(x))
