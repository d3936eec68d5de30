"""The orchestrator end to end on the fake upstream: narrated sides to a deal, frames, storage."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llm.broadcast import Broadcaster
from negotiation import runner, service
from negotiation.models import Negotiation
from negotiation.schemas import NegotiationIn
from testkit.fake_upstream import FakeUpstream, Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("no_run_left")]

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


async def ended_cancelled(run: Any) -> None:
    """The run stopped within a second: `cancelled`, stored so, and its `end` frame sent."""
    frames: list[dict[str, Any]] = []
    run.listen(frames.append)
    started = asyncio.get_running_loop().time()
    await run.stop(timeout=5)
    assert asyncio.get_running_loop().time() - started < 1.0
    assert run.done.is_set() and (run.status, run.ended_by) == ("cancelled", "cancel")
    assert [f["type"] for f in frames][-1:] == ["end"], frames
    row = await Negotiation.objects.aget(pk=run.id)
    assert (row.status, row.ended_by) == ("cancelled", "cancel")


async def test_a_cancel_before_the_run_takes_its_first_step_still_ends_it(
    upstream: FakeUpstream,
) -> None:
    # service.start returns with the task created, not yet run: a task cancelled then never runs
    # its coroutine, and the negotiation stayed `running` with nothing sent.
    run = await service.start(NegotiationIn(**CUSTOM, max_turns=8))
    await ended_cancelled(run)
    assert upstream.chat_requests == []


async def test_a_cancel_while_the_run_joins_the_channel_layer_still_ends_it(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With Redis, joining the layer is a round trip; a cancel landing in it (CI saw one) must end
    # the negotiation like any other.
    joining = asyncio.Event()

    async def slow_start(self: Broadcaster) -> None:
        joining.set()
        await asyncio.sleep(30)

    monkeypatch.setattr(Broadcaster, "start", slow_start)
    run = await service.start(NegotiationIn(**CUSTOM, max_turns=8))
    await asyncio.wait_for(joining.wait(), 5)
    await ended_cancelled(run)


async def test_stopping_the_server_leaves_runs_of_other_event_loops_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server has one loop; a run of another (a test's leftover) cannot be awaited from this one,
    # and waiting for it once made an ASGI lifespan shutdown overrun its 5 s (CI).
    other = asyncio.new_event_loop()
    task = other.create_future()  # what the check reads of a run's task: its loop

    async def never(**_: Any) -> None:
        raise AssertionError("a run of another loop was stopped")

    elsewhere = runner.Run.__new__(runner.Run)  # a run as far as stopping it reads one
    elsewhere._task = task  # type: ignore[assignment]
    elsewhere.stop = never  # type: ignore[method-assign]
    monkeypatch.setitem(runner._runs, "elsewhere", elsewhere)
    try:
        assert await runner.stop_all(timeout=5) == 0
    finally:
        other.close()
