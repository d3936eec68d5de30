"""Persistence of negotiations: created, each move stored when it is made, finished, recovered.

Writes go through `database_sync_to_async` (the one thread async code reaches the ORM by), a
handful per move: never per token. A running negotiation's process marks it alive every
`HEARTBEAT` seconds (one write for all of them), so `recover_interrupted()` at start-up tells a
dead process's negotiations (`interrupted`, resumable) from live ones, as `llm` does for sessions.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.db import transaction
from django.utils import timezone

from llm import PerLoop, worker_alive, worker_id

from .exceptions import NegotiationNotFound
from .models import Move as MoveRow
from .models import Negotiation
from .policies import SideConfig
from .rules import GameOver, Move, Side, replay
from .scenarios import Item, Scenario

__all__ = [
    "HEARTBEAT",
    "Record",
    "claim_interrupted",
    "create",
    "finish",
    "heartbeat",
    "recover_interrupted",
    "store_move",
]

logger = logging.getLogger("negotiation.store")

# A running negotiation whose process has not said it is alive for this long is taken for dead.
STALE_AFTER = timedelta(seconds=60)
HEARTBEAT = 20.0


@dataclass(frozen=True, slots=True)
class Record:
    """What a runner needs of a stored negotiation (a new one, or one resumed)."""

    id: str
    scenario: Scenario
    buyer: SideConfig
    seller: SideConfig
    max_turns: int
    opening: Side
    moves: tuple[Move, ...]
    tokens: int
    created_at: float

    def config(self, side: Side) -> SideConfig:
        return self.buyer if side == "buyer" else self.seller


def _record(row: Negotiation, moves: list[MoveRow]) -> Record:
    scenario = Scenario(
        Item(row.item_title, row.item_category),
        row.list_price,
        row.buyer_budget,
        row.seller_cost,
        row.scenario_index,
    )
    stored = tuple(
        Move(
            m.turn,
            m.side,
            m.action,
            m.price,
            m.message,
            m.invalid,
            str(m.session_id) if m.session_id else None,
        )
        for m in moves
    )
    return Record(
        id=str(row.pk),
        scenario=scenario,
        buyer=SideConfig.from_dict(row.buyer),
        seller=SideConfig.from_dict(row.seller),
        max_turns=row.max_turns,
        opening=row.opening,
        moves=stored,
        tokens=sum(m.tokens for m in moves),
        created_at=row.created_at.timestamp(),
    )


@database_sync_to_async
def create(
    scenario: Scenario, buyer: SideConfig, seller: SideConfig, *, max_turns: int, opening: Side
) -> Record:
    now = timezone.now()
    row = Negotiation.objects.create(
        scenario_index=scenario.index,
        item_title=scenario.item.title,
        item_category=scenario.item.category,
        list_price=scenario.list_price,
        buyer_budget=scenario.buyer_budget,
        seller_cost=scenario.seller_cost,
        buyer=buyer.as_dict(),
        seller=seller.as_dict(),
        buyer_policy=buyer.policy,
        seller_policy=seller.policy,
        max_turns=max_turns,
        opening=opening,
        worker=worker_id(),
        created_at=now,
        updated_at=now,
    )
    return _record(row, [])


@database_sync_to_async
def store_move(negotiation_id: str, move: Move, *, reason: str = "", tokens: int = 0) -> None:
    now = timezone.now()
    with transaction.atomic():
        MoveRow.objects.create(
            negotiation_id=negotiation_id,
            turn=move.turn,
            side=move.side,
            action=move.action,
            price=move.price,
            message=move.message,
            invalid=move.invalid,
            reason=reason,
            session_id=move.session_id,
            tokens=tokens,
            created_at=now,
        )
        Negotiation.objects.filter(pk=negotiation_id).update(updated_at=now)


@database_sync_to_async
def finish(
    negotiation_id: str,
    *,
    status: str,
    ended_by: str,
    metrics: dict[str, Any] | None,
    error_code: str = "",
    error_message: str = "",
    finished_at: float,
) -> None:
    Negotiation.objects.filter(pk=negotiation_id).update(
        status=status,
        ended_by=ended_by,
        metrics=metrics,
        error_code=error_code,
        error_message=error_message,
        finished_at=datetime.fromtimestamp(finished_at, tz=UTC),
        updated_at=timezone.now(),
    )


@database_sync_to_async
def claim_interrupted(negotiation_id: str) -> Record:
    """Take an `interrupted` negotiation back to `running` on this process, with its moves."""
    with transaction.atomic():
        claimed = Negotiation.objects.filter(
            pk=negotiation_id, status=Negotiation.Status.INTERRUPTED
        ).update(
            status=Negotiation.Status.RUNNING,
            ended_by="",
            error_code="",
            error_message="",
            finished_at=None,
            metrics=None,
            worker=worker_id(),
            updated_at=timezone.now(),
        )
        row = Negotiation.objects.filter(pk=negotiation_id).first()
        if row is None:
            raise NegotiationNotFound(f"Negotiation {negotiation_id} does not exist")
        if not claimed:
            raise GameOver(
                f"only an interrupted negotiation can be resumed; this one is {row.status}"
            )
        moves = list(row.moves.order_by("turn"))
    record = _record(row, moves)
    replay(record.moves, max_turns=record.max_turns, opening=record.opening)  # still a valid game
    return record


def recover_interrupted() -> int:
    """Mark `interrupted` the negotiations left `running` by a dead process (run at start-up)."""
    running = Negotiation.objects.filter(status=Negotiation.Status.RUNNING)
    stale_before = timezone.now() - STALE_AFTER
    dead = [
        pk
        for pk, worker, updated in running.values_list("pk", "worker", "updated_at")
        if updated < stale_before or not worker_alive(worker)
    ]
    if not dead:
        return 0
    count = Negotiation.objects.filter(pk__in=dead, status=Negotiation.Status.RUNNING).update(
        status=Negotiation.Status.INTERRUPTED,
        ended_by=Negotiation.EndedBy.RESTART,
        error_code="INTERRUPTED",
        error_message=(
            "The server stopped while this negotiation ran; its moves are kept. "
            "POST .../resume goes on from the last one."
        ),
        finished_at=timezone.now(),
    )
    logger.warning("marked %d negotiation(s) left running by a dead process as interrupted", count)
    return count


class Heartbeat:
    """Marks this event loop's running negotiations alive, all in one write every HEARTBEAT s."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def track(self, negotiation_id: str) -> None:
        self._ids.add(negotiation_id)
        if self._task is None or self._task.done():
            # A context of its own: not the thread of the request that happened to start it.
            self._task = asyncio.create_task(self._run(), context=contextvars.Context())

    def untrack(self, negotiation_id: str) -> None:
        self._ids.discard(negotiation_id)
        if not self._ids and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while self._ids:
            await asyncio.sleep(HEARTBEAT)
            try:
                await _touch(list(self._ids))
            except Exception:
                logger.exception("marking %d negotiations alive failed", len(self._ids))


@database_sync_to_async
def _touch(ids: list[str]) -> None:
    Negotiation.objects.filter(pk__in=ids, status=Negotiation.Status.RUNNING).update(
        updated_at=timezone.now()
    )


_heartbeats = PerLoop(Heartbeat)


def heartbeat() -> Heartbeat:
    return _heartbeats.get()
