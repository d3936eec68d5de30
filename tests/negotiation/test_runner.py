"""The orchestrator end to end on the fake upstream: narrated sides to a deal, frames, storage."""

from __future__ import annotations

from typing import Any

import pytest

from negotiation import service
from negotiation.models import Negotiation
from negotiation.schemas import NegotiationIn
from testkit.fake_upstream import FakeUpstream, Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]

CUSTOM: dict[str, Any] = {
    "item": {"title": "Road bike", "category": "sports"},
    "list_price": 400,
    "buyer_budget": 321.37,
    "seller_cost": 243.19,
}


async def test_two_narrated_sides_reach_a_deal_inside_the_zone(upstream: FakeUpstream) -> None:
    upstream.default = Reply(tokens=["Sounds", " fair", "."])
    run = await service.start(NegotiationIn(**CUSTOM, max_turns=8))
    frames: list[dict[str, Any]] = []
    run.listen(frames.append)
    await run.done.wait()
    assert run.status == "deal", (run.status, run.error)
    price = run.metrics["price"]  # type: ignore[index]
    assert 243.19 <= price <= 321.37
    kinds = [f["type"] for f in frames]
    assert kinds[-1] == "end" and "move" in kinds and "token" in kinds
    row = await Negotiation.objects.aget(pk=run.id)
    assert row.status == "deal" and row.ended_by == "accept"
    assert await row.moves.acount() == len(run.game.moves)
    bodies = [str(r) for r in upstream.chat_requests]
    assert bodies
