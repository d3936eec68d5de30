"""`/ws/negotiations/` through the served ASGI `application` against a real-socket fake upstream:
the frame sequence of `start`, watching mid-negotiation and after the end, a negotiation that
outlives its socket, `cancel` (within 1 s, the upstream request closed), bad input answered with
its contract code on a socket that stays usable, several negotiations on one socket, and who may
open the socket and how often it may start.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator

from negotiator.asgi import application
from testkit.fake_upstream import FakeUpstream, Reply
from tests.negotiation.ws import (
    CUSTOM,
    PATH,
    echo_prices,
    open_socket,
    rebuild,
    recv,
    start,
    stored_moves,
    try_connect,
    until,
    until_end,
    wait_for_status,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(60),
    pytest.mark.usefixtures("no_run_left"),
]

FINE = ["Fine", " by", " me."]
# Seven frames a move (turn, five tokens, move) 20 ms a token; watching uses ws.echo_prices
# (nine frames a move).
SLOW_TOKENS = ["Fine", " by", " me", ",", " friend."]


def origin(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"origin", value.encode())]


async def run_to_end(comm: WebsocketCommunicator, **body: Any) -> tuple[dict[str, Any], list[Any]]:
    """Start a negotiation on `comm` and read it to its end: (snapshot, frames after it)."""
    snapshot = await start(comm, **{**CUSTOM, **body})
    frames = await until_end(comm)
    return snapshot, frames


async def usable(comm: WebsocketCommunicator) -> None:
    """The socket still plays a whole negotiation (two moves: the seller's only offer is its
    cost, which the buyer accepts)."""
    snapshot, frames = await run_to_end(comm, max_turns=2)
    assert frames[-1]["type"] == "end" and frames[-1]["status"] == "deal", frames[-1]
    assert frames[-1]["negotiation_id"] == snapshot["negotiation_id"]


async def error_after(comm: WebsocketCommunicator, timeout: float = 5.0) -> dict[str, Any]:
    """The next `error` frame (a command naming a negotiation also follows it, so its snapshot
    may come first)."""
    frames = await until(comm, ("error",), timeout)
    assert {f["type"] for f in frames[:-1]} <= {"negotiation", "turn", "token", "move"}, frames
    return frames[-1]


# The frames of a negotiation ----------------------------------------------------------------


async def test_start_streams_snapshot_then_turns_tokens_moves_and_exactly_one_end(
    upstream: FakeUpstream,
) -> None:
    echo_prices(upstream)
    comm = await open_socket()
    snapshot, frames = await run_to_end(comm, max_turns=8)
    negotiation_id = snapshot["negotiation_id"]
    uuid.UUID(negotiation_id)
    assert snapshot["id"] == negotiation_id and snapshot["status"] == "running"
    assert snapshot["scenario"]["seller_cost"] == 243.19  # no human side: spectators see both
    assert snapshot["buyer"]["policy"] == snapshot["seller"]["policy"] == "narrated"
    assert await comm.receive_nothing(timeout=0.3), "a frame after the end"

    state = rebuild(snapshot, frames)  # checks the order and every frame's negotiation_id
    kinds = [f["type"] for f in frames]
    assert kinds.count("end") == 1 and kinds[-1] == "end"
    assert {"turn", "token", "move"} <= set(kinds)

    data = await wait_for_status(negotiation_id, "deal")
    assert data["ended_by"] == "accept"
    assert state.moves == stored_moves(data)
    assert state.end is not None
    assert state.end["status"] == "deal" and state.end["ended_by"] == "accept"
    assert state.end["metrics"] == data["metrics"]
    assert state.end["metrics"]["price"] == state.moves[-1]["price"]
    assert state.end["metrics"]["turns"] == len(state.moves)
    # Every turn's token texts, concatenated, are the message stored for it.
    assert state.texts, "no token frame"
    for turn, text in state.texts.items():
        move = state.moves[turn - 1]
        assert text == f"Fine by me, at ${move['price']:,.2f}." == move["message"], (turn, text)
    # Each turn after the snapshot was announced by a turn frame naming its side.
    first = len(snapshot["moves"]) + (2 if snapshot["live"] else 1)
    assert [(t["turn"], t["side"]) for t in state.turns] == [
        (m["turn"], m["side"]) for m in state.moves[first - 1 :]
    ]
    await comm.disconnect()


@pytest.mark.parametrize("after", [1, 4, 9, 13, 20])
async def test_watch_mid_negotiation_gets_snapshot_then_live_frames_nothing_missing_or_doubled(
    upstream: FakeUpstream, after: int
) -> None:
    echo_prices(upstream, delay=0.02)
    starter, watcher = await open_socket(), await open_socket()
    own = await start(starter, **CUSTOM, max_turns=8)
    negotiation_id = own["negotiation_id"]
    seen = [await recv(starter) for _ in range(after)]

    await watcher.send_json_to({"type": "watch", "negotiation_id": negotiation_id})
    snapshot = await recv(watcher)
    assert snapshot["type"] == "negotiation" and snapshot["negotiation_id"] == negotiation_id
    assert snapshot["status"] == "running", "watched too late: the negotiation was over"
    watched = await until_end(watcher)
    seen += await until_end(starter)

    # Both sockets got the same stream: the watcher's frames are the tail of the starter's ...
    assert watched == seen[len(seen) - len(watched) :]
    # ... and its snapshot is exactly the state the starter had rebuilt before that tail.
    before = rebuild(own, seen[: len(seen) - len(watched)])
    assert [m for m in snapshot["moves"]] == before.moves
    assert snapshot["live"] == before.live
    mine, theirs = rebuild(own, seen), rebuild(snapshot, watched)
    data = await wait_for_status(negotiation_id, "deal")
    assert mine.moves == theirs.moves == stored_moves(data)
    assert mine.end == theirs.end
    for turn, text in theirs.texts.items():  # the live text so far + its tokens: the message
        assert text == data["moves"][turn - 1]["message"], (turn, text)
        assert text.startswith("Fine by me, at $"), text
    assert await watcher.receive_nothing(timeout=0.2)
    await starter.disconnect()
    await watcher.disconnect()


async def test_watching_a_finished_negotiation_gets_its_final_snapshot_only(
    upstream: FakeUpstream,
) -> None:
    upstream.default = Reply(tokens=FINE)
    comm = await open_socket()
    snapshot, frames = await run_to_end(comm)
    negotiation_id = snapshot["negotiation_id"]
    data = await wait_for_status(negotiation_id, "deal")

    late = await open_socket()
    await late.send_json_to({"type": "watch", "negotiation_id": negotiation_id})
    final = await recv(late)
    assert final["type"] == "negotiation" and final["negotiation_id"] == negotiation_id
    assert (final["status"], final["ended_by"]) == ("deal", "accept")
    assert final["moves"] == data["moves"]
    assert final["metrics"] == data["metrics"] == frames[-1]["metrics"]
    assert final["live"] is None and final["finished_at"]
    assert await late.receive_nothing(timeout=0.3), "live frames after a finished snapshot"
    # Watching it again: the same snapshot again, nothing else.
    await late.send_json_to({"type": "watch", "negotiation_id": negotiation_id})
    assert (await recv(late)) == final
    assert await late.receive_nothing(timeout=0.2)
    await comm.disconnect()
    await late.disconnect()


async def test_closing_the_starters_socket_does_not_stop_the_negotiation(
    upstream: FakeUpstream,
) -> None:
    upstream.default = Reply(tokens=SLOW_TOKENS, delay=0.02)
    comm = await open_socket()
    snapshot = await start(comm, **CUSTOM, max_turns=6)
    negotiation_id = snapshot["negotiation_id"]
    await until(comm, ("token",))
    await comm.disconnect()
    data = await wait_for_status(negotiation_id, "deal", "no_deal", timeout=15)
    assert data["ended_by"] in ("accept", "max_turns"), data
    assert len(data["moves"]) >= 2
    assert [m["turn"] for m in data["moves"]] == list(range(1, len(data["moves"]) + 1))
    assert upstream.disconnects == [], "a generation was cut when its socket closed"


async def test_cancel_mid_token_ends_cancelled_within_a_second_and_closes_the_upstream(
    upstream: FakeUpstream,
) -> None:
    upstream.default = Reply(tokens=[f" t{i}" for i in range(300)], delay=0.03)  # 9 s a move
    comm = await open_socket()
    snapshot = await start(comm, **CUSTOM)
    negotiation_id = snapshot["negotiation_id"]
    streamed = await until(comm, ("token",))
    assert upstream.active == 1
    cancelled_at = time.monotonic()
    await comm.send_json_to({"type": "cancel", "negotiation_id": negotiation_id})
    frames = await until_end(comm, timeout=2)
    elapsed = time.monotonic() - cancelled_at
    end = frames[-1]
    assert (end["status"], end["ended_by"]) == ("cancelled", "cancel"), end
    assert end["negotiation_id"] == negotiation_id
    assert elapsed < 1.0, f"the end frame came {elapsed:.2f} s after cancel"
    assert {f["type"] for f in frames[:-1]} <= {"token"}, frames
    assert await upstream.wait_for_disconnects(1, timeout=1.0), "the upstream request stayed open"
    assert upstream.disconnects[0] - cancelled_at < 1.0
    assert upstream.completed == 0

    data = await wait_for_status(negotiation_id, "cancelled")
    assert data["ended_by"] == "cancel" and data["moves"] == []
    assert data["metrics"]["deal"] is False and data["metrics"]["price"] is None
    assert rebuild(snapshot, streamed + frames).moves == []

    # Cancelling it again: it is over; the socket goes on working.
    await comm.send_json_to({"type": "cancel", "negotiation_id": negotiation_id})
    again = await error_after(comm)
    assert (again["code"], again["negotiation_id"]) == ("NEGOTIATION_OVER", negotiation_id)
    upstream.default = Reply(tokens=FINE)
    await usable(comm)
    await comm.disconnect()


# Bad input ------------------------------------------------------------------------------------

START = {"type": "start", **CUSTOM}
BAD_FRAMES: list[tuple[str, Any, str, list[str]]] = [
    ("bad-json", '{"type": "start",', "INVALID_JSON", []),
    ("not-an-object", "[1, 2]", "INVALID_REQUEST", ["type"]),
    ("no-type", {"negotiation_id": str(uuid.uuid4())}, "INVALID_REQUEST", ["type"]),
    ("unknown-type", {"type": "shout"}, "UNKNOWN_TYPE", ["shout"]),
    ("type-not-a-string", {"type": 7}, "UNKNOWN_TYPE", []),
    ("negative-price", {**START, "list_price": -400}, "INVALID_REQUEST", ["list_price"]),
    ("price-as-string", {**START, "buyer_budget": "321.37"}, "INVALID_REQUEST", ["buyer_budget"]),
    ("zero-cost", {**START, "seller_cost": 0}, "INVALID_REQUEST", ["seller_cost"]),
    ("max-turns-text", {**START, "max_turns": "ten"}, "INVALID_REQUEST", ["max_turns"]),
    ("max-turns-41", {**START, "max_turns": 41}, "INVALID_REQUEST", ["max_turns"]),
    ("bad-policy", {**START, "buyer": {"policy": "oracle"}}, "INVALID_REQUEST", ["policy"]),
    ("bad-opening", {**START, "opening": "nobody"}, "INVALID_REQUEST", ["opening"]),
    ("extra-field", {**START, "colour": "blue"}, "INVALID_REQUEST", ["colour"]),
    ("no-scenario", {"type": "start"}, "INVALID_REQUEST", ["scenario"]),
    ("unknown-scenario", {"type": "start", "scenario": 10**6}, "SCENARIO_NOT_FOUND", []),
    ("scenario-and-item", {**START, "scenario": 0}, "INVALID_REQUEST", ["scenario"]),
    ("scenario-as-string", {"type": "start", "scenario": "0"}, "INVALID_REQUEST", ["scenario"]),
    ("watch-not-a-uuid", {"type": "watch", "negotiation_id": "nope"}, "INVALID_REQUEST", []),
    ("watch-number", {"type": "watch", "negotiation_id": 5}, "INVALID_REQUEST", []),
    ("watch-missing-id", {"type": "watch"}, "INVALID_REQUEST", ["negotiation_id"]),
    (
        "watch-unknown",
        {"type": "watch", "negotiation_id": "00000000-0000-4000-8000-000000000000"},
        "NEGOTIATION_NOT_FOUND",
        [],
    ),
    (
        "move-price-text",
        {
            "type": "move",
            "negotiation_id": str(uuid.uuid4()),
            "action": "offer",
            "price": "ten",
            "message": "",
        },
        "INVALID_REQUEST",
        ["price"],
    ),
    (
        "move-bad-action",
        {"type": "move", "negotiation_id": str(uuid.uuid4()), "action": "steal", "message": ""},
        "INVALID_REQUEST",
        ["action"],
    ),
    (
        "move-unknown",
        {"type": "move", "negotiation_id": str(uuid.uuid4()), "action": "walk_away"},
        "NEGOTIATION_NOT_FOUND",
        [],
    ),
    (
        "cancel-unknown",
        {"type": "cancel", "negotiation_id": str(uuid.uuid4())},
        "NEGOTIATION_NOT_FOUND",
        [],
    ),
    (
        "cancel-extra",
        {"type": "cancel", "negotiation_id": str(uuid.uuid4()), "now": 1},
        "INVALID_REQUEST",
        ["now"],
    ),
]


async def test_every_bad_frame_gets_its_code_and_the_socket_stays_usable(
    upstream: FakeUpstream,
) -> None:
    """All of BAD_FRAMES, one after the other on one socket, then a whole negotiation on it."""
    upstream.default = Reply(tokens=FINE)
    comm = await open_socket()
    for name, frame, code, words in BAD_FRAMES:
        if isinstance(frame, str):
            await comm.send_to(text_data=frame)
        else:
            await comm.send_json_to(frame)
        error = await recv(comm)
        assert error["type"] == "error", (name, error)
        assert error["code"] == code, (name, error)
        for word in words:
            assert word in error["message"], (name, error)
        assert len(error["message"]) < 1000, (name, error)
        if isinstance(frame, dict) and isinstance(frame.get("negotiation_id"), str):
            assert error.get("negotiation_id") == frame["negotiation_id"], (name, error)
        assert await comm.receive_nothing(timeout=0.05), name
    assert upstream.chat_requests == []
    await usable(comm)
    await comm.disconnect()


async def test_a_move_needs_a_human_side_its_turn_and_a_running_negotiation(
    upstream: FakeUpstream,
) -> None:
    upstream.default = Reply(tokens=[f" t{i}" for i in range(200)], delay=0.02)
    comm = await open_socket()
    # Two models play: no side takes a person's move (INVALID_MOVE).
    models = await start(comm, **CUSTOM)
    await comm.send_json_to(
        {"type": "move", "negotiation_id": models["negotiation_id"], "action": "walk_away"}
    )
    error = await error_after(comm)
    assert (error["code"], error["negotiation_id"]) == ("INVALID_MOVE", models["negotiation_id"])
    assert "person" in error["message"], error
    await comm.send_json_to({"type": "cancel", "negotiation_id": models["negotiation_id"]})
    assert (await until_end(comm))[-1]["status"] == "cancelled"

    # A person plays the buyer; the seller (a model) opens and is still writing.
    human = await start(comm, **CUSTOM, buyer={"policy": "human"})
    human_id = human["negotiation_id"]
    assert human["scenario"]["seller_cost"] is None  # the person must not see the seller's cost
    await until(comm, ("token",))
    await comm.send_json_to(
        {"type": "move", "negotiation_id": human_id, "action": "offer", "price": 100}
    )
    error = await error_after(comm)
    assert (error["code"], error["negotiation_id"]) == ("NOT_YOUR_TURN", human_id), error
    assert "seller" in error["message"]
    # The seller's side is a model's: a person cannot move for it.
    await comm.send_json_to(
        {
            "type": "move",
            "negotiation_id": human_id,
            "side": "seller",
            "action": "offer",
            "price": 390,
        }
    )
    error = await error_after(comm)
    assert (error["code"], error["negotiation_id"]) == ("NOT_YOUR_TURN", human_id), error
    # A price that is not a number: refused by the schema, nothing reaches the negotiation.
    await comm.send_json_to(
        {"type": "move", "negotiation_id": human_id, "action": "offer", "price": "ten"}
    )
    error = await error_after(comm)
    assert (error["code"], error["negotiation_id"]) == ("INVALID_REQUEST", human_id), error
    assert "price" in error["message"]

    await comm.send_json_to({"type": "cancel", "negotiation_id": human_id})
    assert (await until_end(comm))[-1]["status"] == "cancelled"
    for negotiation_id in (models["negotiation_id"], human_id):
        data = await wait_for_status(negotiation_id, "cancelled")
        assert data["moves"] == [], data["moves"]  # none of the refused moves was stored

    # Over: any move is NEGOTIATION_OVER.
    await comm.send_json_to(
        {"type": "move", "negotiation_id": human_id, "action": "offer", "price": 100}
    )
    error = await error_after(comm)
    assert (error["code"], error["negotiation_id"]) == ("NEGOTIATION_OVER", human_id), error
    upstream.default = Reply(tokens=FINE)
    finished, _ = await run_to_end(comm)
    await comm.send_json_to(
        {
            "type": "move",
            "negotiation_id": finished["negotiation_id"],
            "action": "accept",
            "price": 300,
        }
    )
    error = await error_after(comm)
    assert error["code"] == "NEGOTIATION_OVER", error
    await usable(comm)
    await comm.disconnect()


async def test_one_socket_follows_two_negotiations_each_frame_naming_its_own(
    upstream: FakeUpstream,
) -> None:
    upstream.default = Reply(tokens=SLOW_TOKENS, delay=0.01)
    comm, other = await open_socket(), await open_socket()
    await comm.send_json_to({"type": "start", **CUSTOM, "max_turns": 6})
    await comm.send_json_to({"type": "start", **CUSTOM, "max_turns": 8, "opening": "buyer"})
    frames: dict[str, list[dict[str, Any]]] = {}
    snapshots: dict[str, dict[str, Any]] = {}
    ends = 0
    async with asyncio.timeout(20):
        while ends < 2:
            frame = await recv(comm)
            negotiation_id = frame["negotiation_id"]
            if frame["type"] == "negotiation":
                assert negotiation_id not in snapshots, "a second snapshot of one negotiation"
                snapshots[negotiation_id] = frame
                if len(snapshots) == 2:  # the other socket follows the second one only
                    await other.send_json_to({"type": "watch", "negotiation_id": negotiation_id})
                continue
            assert negotiation_id in snapshots, f"a frame before its snapshot: {frame}"
            frames.setdefault(negotiation_id, []).append(frame)
            ends += frame["type"] == "end"
    assert len(snapshots) == 2
    for negotiation_id, snapshot in snapshots.items():
        state = rebuild(snapshot, frames[negotiation_id])  # every frame names this negotiation
        data = await wait_for_status(negotiation_id, "deal", "no_deal")
        assert state.moves == stored_moves(data)
        assert state.end is not None and state.end["status"] == data["status"]
    first, second = list(snapshots)
    assert snapshots[second]["opening"] == "buyer" and snapshots[first]["opening"] == "seller"
    watched = await until_end(other)
    assert {f["negotiation_id"] for f in watched} == {second}, "another negotiation's frame"
    assert watched[-1] == frames[second][-1]
    assert await comm.receive_nothing(timeout=0.2) and await other.receive_nothing(timeout=0.1)
    await comm.disconnect()
    await other.disconnect()


# Who may open the socket, and how often it may start ---------------------------------------


async def test_api_token_is_needed_at_the_handshake_when_set(
    upstream: FakeUpstream, settings: Any
) -> None:
    upstream.default = Reply(tokens=FINE)
    settings.API_TOKEN = "secret"
    assert await try_connect(PATH) is False
    assert await try_connect(PATH + "?token=wrong") is False
    assert await try_connect(PATH + "?token=") is False
    comm = await open_socket(PATH + "?token=secret")
    await usable(comm)
    await comm.disconnect()
    assert upstream.chat_requests, "nothing generated"


async def test_foreign_origins_are_refused_and_allowed_ones_accepted(
    upstream: FakeUpstream, settings: Any
) -> None:
    assert await try_connect(headers=origin("http://evil.example")) is False
    assert await try_connect(headers=origin("http://localhost.evil.example")) is False
    assert await try_connect(headers=origin("http://localhost")) is True
    assert await try_connect(headers=[]) is True  # scripts send no Origin
    settings.CORS_ALLOWED_ORIGINS = ["https://app.example.com"]
    assert await try_connect(headers=origin("https://app.example.com")) is True
    assert await try_connect(headers=origin("http://app.example.com")) is False  # other scheme
    assert upstream.requests == []


async def test_start_is_rate_limited_and_the_socket_stays_usable(
    upstream: FakeUpstream, settings: Any
) -> None:
    upstream.default = Reply(tokens=FINE)
    settings.LLM_RATE_LIMIT = "2/m"
    comm = WebsocketCommunicator(application, PATH, headers=origin("http://localhost"))
    # An address of its own: no other test's count (same cache, same minute) is shared.
    comm.scope["client"] = (f"10.{random.randrange(256)}.{random.randrange(256)}.7", 5555)
    assert (await comm.connect(timeout=5))[0]
    first, _ = await run_to_end(comm)
    await run_to_end(comm)
    requests = len(upstream.chat_requests)
    await comm.send_json_to({"type": "start", **CUSTOM})
    error = await recv(comm)
    assert (error["type"], error["code"]) == ("error", "RATE_LIMITED"), error
    assert re.search(r"retry.*\d+\s*s", error["message"], re.IGNORECASE), error["message"]
    assert await comm.receive_nothing(timeout=0.2)
    assert len(upstream.chat_requests) == requests, "a refused start reached the upstream"
    # Other frames are not counted: watching still works.
    await comm.send_json_to({"type": "watch", "negotiation_id": first["negotiation_id"]})
    assert (await recv(comm))["status"] == "deal"
    settings.LLM_RATE_LIMIT = "off"
    await usable(comm)
    await comm.disconnect()


async def test_watch_while_a_move_is_being_stored_gets_that_move_once(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seam at its widest: the snapshot is taken while a move's row is written (made slow
    here), after the move is decided and before its frame is sent."""
    from negotiation import store

    storing = asyncio.Event()
    original = store.store_move

    async def slow_store_move(*args: Any, **kwargs: Any) -> None:
        storing.set()
        await asyncio.sleep(0.3)
        await original(*args, **kwargs)

    monkeypatch.setattr(store, "store_move", slow_store_move)
    upstream.default = Reply(tokens=FINE)
    starter, watcher = await open_socket(), await open_socket()
    own = await start(starter, **CUSTOM, max_turns=4)
    async with asyncio.timeout(5):
        await storing.wait()
    await watcher.send_json_to({"type": "watch", "negotiation_id": own["negotiation_id"]})
    snapshot = await recv(watcher)
    assert snapshot["status"] == "running", snapshot
    watched = await until_end(watcher)
    seen = await until_end(starter)
    theirs, mine = rebuild(snapshot, watched), rebuild(own, seen)  # a doubled move fails here
    data = await wait_for_status(own["negotiation_id"], "deal", "no_deal")
    assert theirs.moves == mine.moves == stored_moves(data)
    await starter.disconnect()
    await watcher.disconnect()
