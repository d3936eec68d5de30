"""Helpers for the negotiation face tests: open `/ws/negotiations/` on the real ASGI app, read its
frames (each checked for a leaked traceback, each read bounded), rebuild a negotiation from a
snapshot and the live frames after it, and read what the database stored.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from negotiation import service
from negotiator.asgi import application
from testkit.fake_upstream import FakeUpstream, Reply

PATH = "/ws/negotiations/"
LOCALHOST = [(b"origin", b"http://localhost")]
TIMEOUT = 5.0

# A custom scenario with room for a deal: cost 243.19 < budget 321.37.
CUSTOM: dict[str, Any] = {
    "item": {"title": "Road bike", "category": "sports"},
    "list_price": 400,
    "buyer_budget": 321.37,
    "seller_cost": 243.19,
}
# A price as prompts name it.
_PRICE = re.compile(r"\$[\d,]+\.\d{2}")
# The fields of the contract's move shape (stored moves also carry `reason`).
MOVE_FIELDS = ("turn", "side", "action", "price", "message", "invalid", "session_id")


async def open_socket(
    path: str = PATH, headers: list[tuple[bytes, bytes]] | None = None
) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(
        application, path, headers=LOCALHOST if headers is None else headers
    )
    connected, code = await comm.connect(timeout=TIMEOUT)
    assert connected, f"handshake refused ({code})"
    return comm


async def try_connect(path: str = PATH, headers: list[tuple[bytes, bytes]] | None = None) -> bool:
    comm = WebsocketCommunicator(
        application, path, headers=LOCALHOST if headers is None else headers
    )
    connected, _ = await comm.connect(timeout=TIMEOUT)
    await comm.disconnect(timeout=TIMEOUT)
    return bool(connected)


def parse(text: str) -> dict[str, Any]:
    assert "Traceback" not in text, text
    frame = json.loads(text)
    assert isinstance(frame, dict), text
    return frame


async def recv(comm: WebsocketCommunicator, timeout: float = TIMEOUT) -> dict[str, Any]:
    return parse(await comm.receive_from(timeout=timeout))


async def until(
    comm: WebsocketCommunicator, kinds: Iterable[str], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Frames up to and including the first whose type is one of `kinds`."""
    wanted = set(kinds)
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted} frame within {timeout} s; got {frames[-5:]}"
        frames.append(await recv(comm, timeout=left))
        if frames[-1]["type"] in wanted:
            return frames


async def until_end(comm: WebsocketCommunicator, timeout: float = 10.0) -> list[dict[str, Any]]:
    return await until(comm, ("end",), timeout)


async def start(comm: WebsocketCommunicator, **body: Any) -> dict[str, Any]:
    """Send a `start` frame; the first frame back (the `negotiation` snapshot)."""
    await comm.send_json_to({"type": "start", **body})
    first = await recv(comm)
    assert first["type"] == "negotiation", first
    return first


def move_of(data: dict[str, Any]) -> dict[str, Any]:
    """A move (from a frame, a snapshot or the database) in the contract's shape."""
    return {key: data[key] for key in MOVE_FIELDS}


@dataclass
class Rebuilt:
    """A negotiation as a client rebuilds it from one snapshot and the live frames after it."""

    moves: list[dict[str, Any]]
    live: dict[str, Any] | None  # the move being written: turn, side, text
    texts: dict[int, str] = field(default_factory=dict)  # each turn's live text, as it grew
    end: dict[str, Any] | None = None
    turns: list[dict[str, Any]] = field(default_factory=list)


def rebuild(snapshot: dict[str, Any], frames: list[dict[str, Any]]) -> Rebuilt:
    """Apply `frames` to `snapshot`, checking the order the contract promises on the way: a
    `turn` frame opens the next turn, its `token`s grow that turn's text, a `move` closes it,
    one `end` comes last; nothing names another negotiation."""
    negotiation_id = snapshot["negotiation_id"]
    state = Rebuilt([move_of(m) for m in snapshot["moves"]], snapshot.get("live"))
    if state.live is not None:
        state.live = dict(state.live)
        state.texts[state.live["turn"]] = state.live["text"]
    for frame in frames:
        assert frame.get("negotiation_id") == negotiation_id, frame
        assert state.end is None, f"a frame after the end: {frame}"
        kind = frame["type"]
        if kind == "turn":
            assert frame["turn"] == len(state.moves) + 1, (frame, len(state.moves))
            state.live = {"turn": frame["turn"], "side": frame["side"], "text": ""}
            state.texts[frame["turn"]] = ""
            state.turns.append(frame)
        elif kind == "token":
            assert state.live is not None, f"a token outside a turn: {frame}"
            assert (frame["turn"], frame["side"]) == (state.live["turn"], state.live["side"])
            state.live["text"] += frame["text"]
            state.texts[frame["turn"]] = state.live["text"]
        elif kind == "move":
            assert frame["turn"] == len(state.moves) + 1, (frame, len(state.moves))
            state.moves.append(move_of(frame))
            state.live = None
        elif kind == "end":
            state.end = frame
            state.live = None
        else:
            raise AssertionError(f"an unexpected frame: {frame}")
    return state


async def stored(negotiation_id: str) -> dict[str, Any]:
    """The negotiation as the database holds it (the API's shape, moves included)."""
    return await service.describe(negotiation_id)


def stored_moves(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [move_of(m) for m in data["moves"]]


async def wait_for(
    negotiation_id: str,
    condition: Any,
    timeout: float = 10.0,
    what: str = "the condition",
) -> dict[str, Any]:
    """Poll the stored negotiation until `condition(stored)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        data = await stored(negotiation_id)
        if condition(data):
            return data
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout} s: {data}"
        await asyncio.sleep(0.02)


async def wait_for_status(
    negotiation_id: str, *statuses: str, timeout: float = 10.0
) -> dict[str, Any]:
    return await wait_for(
        negotiation_id,
        lambda data: data["status"] in statuses,
        timeout,
        f"status in {statuses}",
    )


@database_sync_to_async
def session_messages(session_id: str) -> tuple[Any, list[tuple[str, str]]]:
    """An `llm` session and its messages (role, content), in order."""
    from llm.models import Message, Session

    session = Session.objects.get(pk=session_id)
    messages = list(
        Message.objects.filter(session=session).order_by("position").values_list("role", "content")
    )
    return session, messages


def echo_prices(upstream: FakeUpstream, delay: float = 0.0) -> None:
    """Make `upstream` word each move as its prompt decided it: "Fine by me, at $<price>." (the
    last price the prompt names), so a `narrated` side keeps that text whole as its message
    (one that does not give the move's price may get it added)."""
    answer = upstream._answer
    words = ["Fine", " by", " me", ",", " at"]

    async def echoing(request: Any, reader: Any, writer: Any) -> bool:
        if isinstance(request.body, dict) and not upstream.replies:
            prices = _PRICE.findall(request.body["messages"][-1]["content"])
            if prices:
                upstream.default = Reply(tokens=[*words, f" {prices[-1]}", "."], delay=delay)
        return await answer(request, reader, writer)

    setattr(upstream, "_answer", echoing)  # noqa: B010
