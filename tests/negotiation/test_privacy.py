"""The budget never reaches the seller's prompt, the cost never the buyer's: the exact request
bodies sent upstream over whole negotiations are read, for every policy that asks a model."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from negotiation import service
from negotiation.schemas import NegotiationIn
from testkit.fake_upstream import FakeUpstream, Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("no_run_left")]

# Figures no other number of the scenario can produce by chance.
BUDGET, COST = 777.77, 333.33
SCENARIO: dict[str, Any] = {
    "item": {"title": "Walnut writing desk", "category": "home"},
    "list_price": 1000,
    "buyer_budget": BUDGET,
    "seller_cost": COST,
}


def forms(value: float) -> list[str]:
    """Every way a prompt could spell `value` ("777.77", "$777.77", "777,77")."""
    whole, cents = f"{value:.2f}".split(".")
    return [f"{whole}.{cents}", f"{whole},{cents}", f"{value:g}"]


def side_of(body: dict[str, Any]) -> str:
    system = body["messages"][0]["content"]
    match = re.search(r"You are (?:the|a) (buyer|seller)", system)
    assert match, system
    return match.group(1)


def leaks(bodies: list[dict[str, Any]]) -> list[str]:
    """Each place a side's request carries the other side's number."""
    found = []
    for body in bodies:
        side = side_of(body)
        secret = COST if side == "buyer" else BUDGET
        text = json.dumps(body, ensure_ascii=False)
        found += [f"{side} request holds {form}" for form in forms(secret) if form in text]
    return found


async def play(upstream: FakeUpstream, **sides: Any) -> Any:
    run = await service.start(NegotiationIn(**SCENARIO, **sides))
    await run.done.wait()
    return run


async def test_narrated_sides_never_see_the_other_number(upstream: FakeUpstream) -> None:
    upstream.default = Reply(tokens=["That", " works", " for", " me."])
    run = await play(upstream, max_turns=10)
    assert run.status == "deal", run.status
    bodies = [request.body for request in upstream.chat_requests]
    assert {side_of(body) for body in bodies} == {"buyer", "seller"}
    assert len(bodies) == len(run.game.moves)
    assert not leaks(bodies), leaks(bodies)
    # The narrating model is not told even its own number: it words a decided move.
    for body in bodies:
        own = BUDGET if side_of(body) == "buyer" else COST
        assert not any(form in json.dumps(body) for form in forms(own)), body


def decision(message: str, action: str, price: float) -> Reply:
    text = json.dumps({"message": message, "action": action, "price": price})
    return Reply(tokens=[text[i : i + 7] for i in range(0, len(text), 7)])


async def test_llm_sides_see_only_their_own_number_even_when_the_other_blurts_it(
    upstream: FakeUpstream,
) -> None:
    """The buyer's model says its budget out loud: its message reaches the seller blanked."""
    upstream.replies.extend(
        [
            decision("Lovely desk, 950 and it is yours.", "offer", 950),  # seller, turn 1
            decision(f"My budget is ${BUDGET}, so I offer 500.", "offer", 500),  # buyer, 2
            decision("I can come down to 800.", "offer", 800),  # seller, 3
            decision(f"Honestly, {BUDGET:.2f} is my limit. 600?", "offer", 600),  # buyer, 4
            decision("Fine, 600 it is.", "accept", 600),  # seller, 5
        ]
    )
    run = await play(upstream, buyer={"policy": "llm"}, seller={"policy": "llm"}, max_turns=6)
    assert run.status == "deal" and run.metrics["price"] == 600, (run.status, run.error)
    bodies = [request.body for request in upstream.chat_requests]
    assert len(bodies) == 5
    # Each side was told its own number (the llm policy decides with it) and never the other's.
    for body in bodies:
        own = BUDGET if side_of(body) == "buyer" else COST
        assert any(form in json.dumps(body) for form in forms(own)), body
    assert not leaks(bodies), leaks(bodies)
    said = [move.message for move in run.game.moves if move.side == "buyer"]
    assert said == [
        "My budget is [private], so I offer 500.",
        "Honestly, [private] is my limit. 600?",
    ]


async def test_a_person_playing_one_side_is_never_shown_the_models_number(
    upstream: FakeUpstream,
) -> None:
    """Against a person the other side's number is hidden in everything shown while it runs."""
    upstream.default = Reply(tokens=["Make", " me", " an", " offer."])
    spec = NegotiationIn.model_validate({**SCENARIO, "buyer": {"policy": "human"}, "max_turns": 4})
    run = await service.start(spec)
    snapshot = run.snapshot()["frame"]
    assert snapshot["scenario"]["seller_cost"] is None
    assert snapshot["scenario"]["buyer_budget"] == BUDGET  # the person's own number
    stored = await service.describe(run.id)
    assert stored["scenario"]["seller_cost"] is None
    await run.stop()
    final = await service.describe(run.id)
    assert final["status"] == "cancelled" and final["scenario"]["seller_cost"] == COST
