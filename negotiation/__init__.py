"""Negotiations: a buyer and a seller bargaining over one item, move by move.

The pure core, free of Django, the database and the network, is what everything else builds on:

- `negotiation.rules`: the game the server enforces (`check` a move, `play` it, the `outcome`)
  and the contract's `metrics`;
- `negotiation.strategies`: the time-dependent `Concession` strategy that decides the `narrated`
  policy's moves;
- `negotiation.scenarios`: the bundled library of 930 real products, and custom scenarios.

Imported lazily (this package is a Django app, loaded before models are)::

    from negotiation import Concession, Game, Move, check, from_library, play
    scenario = from_library(0)
    seller = Concession.for_seller(scenario.list_price, scenario.seller_cost)
    game = Game(max_turns=10, opening="seller")
    decision = seller.decide(game)
    price = check(game, "seller", decision.action, decision.price)
    game = play(game, Move(game.turn, "seller", decision.action, price, "Hello!"))
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Action": "negotiation.rules",
    "Game": "negotiation.rules",
    "GameOver": "negotiation.rules",
    "Metrics": "negotiation.rules",
    "Move": "negotiation.rules",
    "NotYourTurn": "negotiation.rules",
    "Outcome": "negotiation.rules",
    "RuleViolation": "negotiation.rules",
    "Side": "negotiation.rules",
    "check": "negotiation.rules",
    "metrics": "negotiation.rules",
    "other": "negotiation.rules",
    "play": "negotiation.rules",
    "replay": "negotiation.rules",
    "Concession": "negotiation.strategies",
    "Decision": "negotiation.strategies",
    "own_moves": "negotiation.strategies",
    "progress": "negotiation.strategies",
    "Item": "negotiation.scenarios",
    "Product": "negotiation.scenarios",
    "Scenario": "negotiation.scenarios",
    "ScenarioNotFound": "negotiation.scenarios",
    "categories": "negotiation.scenarios",
    "custom": "negotiation.scenarios",
    "from_library": "negotiation.scenarios",
    "get_product": "negotiation.scenarios",
    "products": "negotiation.scenarios",
    "search": "negotiation.scenarios",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'negotiation' has no attribute {name!r}") from None
    return getattr(import_module(module), name)
