"""What every face does with a negotiation: start, resume, move, cancel, read. One place, so the
HTTP API, the WebSocket, the CLI and the benchmark behave alike.

A negotiation runs on the process that started it. A move or a cancel that arrives on another
worker reaches it through the channel layer (the run's control group answers); when no process
answers, the stored row says why (over, not found, or its process is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db.models import Prefetch

from llm.broadcast import control_group
from llm.exceptions import InvalidRequest

from . import store
from .exceptions import NegotiationNotFound, NegotiationUnavailable
from .models import Move as MoveRow
from .models import Negotiation
from .policies import SideConfig
from .rules import GameOver, RuleViolation, Side
from .runner import KIND, Run, running, visible_scenario
from .scenarios import Product, Scenario, custom, from_library
from .schemas import NegotiationIn

__all__ = [
    "ANSWER_TIMEOUT",
    "cancel",
    "describe",
    "library_scenario",
    "move",
    "resume",
    "running_here",
    "scenario_of",
    "start",
]

logger = logging.getLogger("negotiation.service")

# How long a face waits for the process running a negotiation to answer a move or a cancel.
ANSWER_TIMEOUT = 10.0


def scenario_of(spec: NegotiationIn) -> Scenario:
    """The scenario a start request names: a library product, or its custom item and prices.

    `SCENARIO_NOT_FOUND` for an unknown library index; `INVALID_REQUEST` for what the schema lets
    through yet makes no scenario (a blank title, a budget_ratio that leaves a $0.00 budget)."""
    if spec.scenario is not None:
        if spec.budget_ratio is None:
            return from_library(spec.scenario)
        try:
            return from_library(spec.scenario, spec.budget_ratio)
        except ValueError as exc:
            raise InvalidRequest(f"budget_ratio: {exc}") from None
    assert spec.item is not None and spec.list_price is not None
    assert spec.buyer_budget is not None and spec.seller_cost is not None
    try:
        return custom(
            spec.item.title,
            spec.list_price,
            spec.buyer_budget,
            spec.seller_cost,
            category=spec.item.category,
        )
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]  # custom() names the field first
        raise InvalidRequest(f"{'item.' if field in ('title', 'category') else ''}{exc}") from None


def library_scenario(product: Product) -> dict[str, Any]:
    """A library product as `GET /api/v1/scenarios` shows it: its scenario with the default budget
    ratio (public library data: the budget and the cost included) and whether a deal can profit
    both sides."""
    scenario = product.scenario()
    return {**scenario.as_dict(private=True), "mutual_interest": scenario.mutual_interest}


async def start(spec: NegotiationIn) -> Run:
    """Store a new negotiation and run it in the background on this process."""
    scenario = scenario_of(spec)
    record = await store.create(
        scenario,
        SideConfig.from_dict(spec.buyer.model_dump()),
        SideConfig.from_dict(spec.seller.model_dump()),
        max_turns=spec.max_turns,
        opening=spec.opening,
    )
    run = Run(record)
    run.start()
    return run


async def resume(negotiation_id: str) -> Run:
    """Go on with an `interrupted` negotiation from its last stored move, on this process."""
    record = await store.claim_interrupted(negotiation_id)
    run = Run(record)
    run.start()
    return run


async def move(
    negotiation_id: str, side: Side | None, action: str, price: float | None, message: str
) -> dict[str, Any]:
    """A person's move, wherever the negotiation runs: the move as stored, or the refusal."""
    run = running_here(negotiation_id)
    if run is not None:
        return await run.submit(side, action, price, message)
    status = await _stored_status(negotiation_id)  # at once, not after ANSWER_TIMEOUT
    if status == Negotiation.Status.INTERRUPTED:
        raise GameOver("the negotiation was interrupted: resume it first (POST .../resume)")
    if status != Negotiation.Status.RUNNING:
        raise GameOver(f"the negotiation is over ({status})")
    command = {"side": side, "action": action, "price": price, "message": message}
    answer = await _ask(negotiation_id, f"{KIND}.move", command)
    if "error" in answer:
        raise _error(answer)
    result: dict[str, Any] = answer["move"]
    return result


async def cancel(negotiation_id: str) -> str:
    """Stop a running negotiation wherever it runs (or mark one whose process died); its status."""
    run = running_here(negotiation_id)
    if run is not None:
        if run.over:  # ended, its end being stored
            raise GameOver(f"the negotiation is over ({run.status})")
        await run.stop()
        return run.status
    if await _stored_status(negotiation_id) == Negotiation.Status.RUNNING:
        with contextlib.suppress(NegotiationUnavailable):
            answer = await _ask(negotiation_id, f"{KIND}.cancel", {})
            return str(answer["status"])
    # Nobody runs it: an interrupted one (or one whose process is gone) is cancelled here.
    return await _cancel_stored(negotiation_id)


def running_here(negotiation_id: str) -> Run | None:
    """The run of `negotiation_id` if it runs on this process (on this event loop)."""
    run = running(negotiation_id)
    return run if run is not None and run.on_this_loop() else None


async def _ask(negotiation_id: str, kind: str, command: dict[str, Any]) -> dict[str, Any]:
    """Send a command to the process running the negotiation and wait for its answer."""
    layer = get_channel_layer()
    if layer is None:
        raise await _why_unanswered(negotiation_id)
    try:
        reply_to = await layer.new_channel()
        await layer.group_send(
            control_group(negotiation_id, KIND), {"type": kind, "reply_to": reply_to, **command}
        )
        async with asyncio.timeout(ANSWER_TIMEOUT):
            answer: dict[str, Any] = await layer.receive(reply_to)
        return answer
    except TimeoutError:
        pass
    except Exception as exc:  # the layer is down (Redis): nobody can be reached
        logger.warning("negotiation %s: the channel layer failed (%s)", negotiation_id, exc)
    raise await _why_unanswered(negotiation_id)


@database_sync_to_async
def _stored_status(negotiation_id: str) -> str:
    """The stored status; `NEGOTIATION_NOT_FOUND` when there is no such negotiation."""
    status = Negotiation.objects.filter(pk=negotiation_id).values_list("status", flat=True).first()
    if status is None:
        raise NegotiationNotFound(f"Negotiation {negotiation_id} does not exist")
    return str(status)


@database_sync_to_async
def _why_unanswered(negotiation_id: str) -> Exception:
    row = Negotiation.objects.filter(pk=negotiation_id).only("status").first()
    if row is None:
        return NegotiationNotFound(f"Negotiation {negotiation_id} does not exist")
    if row.status != Negotiation.Status.RUNNING:
        return GameOver(f"the negotiation is over ({row.status})")
    return NegotiationUnavailable(
        "The process running this negotiation does not answer (it may have stopped, or the "
        "channel layer is down); try again, or resume it once it is marked interrupted."
    )


@database_sync_to_async
def _cancel_stored(negotiation_id: str) -> str:
    from django.utils import timezone

    row = Negotiation.objects.filter(pk=negotiation_id).first()
    if row is None:
        raise NegotiationNotFound(f"Negotiation {negotiation_id} does not exist")
    if row.status not in (Negotiation.Status.RUNNING, Negotiation.Status.INTERRUPTED):
        raise GameOver(f"the negotiation is over ({row.status})")
    Negotiation.objects.filter(pk=negotiation_id, status=row.status).update(
        status=Negotiation.Status.CANCELLED,
        ended_by=Negotiation.EndedBy.CANCEL,
        finished_at=timezone.now(),
    )
    return str(Negotiation.Status.CANCELLED)


def _error(answer: dict[str, Any]) -> Exception:
    """The error a remote run answered with, as the same class (by its code)."""
    from llm.exceptions import NegotiatorError

    from .rules import NotYourTurn

    code, message = answer["error"]["code"], answer["error"]["message"]
    for cls in (NotYourTurn, GameOver, RuleViolation):
        if cls.code == code:
            return cls(message)
    error = NegotiatorError(message)
    error.code, error.status = code, int(answer.get("status") or 500)
    return error


@database_sync_to_async
def describe(negotiation_id: str, *, with_moves: bool = True) -> dict[str, Any]:
    """A stored negotiation as the API shows it (a run under way here is shown as it stands)."""
    query = Negotiation.objects.filter(pk=negotiation_id)
    if with_moves:
        query = query.prefetch_related(
            Prefetch("moves", queryset=MoveRow.objects.order_by("turn"), to_attr="ordered")
        )
    row = query.first()
    if row is None:
        raise NegotiationNotFound(f"Negotiation {negotiation_id} does not exist")
    return row_as_dict(row, with_moves=with_moves)


def row_as_dict(row: Negotiation, *, with_moves: bool) -> dict[str, Any]:
    """The contract's negotiation shape from a stored row (moves prefetched as `ordered`)."""
    scenario = Scenario(
        store.Item(row.item_title, row.item_category),
        row.list_price,
        row.buyer_budget,
        row.seller_cost,
        row.scenario_index,
    )
    data: dict[str, Any] = {
        "id": str(row.pk),
        "status": row.status,
        "ended_by": row.ended_by or None,
        "scenario": visible_scenario(
            scenario,
            row.buyer_policy,
            row.seller_policy,
            over=row.status not in (Negotiation.Status.RUNNING, Negotiation.Status.INTERRUPTED),
        ),
        "buyer": SideConfig.from_dict(row.buyer).as_dict(),
        "seller": SideConfig.from_dict(row.seller).as_dict(),
        "max_turns": row.max_turns,
        "opening": row.opening,
        "metrics": row.metrics,
        "error": {"code": row.error_code, "message": row.error_message} if row.error_code else None,
        "created_at": row.created_at,
        "finished_at": row.finished_at,
    }
    if with_moves:
        data["moves"] = [
            {
                "turn": m.turn,
                "side": m.side,
                "action": m.action,
                "price": m.price,
                "message": m.message,
                "invalid": m.invalid,
                "reason": m.reason or None,
                "session_id": str(m.session_id) if m.session_id else None,
            }
            for m in row.ordered
        ]
    return data
