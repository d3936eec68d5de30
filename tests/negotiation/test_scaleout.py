"""Negotiations scaled out for real: two daphne workers sharing PostgreSQL and Redis (never mocks),
in front of the fake upstream process.

A negotiation started on worker A over its WebSocket is watched from worker B: what B's
watchers get after their snapshots is exactly the tail of what A's socket got, and each snapshot is
the state A's socket had reached before that tail. A person's move sent to worker B over HTTP
reaches the negotiation running on A (201 with the stored move, refusals with their codes), and a
cancel sent to B (WebSocket or HTTP) stops it on A within a second, B told so at once.

Like tests/negotiator/test_scaleout.py these always use the real servers
(`SCALEOUT_DATABASE_URL` / `SCALEOUT_REDIS_URL`, by default the local PostgreSQL and Redis) in a
database of their own, created and dropped here, and fail loudly when they do not answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import websockets

from testkit import servers
from tests.negotiation.ws import CUSTOM, rebuild
from tests.scaleout import PG_URL, REDIS_URL, admin_connection

# The fake upstream's reply to every move: 6 tokens 30 ms apart (about 0.2 s a move) ...
TOKENS, DELAY = 6, 0.03
MESSAGE = " ".join(f"t{i}" for i in range(TOKENS))
# ... unless a side asks for this model: about 9 s a move.
SLOW_MODEL = "bench:tokens=300,delay=0.03"
TIMEOUT = 20

pytestmark = [pytest.mark.scaleout, pytest.mark.timeout(120)]


@dataclass
class Cluster:
    a: str  # worker A's base URL
    b: str  # worker B's


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    admin = admin_connection()
    name = f"negotiator_negotiation_scaleout_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    logs = tmp_path_factory.mktemp("negotiation-scaleout")
    try:
        with servers.fake_upstream(
            logs, "--tokens", str(TOKENS), "--delay", str(DELAY)
        ) as upstream:
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith(servers.FOREIGN)},
                "DATABASE_URL": urlunsplit(urlsplit(PG_URL)._replace(path=f"/{name}")),
                "REDIS_URL": REDIS_URL,
                "DATABASE_POOL_SIZE": "3",
                "LM_STUDIO_BASE_URL": upstream,
                "LM_STUDIO_DEFAULT_MODEL": "fake-model",
                "LLM_RATE_LIMIT": "off",
                "LLM_LOCAL_MODEL": "off",
                "LLM_MAX_RETRIES": "0",
                "API_TOKEN": "",
            }
            servers.manage(env, "migrate", "--noinput", "-v0")
            with (
                servers.daphne(env, logs, migrate=False) as worker_a,
                servers.daphne(env, logs, migrate=False) as worker_b,
            ):
                yield Cluster(worker_a, worker_b)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws/negotiations/"


class Socket:
    """A `websockets` client of /ws/negotiations/ that keeps every frame it reads."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, **frame: Any) -> None:
        await self.ws.send(json.dumps(frame))

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        text = await asyncio.wait_for(self.ws.recv(), timeout)
        assert "Traceback" not in text, text
        frame: dict[str, Any] = json.loads(text)
        self.frames.append(frame)
        return frame

    async def until(self, test: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Frames until one for which `test(frame)` holds: that frame."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv()
                if test(frame):
                    return frame

    async def silent(self, seconds: float) -> bool:
        try:
            frame = await asyncio.wait_for(self.ws.recv(), seconds)
        except TimeoutError:
            return True
        raise AssertionError(f"an unexpected frame: {frame}")


def connect(base: str) -> Any:
    return websockets.connect(ws_url(base), max_size=None, open_timeout=TIMEOUT)


async def read(http: httpx.AsyncClient, negotiation_id: str) -> dict[str, Any]:
    response = await http.get(f"/api/v1/negotiations/{negotiation_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def final(http: httpx.AsyncClient, negotiation_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while (data := await read(http, negotiation_id))["status"] == "running":
        assert time.monotonic() < deadline, data
        await asyncio.sleep(0.05)
    return data


async def test_watchers_on_worker_b_see_exactly_what_the_starter_on_worker_a_sees(
    cluster: Cluster,
) -> None:
    moments = (1, 6, 15)  # frames A has read when each of B's watchers joins
    async with connect(cluster.a) as a_ws, httpx.AsyncClient(base_url=cluster.b) as http_b:
        starter = Socket(a_ws)
        await starter.send(type="start", **CUSTOM, max_turns=8)
        own = await starter.recv()
        assert own["type"] == "negotiation", own
        negotiation_id = own["negotiation_id"]
        watchers = []
        async with asyncio.timeout(60):
            for moment in moments:
                while len(starter.frames) - 1 < moment:
                    await starter.recv()
                ws = await connect(cluster.b)
                watcher = Socket(ws)
                await watcher.send(type="watch", negotiation_id=negotiation_id)
                watchers.append(watcher)
            await starter.until(lambda f: f["type"] == "end")
            for watcher in watchers:
                await watcher.until(lambda f: f["type"] in ("end", "error"))
                await watcher.ws.close()
        seen = starter.frames[1:]
        data = await final(http_b, negotiation_id)

    assert data["status"] == "deal", data
    mine = rebuild(own, seen)
    assert mine.moves == [{k: m[k] for k in mine.moves[0]} for m in data["moves"]]
    for moment, watcher in zip(moments, watchers, strict=True):
        snapshot, *watched = watcher.frames
        assert snapshot["type"] == "negotiation" and snapshot["status"] == "running", (
            moment,
            snapshot,
        )
        # The tail of A's stream, nothing missing or doubled ...
        assert watched == seen[len(seen) - len(watched) :], moment
        # ... after a snapshot that is exactly where A's socket stood before that tail.
        before = rebuild(own, seen[: len(seen) - len(watched)])
        assert snapshot["moves"] == before.moves, moment
        assert snapshot["live"] == before.live, moment
        theirs = rebuild(snapshot, watched)
        assert theirs.moves == mine.moves and theirs.end == mine.end
        for turn, text in theirs.texts.items():  # the raw reply; its message is tidied
            assert text == " " + MESSAGE, (moment, turn, text)
            move = data["moves"][turn - 1]
            assert f"${move['price']:,.2f}" in move["message"], (moment, turn, move)


async def test_a_human_move_sent_to_worker_b_reaches_the_negotiation_on_worker_a(
    cluster: Cluster,
) -> None:
    async with (
        connect(cluster.a) as a_ws,
        httpx.AsyncClient(base_url=cluster.b, timeout=TIMEOUT) as http_b,
    ):
        starter = Socket(a_ws)
        await starter.send(type="start", **CUSTOM, buyer={"policy": "human"})
        negotiation_id = (await starter.recv())["negotiation_id"]
        moves_url = f"/api/v1/negotiations/{negotiation_id}/moves"

        def buyers_turn(frame: dict[str, Any]) -> bool:
            return frame["type"] == "turn" and frame["side"] == "buyer"

        await starter.until(buyers_turn)
        refused = await http_b.post(moves_url, json={"action": "accept", "price": 1.5})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "INVALID_MOVE"
        assert "$400.00" in refused.json()["error"]["message"]
        asked_again = await starter.until(buyers_turn)
        assert asked_again["attempt"] == 2 and asked_again["reason"]

        started = time.monotonic()
        response = await http_b.post(
            moves_url, json={"action": "offer", "price": 250, "message": "Would $250 do?"}
        )
        assert response.status_code == 201, response.text
        move = response.json()
        assert time.monotonic() - started < 2
        assert (move["turn"], move["side"], move["action"], move["price"]) == (
            2,
            "buyer",
            "offer",
            250,
        )
        assert move["message"] == "Would $250 do?" and move["invalid"] is False
        on_a = await starter.until(lambda f: f["type"] == "move" and f["side"] == "buyer")
        assert {k: on_a[k] for k in move if k in on_a} == {k: move[k] for k in move if k in on_a}

        # While the seller (a model, on A) writes, another move is out of turn.
        early = await http_b.post(moves_url, json={"action": "offer", "price": 260})
        assert early.status_code == 409, early.text
        assert early.json()["error"]["code"] == "NOT_YOUR_TURN"

        await starter.until(buyers_turn)
        counter = [f for f in starter.frames if f["type"] == "move" and f["side"] == "seller"][-1]
        accepted = await http_b.post(
            moves_url, json={"action": "accept", "price": counter["price"], "message": "Deal."}
        )
        assert accepted.status_code == 201, accepted.text
        assert accepted.json()["action"] == "accept" and accepted.json()["turn"] == 4
        end = await starter.until(lambda f: f["type"] == "end")
        assert (end["status"], end["metrics"]["price"]) == ("deal", counter["price"]), end
        over = await http_b.post(moves_url, json={"action": "walk_away"})
        assert over.status_code == 409 and over.json()["error"]["code"] == "NEGOTIATION_OVER"
        data = await final(http_b, negotiation_id)
    assert data["status"] == "deal" and data["scenario"]["seller_cost"] == CUSTOM["seller_cost"]
    assert [m["side"] for m in data["moves"]] == ["seller", "buyer", "seller", "buyer"]
    assert data["moves"] == [
        {**m, "reason": None} for m in (rebuild(starter.frames[0], starter.frames[1:]).moves)
    ]


async def test_a_cancel_sent_to_worker_b_stops_the_negotiation_on_worker_a(
    cluster: Cluster,
) -> None:
    slow = {**CUSTOM, "seller": {"policy": "narrated", "model": SLOW_MODEL}}
    async with (
        connect(cluster.a) as a_ws,
        connect(cluster.b) as b_ws,
        httpx.AsyncClient(base_url=cluster.b, timeout=TIMEOUT) as http_b,
    ):
        starter, other = Socket(a_ws), Socket(b_ws)
        # Over B's WebSocket.
        await starter.send(type="start", **slow)
        first = (await starter.recv())["negotiation_id"]
        await starter.until(lambda f: f["type"] == "token")
        cancelled_at = time.monotonic()
        await other.send(type="cancel", negotiation_id=first)
        end = await starter.until(lambda f: f["type"] == "end", timeout=5)
        stopped_after = time.monotonic() - cancelled_at
        assert (end["status"], end["ended_by"]) == ("cancelled", "cancel"), end
        assert stopped_after < 1.0, f"stopped {stopped_after:.2f} s after the cancel"
        # B follows it (the cancel's frames come there) and gets its end; no error at all.
        on_b = await other.until(lambda f: f["type"] in ("end", "error"), timeout=5)
        assert on_b == end, on_b
        assert await other.silent(1.5)

        # Over B's HTTP API: 200 with the cancelled negotiation, at once.
        await starter.send(type="start", **slow)
        second = (await starter.until(lambda f: f["type"] == "negotiation"))["negotiation_id"]
        await starter.until(lambda f: f["type"] == "token" and f["negotiation_id"] == second)
        cancelled_at = time.monotonic()
        response = await http_b.post(f"/api/v1/negotiations/{second}/cancel")
        answered_after = time.monotonic() - cancelled_at
        assert response.status_code == 200, response.text
        assert (response.json()["status"], response.json()["ended_by"]) == ("cancelled", "cancel")
        assert answered_after < 1.0, f"B answered {answered_after:.2f} s after the cancel"
        end = await starter.until(lambda f: f["type"] == "end", timeout=2)
        assert end["negotiation_id"] == second and end["status"] == "cancelled"
        again = await http_b.post(f"/api/v1/negotiations/{second}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "NEGOTIATION_OVER"
        for negotiation_id in (first, second):
            data = await read(http_b, negotiation_id)
            assert (data["status"], data["moves"]) == ("cancelled", []), data
