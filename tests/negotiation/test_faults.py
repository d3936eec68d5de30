"""Faults of the negotiation engine, in one process on real-socket fake upstreams: an upstream
dying mid-move, a refusing one with a fallback provider, the `llm` session behind every move,
start-up recovery of a dead worker's negotiations, resuming an interrupted one, and commands that
reach a run through the channel layer (as from another worker).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from django.utils import timezone

from llm import worker_id
from negotiation import service, store
from negotiation.models import Move as MoveRow
from negotiation.models import Negotiation
from negotiation.policies.human import HumanPolicy
from negotiation.rules import GameOver, Move
from negotiation.runner import Run
from negotiation.schemas import NegotiationIn, SideIn
from testkit.fake_upstream import FakeUpstream, Reply
from tests.negotiation.ws import (
    CUSTOM,
    open_socket,
    rebuild,
    recv,
    session_messages,
    start,
    stored,
    stored_moves,
    until_end,
    wait_for,
    wait_for_status,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("no_run_left"),
]

FINE = ["Fine", " by", " me."]
SLOW = Reply(tokens=[f" t{i}" for i in range(300)], delay=0.03)  # 9 s a move, unless stopped


@pytest.fixture
async def second() -> AsyncIterator[FakeUpstream]:
    """Another fake upstream (the fallback provider)."""
    fake = FakeUpstream(Reply(tokens=FINE, model="backup-model"))
    await fake.start()
    yield fake
    await fake.stop()


def only(upstream: FakeUpstream, llm_config: Callable[..., Any], **options: Any) -> None:
    """The settings with lm_studio at `upstream` (llm_config starts again from its defaults)."""
    llm_config(lm_studio={"base_url": upstream.base_url, "default_model": ""}, **options)


async def play(**body: Any) -> Run:
    run = await service.start(NegotiationIn(**{**CUSTOM, **body}))
    async with asyncio.timeout(15):
        await run.done.wait()
    return run


# An upstream failing ------------------------------------------------------------------------


async def test_an_upstream_dying_mid_move_fails_the_negotiation_and_keeps_earlier_moves(
    upstream: FakeUpstream, llm_config: Callable[..., Any]
) -> None:
    only(upstream, llm_config, max_retries=0)
    upstream.replies.extend(
        [
            Reply(tokens=FINE),
            Reply(tokens=FINE),
            Reply(tokens=["I", " can", " do", "..."], cut_after=2),
        ]
    )
    comm = await open_socket()
    snapshot = await start(comm, **CUSTOM)
    negotiation_id = snapshot["negotiation_id"]
    frames = await until_end(comm)
    end = frames[-1]
    assert (end["status"], end["ended_by"]) == ("failed", "error"), end
    assert end["error"]["code"] == "LLM_BAD_GATEWAY", end
    assert end["metrics"]["deal"] is False and end["metrics"]["turns"] == 2
    state = rebuild(snapshot, frames)
    assert state.texts[3] == "I can", "the third move's text streamed before the cut"
    assert [m["turn"] for m in state.moves] == [1, 2]

    data = await wait_for_status(negotiation_id, "failed")
    assert data["ended_by"] == "error" and data["error"]["code"] == "LLM_BAD_GATEWAY"
    assert data["error"]["message"]
    assert stored_moves(data) == state.moves  # the two earlier moves, nothing of the third
    assert data["finished_at"] is not None
    # A watcher now gets the final snapshot: both moves and the error.
    late = await open_socket()
    await late.send_json_to({"type": "watch", "negotiation_id": negotiation_id})
    final = await recv(late)
    assert final["status"] == "failed" and final["error"]["code"] == "LLM_BAD_GATEWAY"
    assert [m["turn"] for m in final["moves"]] == [1, 2]
    assert final["moves"] == data["moves"]
    # The cut generation is stored as its own failed llm session.
    assert len(upstream.chat_requests) == 3
    await comm.disconnect()
    await late.disconnect()


async def test_a_refusing_upstream_falls_back_on_every_move(
    upstream: FakeUpstream, second: FakeUpstream, llm_config: Callable[..., Any]
) -> None:
    upstream.default = Reply(status=503)
    llm_config(
        fallbacks=["openrouter"],
        max_retries=0,
        lm_studio={"base_url": upstream.base_url, "default_model": ""},
        openrouter={"base_url": second.base_url, "default_model": "backup-model"},
    )
    run = await play(max_turns=6)
    assert run.status == "deal", (run.status, run.error)
    data = await stored(run.id)
    moves = data["moves"]
    assert len(moves) >= 2
    # Fallback is decided per move: each asked the primary first, then the fallback served it.
    assert len(upstream.chat_requests) == len(moves) == len(second.chat_requests)
    for move in moves:
        session, messages = await session_messages(move["session_id"])
        assert (session.provider, session.status) == ("openrouter", "completed"), move
        assert session.tried == [{"provider": "lm_studio", "code": "LLM_UNAVAILABLE"}]
        assert messages[-1] == ("assistant", "Fine by me.")


# The llm session behind every move -------------------------------------------------------


@sync_to_async
def move_rows(negotiation_id: str) -> list[MoveRow]:
    return list(MoveRow.objects.filter(negotiation_id=negotiation_id).order_by("turn"))


async def test_every_model_move_links_to_its_llm_session_with_prompt_and_reply(
    upstream: FakeUpstream,
) -> None:
    upstream.default = Reply(tokens=FINE)
    run = await play(max_turns=8)
    assert run.status == "deal"
    data = await stored(run.id)
    rows = await move_rows(run.id)
    assert [str(r.session_id) for r in rows] == [m["session_id"] for m in data["moves"]]
    sent = [r.body["messages"] for r in upstream.chat_requests]
    assert len(sent) == len(rows)
    for row, prompt in zip(rows, sent, strict=True):
        assert row.session_id is not None, row
        session, messages = await session_messages(str(row.session_id))
        assert session.status == "completed" and session.provider == "lm_studio"
        # The prompt exactly as sent upstream, then the reply the move's message came from.
        assert messages[:-1] == [(m["role"], m["content"]) for m in prompt], row
        assert messages[-1] == ("assistant", "Fine by me.") and row.message.startswith("Fine")
        assert row.tokens > 0
        # Neither side's prompt holds the other side's private number.
        text = " ".join(m["content"] for m in prompt)
        assert ("243.19" if row.side == "buyer" else "321.37") not in text, (row.side, text)
    assert len({r.session_id for r in rows}) == len(rows), "two moves share a session"
    assert data["metrics"]["tokens"] == sum(r.tokens for r in rows)


# Start-up recovery and resume ------------------------------------------------------------


@sync_to_async
def running_row(worker: str, updated_ago: float = 0) -> str:
    now = timezone.now()
    row = Negotiation.objects.create(
        item_title="Lamp",
        list_price=100,
        buyer_budget=80,
        seller_cost=50,
        buyer={"policy": "narrated"},
        seller={"policy": "narrated"},
        buyer_policy="narrated",
        seller_policy="narrated",
        worker=worker,
        created_at=now,
        updated_at=now - timedelta(seconds=updated_ago),
    )
    return str(row.pk)


async def test_recovery_marks_a_dead_workers_negotiations_interrupted_and_leaves_live_ones(
    upstream: FakeUpstream,
) -> None:
    dead = await running_row(f"{socket.gethostname()}:{os.getpid()}:an-earlier-start")
    gone = await running_row(f"{socket.gethostname()}:999999999:boot")  # no such pid
    stale = await running_row(worker_id(), updated_ago=3600)  # alive, but silent for an hour
    live = await running_row(worker_id())
    elsewhere = await running_row("another-host:1:boot")  # another host: only staleness tells
    assert await sync_to_async(store.recover_interrupted)() == 3
    for negotiation_id in (dead, gone, stale):
        data = await stored(negotiation_id)
        assert (data["status"], data["ended_by"]) == ("interrupted", "restart"), data
        assert data["error"]["code"] == "INTERRUPTED" and data["finished_at"] is not None
    for negotiation_id in (live, elsewhere):
        data = await stored(negotiation_id)
        assert (data["status"], data["ended_by"]) == ("running", None), data
    assert await sync_to_async(store.recover_interrupted)() == 0  # nothing twice


async def interrupted_after_two_moves(upstream: FakeUpstream) -> tuple[str, list[Any]]:
    """A negotiation stopped as a server stopping stops it, while its third move is written."""
    upstream.replies.extend([Reply(tokens=FINE), Reply(tokens=FINE)])
    upstream.default = SLOW
    run = await service.start(NegotiationIn(**CUSTOM, max_turns=10))
    tokens: list[dict[str, Any]] = []
    run.listen(lambda frame: tokens.append(frame) if frame["type"] == "token" else None)
    async with asyncio.timeout(10):
        while not any(t["turn"] == 3 for t in tokens):
            await asyncio.sleep(0.01)
    await run.stop(as_restart=True)
    assert (run.status, run.ended_by) == ("interrupted", "restart")
    data = await wait_for_status(run.id, "interrupted")
    assert [m["turn"] for m in data["moves"]] == [1, 2]
    return run.id, data["moves"]


async def test_resume_goes_on_from_the_last_stored_move_and_finishes(
    upstream: FakeUpstream,
) -> None:
    negotiation_id, before = await interrupted_after_two_moves(upstream)
    upstream.default = Reply(tokens=FINE)
    requests = len(upstream.chat_requests)
    run = await service.resume(negotiation_id)
    frames: list[dict[str, Any]] = []
    run.listen(frames.append)
    assert (await stored(negotiation_id))["status"] == "running"
    async with asyncio.timeout(15):
        await run.done.wait()
    assert run.status == "deal", (run.status, run.error)
    data = await wait_for_status(negotiation_id, "deal")
    moves = data["moves"]
    assert moves[:2] == before, "a stored move changed"
    assert [m["turn"] for m in moves] == list(range(1, len(moves) + 1)), "a turn lost or doubled"
    assert next(f["turn"] for f in frames if f["type"] == "turn") == 3
    assert [f["turn"] for f in frames if f["type"] == "move"] == [m["turn"] for m in moves[2:]]
    assert data["metrics"]["turns"] == len(moves) and data["metrics"]["deal"] is True
    assert data["error"] is None and data["ended_by"] == "accept"
    rows = await move_rows(negotiation_id)
    assert data["metrics"]["tokens"] == sum(r.tokens for r in rows) > 0
    # The third move's prompt (after the restart) quotes the buyer's stored move.
    third = upstream.chat_requests[requests].body["messages"][-1]["content"]
    assert before[1]["message"] in third, third
    assert len(upstream.chat_requests) - requests == len(moves) - 2


async def test_resume_of_a_negotiation_killed_after_its_last_move_only_stores_its_end(
    upstream: FakeUpstream,
) -> None:
    """Killed between storing the accepting move and storing the end: resumed, it ends at once
    with the deal its moves made, asking no model anything."""
    negotiation_id = await running_row(f"{socket.gethostname()}:{os.getpid()}:an-earlier-start")
    await store.store_move(negotiation_id, Move(1, "seller", "offer", 90.0, "Ninety.", False))
    await store.store_move(negotiation_id, Move(2, "buyer", "accept", 90.0, "Deal.", False))
    assert await sync_to_async(store.recover_interrupted)() == 1
    run = await service.resume(negotiation_id)
    async with asyncio.timeout(5):
        await run.done.wait()
    data = await stored(negotiation_id)
    assert (data["status"], data["ended_by"], data["error"]) == ("deal", "accept", None), data
    assert data["metrics"]["price"] == 90.0 and data["metrics"]["turns"] == 2
    assert [m["turn"] for m in data["moves"]] == [1, 2]
    assert upstream.chat_requests == []


async def test_an_interrupted_negotiation_can_be_cancelled_instead_of_resumed(
    upstream: FakeUpstream,
) -> None:
    negotiation_id, before = await interrupted_after_two_moves(upstream)
    assert await service.cancel(negotiation_id) == "cancelled"
    data = await stored(negotiation_id)
    assert (data["status"], data["ended_by"]) == ("cancelled", "cancel")
    assert data["moves"] == before
    with pytest.raises(GameOver):
        await service.resume(negotiation_id)


async def test_resume_refuses_anything_but_an_interrupted_negotiation(
    upstream: FakeUpstream,
) -> None:
    upstream.default = Reply(tokens=FINE)
    finished = await play()
    with pytest.raises(GameOver) as over:
        await service.resume(finished.id)
    assert over.value.code == "NEGOTIATION_OVER" and "deal" in over.value.message
    assert (await stored(finished.id))["status"] == "deal"
    # Over HTTP: 409, and 404 for an unknown one.
    client = AsyncClient()
    response = await client.post(f"/api/v1/negotiations/{finished.id}/resume")
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "NEGOTIATION_OVER"
    response = await client.post(f"/api/v1/negotiations/{uuid.uuid4()}/resume")
    assert response.status_code == 404, response.content
    assert response.json()["error"]["code"] == "NEGOTIATION_NOT_FOUND"
    # A running one is not resumed a second time.
    upstream.default = SLOW
    running = await service.start(NegotiationIn(**CUSTOM))
    with pytest.raises(GameOver):
        await service.resume(running.id)
    await running.stop()
    assert running.status == "cancelled"


# Commands through the channel layer (another worker's) ----------------------------------


async def test_a_cancel_through_the_channel_layer_is_answered_when_the_run_has_stopped(
    upstream: FakeUpstream,
) -> None:
    """What a cancel sent to another worker does: the run stops, and that worker is told so at
    once (its client is not left waiting ANSWER_TIMEOUT for a wrong NEGOTIATION_OVER)."""
    upstream.default = SLOW
    run = await service.start(NegotiationIn(**CUSTOM))
    await wait_for(run.id, lambda data: run.live is not None and run.live["text"], what="a token")
    asked = time.monotonic()
    answer = await service._ask(run.id, "negotiation.cancel", {})
    elapsed = time.monotonic() - asked
    assert answer == {"type": "negotiation.answer", "status": "cancelled"}
    assert elapsed < 1.0, f"answered after {elapsed:.2f} s"
    assert run.done.is_set() and run.status == "cancelled"
    assert (await stored(run.id))["status"] == "cancelled"  # stored before the answer
    assert await upstream.wait_for_disconnects(1, timeout=1.0)


async def test_a_deal_making_move_through_the_channel_layer_is_answered(
    upstream: FakeUpstream,
) -> None:
    upstream.default = Reply(tokens=FINE)
    run = await service.start(NegotiationIn(**CUSTOM, buyer=SideIn(policy="human")))
    person = run.policies["buyer"]
    assert isinstance(person, HumanPolicy)
    await wait_for(run.id, lambda data: len(data["moves"]) == 1, what="the seller's opening")
    await wait_for(run.id, lambda data: person.waiting, what="the buyer's turn")
    refused = await service._ask(
        run.id, "negotiation.move", {"action": "accept", "price": 1.0, "message": ""}
    )
    assert refused["error"]["code"] == "INVALID_MOVE" and refused["status"] == 422, refused
    await wait_for(run.id, lambda data: person.waiting, what="asked again")
    answer = await service._ask(
        run.id, "negotiation.move", {"action": "accept", "price": 400.0, "message": "Deal."}
    )
    assert answer["move"]["action"] == "accept" and answer["move"]["price"] == 400.0, answer
    async with asyncio.timeout(5):
        await run.done.wait()
    assert run.status == "deal"
