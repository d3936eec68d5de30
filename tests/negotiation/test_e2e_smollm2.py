"""Negotiations on the real bundled SmolLM2-135M (llama-cpp-python's server, random port).

`narrated` against `narrated` over 20 mutual-interest products of the library: the strategy
decides, the model words it, so a deal is (almost) always reached, inside [cost, budget].
`llm` against `llm`: the model decides through structured output; a 135M model decides badly,
but every negotiation ends (deal or no deal, never failed), and refused moves are counted.
Every prompt a side's model was sent (stored as its `llm` session) lacks the other's number.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest

from llm.models import Message
from negotiation import scenarios, service
from negotiation.models import Move, Negotiation
from negotiation.schemas import NegotiationIn

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(600),
    pytest.mark.usefixtures("close_clients"),
]

MAX_TURNS = 6  # the paper's


def mutual_interest(count: int) -> list[int]:
    """The first `count` library products where a deal can profit both sides, spread over the
    library (every 40th), so several categories and price ranges are met."""
    found = [p.index for p in scenarios.products() if p.scenario().mutual_interest]
    return found[::40][:count]


async def run_all(indices: list[int], **sides: Any) -> list[Any]:
    """Run the negotiations two at a time (the model server answers one request at a time)."""
    gate = asyncio.Semaphore(2)

    async def one(index: int) -> Any:
        async with gate:
            run = await service.start(NegotiationIn(scenario=index, max_turns=MAX_TURNS, **sides))
            await run.done.wait()
            return run

    return list(await asyncio.gather(*(one(index) for index in indices)))


def assert_private(scenario: Any, moves: Any, sent: dict[str, list[str]]) -> None:
    """Neither side's number is in the other side's prompts, unless some side offered exactly that
    price (a strategy conceding to its reservation at its last move makes it public; the other
    side's own concession may land on the same cent)."""
    offered = {f"{move.price:,.2f}" for move in moves if move.action == "offer" and move.price}
    for secret, reader in ((scenario.buyer_budget, "seller"), (scenario.seller_cost, "buyer")):
        figure = f"{secret:,.2f}"
        if figure in offered:
            continue
        # The figure as a number of its own: $89.99 is not in $189.99.
        alone = re.compile(rf"(?<![\d,.]){re.escape(figure)}(?!\d)")
        assert not any(alone.search(prompt) for prompt in sent[reader]), (figure, sent[reader])


async def prompts_of(negotiation_id: str) -> dict[str, list[str]]:
    """What each side's model was sent, as its `llm` sessions stored it."""
    sent: dict[str, list[str]] = {"buyer": [], "seller": []}
    async for move in Move.objects.filter(negotiation_id=negotiation_id, session__isnull=False):
        async for message in Message.objects.filter(
            session_id=move.session_id, role__in=("system", "user")
        ):
            sent[move.side].append(message.content)
    return sent


async def test_narrated_sides_reach_deals_inside_the_zone(smollm2: str, settings: Any) -> None:
    settings.NEGOTIATION_MESSAGE_MAX_TOKENS = 40
    indices = mutual_interest(20)
    assert len(indices) == 20
    runs = await run_all(indices)
    deals = [run for run in runs if run.status == "deal"]
    failed = [(run.id, run.error) for run in runs if run.status == "failed"]
    assert not failed, failed
    assert len(deals) >= 19, [run.status for run in runs]
    for run in deals:
        scenario = run.record.scenario
        assert scenario.seller_cost <= run.metrics["price"] <= scenario.buyer_budget, run.metrics
        assert 0 <= run.metrics["buyer_profit"] <= 1 and 0 <= run.metrics["seller_profit"] <= 1
    # The words are the model's: every move has a message, and its session stored it.
    moves = [move async for move in Move.objects.filter(negotiation_id__in=[r.id for r in runs])]
    assert moves and all(move.message and move.session_id for move in moves)
    for run in runs:
        assert_private(run.record.scenario, run.game.moves, await prompts_of(run.id))


async def test_llm_sides_always_end_and_count_refused_moves(smollm2: str, settings: Any) -> None:
    settings.NEGOTIATION_MESSAGE_MAX_TOKENS = 48
    indices = mutual_interest(3)
    runs = await run_all(indices, buyer={"policy": "llm"}, seller={"policy": "llm"})
    assert {run.status for run in runs} <= {"deal", "no_deal"}, [(r.status, r.error) for r in runs]
    for run in runs:
        row = await Negotiation.objects.aget(pk=run.id)
        stored = [move async for move in row.moves.order_by("turn")]
        assert [move.turn for move in stored] == list(range(1, len(stored) + 1))
        invalid = [move for move in stored if move.invalid]
        assert row.metrics["invalid_moves"] == len(invalid)
        assert all(move.reason for move in invalid)  # each says which rule refused it
        assert row.metrics["turns"] == len(stored)
        # Both sides were told their own number, never the other's.
        sent = await prompts_of(run.id)
        if sent["buyer"]:  # the seller may walk away before the buyer's first move
            assert any(f"{row.buyer_budget:,.2f}" in p for p in sent["buyer"]), json.dumps(sent)[
                :500
            ]
        assert_private(run.record.scenario, run.game.moves, sent)
