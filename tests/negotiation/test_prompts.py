"""`negotiation.prompts`: each side's view and prompts, and how a model's words are kept honest."""

from __future__ import annotations

import json

import pytest

from negotiation.prompts import (
    SideView,
    decision,
    narrated_message,
    narration,
    statement,
    tidy_message,
    view_of,
    without_private,
)
from negotiation.rules import Game, Move
from negotiation.scenarios import Item, Scenario

SCENARIO = Scenario(Item("Battery 12V 100Ah", "automotive"), 1123.50, 898.80, 795.00)
SELLER = view_of(SCENARIO, "seller")
BUYER = view_of(SCENARIO, "buyer", "  a careful student ")


def test_a_view_holds_its_own_number_only() -> None:
    assert SELLER.reservation == 795.00 and BUYER.reservation == 898.80
    assert "898.8" not in repr(SELLER) and "795" not in repr(BUYER)
    assert BUYER.persona == "a careful student" and SELLER.counterpart == "buyer"


def test_narration_words_a_decided_move_without_any_private_number() -> None:
    game = Game(6, "seller", (Move(1, "seller", "offer", 1123.5, "It is a fine battery."),))
    prompt = json.dumps(narration(BUYER, game, "offer", 561.75))
    assert "$561.75" in prompt and "It is a fine battery." in prompt
    assert "898.8" not in prompt and "795" not in prompt
    assert "a careful student" in prompt


def test_decision_tells_the_side_its_own_number_and_the_reason_it_was_refused() -> None:
    prompt = json.dumps(decision(BUYER, Game(6, "seller"), refused="offers need a price"))
    assert "$898.80" in prompt and "795" not in prompt
    assert "offers need a price" in prompt and "turn 1 of 6" in prompt


@pytest.mark.parametrize(
    ("text", "view", "action", "price", "expected"),
    [
        # Says the price itself: kept as written.
        (
            "I can sell it to you for $959.25, and I'm ready to talk.",
            SELLER,
            "offer",
            959.25,
            "I can sell it to you for $959.25, and I'm ready to talk.",
        ),
        # Invents another price: dropped for the move said plainly.
        (
            "I'll help you get your 561.75 back!",
            SELLER,
            "offer",
            959.25,
            "I can sell it to you for $959.25.",
        ),
        # A product's figures ("12V") are not prices; no price given: the move is added.
        (
            "Great choice, this 12V battery lasts. Call me!",
            BUYER,
            "accept",
            795.0,
            "Great choice, this 12V battery lasts. I accept your price of $795.00.",
        ),
        # Nothing usable.
        ("", BUYER, "offer", 730.27, "I can pay $730.27."),
        # Talk about itself, and a sentence cut off by max_tokens: neither is kept.
        (
            "As an AI assistant I can't. Here is a sentence for you! I can pay $730.27 for the",
            BUYER,
            "offer",
            730.27,
            "I can pay $730.27.",
        ),
        # The sentence that gives the price wins over an earlier one that gives none.
        (
            "Lovely day. I can pay $730.27 for it!",
            BUYER,
            "offer",
            730.27,
            "I can pay $730.27 for it!",
        ),
        ('"That is $1,123.50, friend."', SELLER, "offer", 1123.5, "That is $1,123.50, friend."),
    ],
)
def test_a_narrated_message_always_says_the_move_and_no_other_price(
    text: str, view: SideView, action: str, price: float, expected: str
) -> None:
    assert narrated_message(text, view, action, price) == expected


def test_statements_and_tidying() -> None:
    assert statement(SELLER, "walk_away", None) == "I'll pass, thank you."
    assert statement(BUYER, "reject", None) == "No, thank you."
    assert tidy_message('  "Hello\n  there"  ') == "Hello there"
    assert len(tidy_message("x" * 1000)) == 400


def test_a_private_number_is_blanked_unless_it_is_the_offer() -> None:
    assert without_private("My budget is $898.80, so 600.", 898.80, 600.0) == (
        "My budget is [private], so 600."
    )
    assert without_private("I can go to 898.8 at most", 898.80, None) == (
        "I can go to [private] at most"
    )
    assert without_private("898.80 it is.", 898.80, 898.80) == "898.80 it is."
