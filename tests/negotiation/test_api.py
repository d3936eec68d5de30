"""The negotiations HTTP API: the scenario library, start/list/read, a person's moves, cancel,
resume, API_TOKEN and the rate limit; narrated sides really play on the fake upstream."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.cache import cache
from django.test import AsyncClient
from django.utils import timezone

from negotiation import runner
from negotiation.models import Negotiation
from negotiation.scenarios import categories, get_product, products, search
from testkit.fake_upstream import FakeUpstream, Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]

SCENARIOS = "/api/v1/scenarios"
NEGOTIATIONS = "/api/v1/negotiations"
TOKEN = "secret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
CUSTOM = {
    "item": {"title": "Road bike", "category": "sports"},
    "list_price": 400,
    "buyer_budget": 321.37,
    "seller_cost": 243.19,
}
HUMAN_BUYER = {**CUSTOM, "buyer": {"policy": "human"}, "seller": {"policy": "narrated"}}
SCENARIO_KEYS = {"index", "item", "list_price", "buyer_budget", "seller_cost"}
NEGOTIATION_KEYS = {
    "id",
    "status",
    "ended_by",
    "scenario",
    "buyer",
    "seller",
    "max_turns",
    "opening",
    "metrics",
    "error",
    "created_at",
    "finished_at",
}
MOVE_KEYS = {"turn", "side", "action", "price", "message", "invalid", "reason", "session_id"}
METRIC_KEYS = {
    "deal",
    "price",
    "mutual_interest",
    "buyer_profit",
    "seller_profit",
    "turns",
    "invalid_moves",
    "tokens",
    "duration_ms",
}


@pytest.fixture(autouse=True)
def _clear_cache() -> Any:
    cache.clear()  # the rate limit counts in the cache
    yield
    cache.clear()


@pytest.fixture
async def api(upstream: FakeUpstream) -> AsyncIterator[AsyncClient]:
    """A client, the fake upstream answering every generation at once; the negotiations the test
    left running are stopped before the upstream is."""
    upstream.default = Reply(tokens=["Let", "'s", " talk", "."])
    yield AsyncClient()
    await runner.stop_all(timeout=2)


def error_of(response: Any, code: str, status: int) -> str:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return str(body["error"]["message"])


async def post(client: AsyncClient, path: str, body: Any = None, **kwargs: Any) -> Any:
    if body is None:
        return await client.post(path, **kwargs)
    return await client.post(path, body, content_type="application/json", **kwargs)


async def start(client: AsyncClient, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    response = await post(client, NEGOTIATIONS, body, **kwargs)
    assert response.status_code == 201, response.content
    result: dict[str, Any] = response.json()
    return result


async def until(
    client: AsyncClient,
    negotiation_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 10.0,
) -> dict[str, Any]:
    """GET the negotiation every 50 ms until `done(it)` (at most `timeout` s)."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(f"{NEGOTIATIONS}/{negotiation_id}")
        assert response.status_code == 200, response.content
        body: dict[str, Any] = response.json()
        if done(body):
            return body
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {body}"
        await asyncio.sleep(0.05)


async def until_over(client: AsyncClient, negotiation_id: str) -> dict[str, Any]:
    return await until(client, negotiation_id, lambda n: n["status"] != "running")


async def until_moves(client: AsyncClient, negotiation_id: str, count: int) -> dict[str, Any]:
    return await until(client, negotiation_id, lambda n: len(n["moves"]) >= count)


def check_shape(negotiation: dict[str, Any], *, moves: bool = True) -> None:
    assert set(negotiation) == NEGOTIATION_KEYS | ({"moves"} if moves else set()), negotiation
    assert set(negotiation["scenario"]) <= SCENARIO_KEYS
    assert set(negotiation["scenario"]["item"]) == {"title", "category"}
    for side in ("buyer", "seller"):
        assert set(negotiation[side]) == {
            "policy",
            "provider",
            "model",
            "temperature",
            "persona",
            "beta",
        }
    if negotiation["metrics"] is not None:
        assert set(negotiation["metrics"]) == METRIC_KEYS
    for move in negotiation.get("moves", []):
        assert set(move) == MOVE_KEYS, move


# The scenario library -----------------------------------------------------------------------------


async def test_scenarios_are_listed_paginated_with_their_figures() -> None:
    client = AsyncClient()
    body = (await client.get(SCENARIOS)).json()
    assert body["count"] == len(products())
    assert [item["index"] for item in body["items"]] == list(range(50))
    first = body["items"][0]
    product = get_product(0)
    list_price = round(max(product.list_price, product.highest_price), 2)
    assert first == {
        "index": 0,
        "item": {"title": product.title, "category": product.category},
        "list_price": list_price,
        "buyer_budget": round(0.8 * list_price, 2),
        "seller_cost": round(product.lowest_price, 2),
        "mutual_interest": round(product.lowest_price, 2) < round(0.8 * list_price, 2),
    }
    page = (await client.get(SCENARIOS, {"page": 3, "page_size": 2})).json()
    assert [item["index"] for item in page["items"]] == [4, 5]
    assert page["count"] == len(products())


async def test_scenarios_filter_by_category_and_search() -> None:
    client = AsyncClient()
    category = categories()[0]
    expected = [p.index for p in search(category=category)]
    body = (await client.get(SCENARIOS, {"category": category.upper(), "page_size": 100})).json()
    assert body["count"] == len(expected) > 0
    assert [item["index"] for item in body["items"]] == expected[:100]
    assert {item["item"]["category"] for item in body["items"]} == {category}

    word = get_product(7).title.split()[0]
    found = (await client.get(SCENARIOS, {"search": word.lower(), "page_size": 100})).json()
    assert 7 in [item["index"] for item in found["items"]]
    assert all(word.lower() in item["item"]["title"].lower() for item in found["items"])
    nothing = (await client.get(SCENARIOS, {"category": "no-such-category"})).json()
    assert nothing == {"items": [], "count": 0}


async def test_categories_and_one_scenario() -> None:
    client = AsyncClient()
    assert (await client.get(f"{SCENARIOS}/categories")).json() == categories()
    last = len(products()) - 1
    one = await client.get(f"{SCENARIOS}/{last}")
    assert one.status_code == 200 and one.json()["index"] == last
    for missing in (len(products()), -1, 10**30):
        message = error_of(await client.get(f"{SCENARIOS}/{missing}"), "SCENARIO_NOT_FOUND", 404)
        assert f"0 to {last}" in message
    assert "index" in error_of(await client.get(f"{SCENARIOS}/abc"), "INVALID_REQUEST", 422)


@pytest.mark.parametrize("query", [{"page": "0"}, {"page_size": "101"}, {"category": "a\x00"}])
async def test_bad_scenario_queries_are_invalid_requests(query: dict[str, str]) -> None:
    message = error_of(await AsyncClient().get(SCENARIOS, query), "INVALID_REQUEST", 422)
    assert next(iter(query)) in message


# Starting and reading -----------------------------------------------------------------------------


async def test_a_library_negotiation_runs_to_its_end(api: AsyncClient) -> None:
    started = await start(api, {"scenario": 0, "max_turns": 6})
    check_shape(started)
    assert started["status"] == "running" and started["ended_by"] is None
    assert started["metrics"] is None and started["finished_at"] is None
    product = get_product(0)
    assert started["scenario"]["index"] == 0
    assert started["scenario"]["item"]["title"] == product.title
    assert started["scenario"]["seller_cost"] == round(product.lowest_price, 2)  # no person plays
    assert started["buyer"]["policy"] == started["seller"]["policy"] == "narrated"
    assert (started["max_turns"], started["opening"]) == (6, "seller")

    ended = await until_over(api, started["id"])
    check_shape(ended)
    assert ended["status"] in ("deal", "no_deal"), ended
    assert ended["finished_at"] and ended["error"] is None
    metrics = ended["metrics"]
    assert metrics["turns"] == len(ended["moves"]) <= 6
    assert metrics["tokens"] > 0 and metrics["duration_ms"] >= 0
    assert [m["turn"] for m in ended["moves"]] == list(range(1, metrics["turns"] + 1))
    assert [m["side"] for m in ended["moves"][:2]] == ["seller", "buyer"]
    # The model's words, then the move said plainly (its words give no price).
    for move in ended["moves"]:
        assert (
            move["message"].startswith("Let's talk. ")
            and f"{move['price']:,.2f}" in move["message"]
        )
    session = await api.get(f"/api/v1/sessions/{ended['moves'][0]['session_id']}")
    assert session.status_code == 200 and session.json()["status"] == "completed"


async def test_a_custom_negotiation_makes_a_deal_in_the_zone(api: AsyncClient) -> None:
    started = await start(api, {**CUSTOM, "max_turns": 8, "opening": "buyer"})
    assert "index" not in started["scenario"]
    assert started["scenario"] == {
        "item": {"title": "Road bike", "category": "sports"},
        "list_price": 400.0,
        "buyer_budget": 321.37,
        "seller_cost": 243.19,
    }
    ended = await until_over(api, started["id"])
    assert (ended["status"], ended["ended_by"]) == ("deal", "accept"), ended
    metrics = ended["metrics"]
    assert metrics["deal"] is True and metrics["mutual_interest"] is True
    assert 243.19 <= metrics["price"] <= 321.37
    assert metrics["buyer_profit"] + metrics["seller_profit"] == pytest.approx(1)
    assert ended["moves"][0]["side"] == "buyer"
    assert ended["moves"][-1]["action"] == "accept"
    assert ended["moves"][-1]["price"] == metrics["price"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**CUSTOM, "list_price": -5}, "list_price"),
        ({**CUSTOM, "buyer_budget": "320"}, "buyer_budget"),
        ({**CUSTOM, "seller_cost": 0}, "seller_cost"),
        ({**CUSTOM, "list_price": 1e12}, "list_price"),
        ({**CUSTOM, "item": {"title": "   "}}, "item.title"),
        ({**CUSTOM, "item": {"title": ""}}, "item.title"),
        ({**CUSTOM, "scenario": 1}, "scenario"),
        ({"scenario": 0, "budget_ratio": 1e-9}, "budget_ratio"),
        ({"scenario": 0, "budget_ratio": 0}, "budget_ratio"),
        ({"scenario": "0"}, "scenario"),
        ({"scenario": 0, "max_turns": 1}, "max_turns"),
        ({"scenario": 0, "max_turns": 41}, "max_turns"),
        ({"scenario": 0, "opening": "nobody"}, "opening"),
        ({"scenario": 0, "buyer": {"policy": "robot"}}, "buyer.policy"),
        ({"scenario": 0, "seller": {"provider": "nowhere"}}, "provider"),
        ({"scenario": 0, "seller": {"policy": "llm", "beta": 2}}, "beta"),
        ({"scenario": 0, "surprise": True}, "surprise"),
        ({"item": {"title": "Bike"}}, "list_price"),
        ({}, "scenario"),
    ],
)
async def test_nonsense_starts_are_invalid_requests_naming_the_field(
    api: AsyncClient, body: dict[str, Any], field: str
) -> None:
    message = error_of(await post(api, NEGOTIATIONS, body), "INVALID_REQUEST", 422)
    assert field in message, message
    assert await Negotiation.objects.acount() == 0


async def test_bodies_that_are_not_json_objects(api: AsyncClient) -> None:
    for content in (b"{not json", b""):
        response = await api.post(NEGOTIATIONS, content, content_type="application/json")
        error_of(response, "INVALID_JSON", 400)
    error_of(await post(api, NEGOTIATIONS, [1, 2]), "INVALID_REQUEST", 422)


async def test_an_unknown_library_scenario_is_404(api: AsyncClient) -> None:
    response = await post(api, NEGOTIATIONS, {"scenario": len(products())})
    error_of(response, "SCENARIO_NOT_FOUND", 404)
    assert await Negotiation.objects.acount() == 0


async def _stored(
    status: str, *, minutes_ago: int, buyer: str = "narrated", seller: str = "narrated"
) -> Negotiation:
    created = timezone.now() - timedelta(minutes=minutes_ago)
    return await Negotiation.objects.acreate(
        status=status,
        ended_by="" if status == "running" else "max_turns",
        item_title=f"item {minutes_ago}",
        list_price=100,
        buyer_budget=80,
        seller_cost=50,
        buyer={"policy": buyer},
        seller={"policy": seller},
        buyer_policy=buyer,
        seller_policy=seller,
        created_at=created,
        updated_at=created,
    )


async def test_the_list_is_newest_first_paginated_and_filtered() -> None:
    made = [
        await _stored("deal", minutes_ago=5),
        await _stored("no_deal", minutes_ago=4, buyer="human"),
        await _stored("deal", minutes_ago=3, seller="llm"),
        await _stored("failed", minutes_ago=2, buyer="human", seller="llm"),
        await _stored("interrupted", minutes_ago=1),
    ]
    newest = [str(n.id) for n in reversed(made)]
    client = AsyncClient()
    body = (await client.get(NEGOTIATIONS)).json()
    assert body["count"] == 5 and [item["id"] for item in body["items"]] == newest
    for item in body["items"]:
        check_shape(item, moves=False)
    pages = [
        (await client.get(NEGOTIATIONS, {"page": page, "page_size": 2})).json()
        for page in (1, 2, 3)
    ]
    assert [[i["id"] for i in p["items"]] for p in pages] == [newest[:2], newest[2:4], newest[4:]]

    for query, expected in (
        ({"status": "deal"}, [0, 2]),
        ({"buyer_policy": "human"}, [1, 3]),
        ({"seller_policy": "llm"}, [2, 3]),
        ({"status": "deal", "seller_policy": "llm"}, [2]),
        ({"status": "cancelled"}, []),
    ):
        found = (await client.get(NEGOTIATIONS, query)).json()
        assert {item["id"] for item in found["items"]} == {str(made[i].id) for i in expected}
        assert found["count"] == len(expected), query
    for query in ({"status": "won"}, {"buyer_policy": "robot"}, {"page": "0"}):
        message = error_of(await client.get(NEGOTIATIONS, query), "INVALID_REQUEST", 422)
        assert next(iter(query)) in message


async def test_unknown_and_malformed_ids(api: AsyncClient) -> None:
    unknown = f"{NEGOTIATIONS}/{uuid.uuid4()}"
    error_of(await api.get(unknown), "NEGOTIATION_NOT_FOUND", 404)
    move = {"action": "offer", "price": 10}
    error_of(await post(api, f"{unknown}/moves", move), "NEGOTIATION_NOT_FOUND", 404)
    error_of(await post(api, f"{unknown}/cancel"), "NEGOTIATION_NOT_FOUND", 404)
    error_of(await post(api, f"{unknown}/resume"), "NEGOTIATION_NOT_FOUND", 404)
    for bad in ("not-a-uuid", "123", "0f0f0f0f-0f0f-0f0f-0f0f-0f0f0f0f0f0"):
        path = f"{NEGOTIATIONS}/{bad}"
        for response in (
            await api.get(path),
            await post(api, f"{path}/moves", move),
            await post(api, f"{path}/cancel"),
            await post(api, f"{path}/resume"),
        ):
            assert "negotiation_id" in error_of(response, "INVALID_REQUEST", 422)


# A person plays -----------------------------------------------------------------------------------


async def test_a_person_buys_from_a_narrated_seller(
    api: AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.replies.append(Reply(tokens=["Welcome", "!"], ttft=0.5))  # the seller's opening
    started = await start(api, HUMAN_BUYER)
    nid = started["id"]
    moves = f"{NEGOTIATIONS}/{nid}/moves"
    # The buyer's own budget is shown; the seller's cost is hidden while the person plays.
    assert started["scenario"]["buyer_budget"] == 321.37
    assert started["scenario"]["seller_cost"] is None

    early = await post(api, moves, {"action": "offer", "price": 100, "message": "Hi"})
    message = error_of(early, "NOT_YOUR_TURN", 409)
    assert message == (
        "it is the seller's turn (turn 1), not the buyer's; wait for the seller's move"
    )
    as_seller = await post(api, moves, {"side": "seller", "action": "offer", "price": 390})
    assert "played by a model" in error_of(as_seller, "NOT_YOUR_TURN", 409)

    opened = await until_moves(api, nid, 1)
    assert opened["moves"][0]["side"] == "seller" and opened["moves"][0]["action"] == "offer"
    assert opened["scenario"]["seller_cost"] is None
    text_price = await post(api, moves, {"action": "offer", "price": "150", "message": "150?"})
    assert "price" in error_of(text_price, "INVALID_REQUEST", 422)

    offer = await post(api, moves, {"action": "offer", "price": 150, "message": "Would 150 do?"})
    assert offer.status_code == 201, offer.content
    assert offer.json() == {
        "turn": 2,
        "side": "buyer",
        "action": "offer",
        "price": 150.0,
        "message": "Would 150 do?",
        "invalid": False,
        "reason": None,
        "session_id": None,
    }

    countered = await until_moves(api, nid, 3)
    counter = countered["moves"][2]
    assert (counter["side"], counter["action"]) == ("seller", "offer"), counter
    assert 243.19 < counter["price"] < opened["moves"][0]["price"]
    accepted = await post(api, moves, {"action": "accept", "message": "Deal."})
    assert accepted.status_code == 201, accepted.content
    assert (accepted.json()["action"], accepted.json()["price"]) == ("accept", counter["price"])

    ended = await until_over(api, nid)
    assert (ended["status"], ended["ended_by"]) == ("deal", "accept")
    assert ended["metrics"]["price"] == counter["price"] and ended["metrics"]["turns"] == 4
    assert ended["scenario"]["seller_cost"] == 243.19  # shown once it is over
    assert [m["session_id"] is None for m in ended["moves"]] == [False, True, False, True]

    late = await post(api, moves, {"action": "offer", "price": 200})
    assert "deal" in error_of(late, "NEGOTIATION_OVER", 409)
    error_of(await post(api, f"{NEGOTIATIONS}/{nid}/cancel"), "NEGOTIATION_OVER", 409)
    error_of(await post(api, f"{NEGOTIATIONS}/{nid}/resume"), "NEGOTIATION_OVER", 409)


async def test_a_move_refused_twice_is_stored_invalid_and_the_turn_passes(
    api: AsyncClient,
) -> None:
    started = await start(api, HUMAN_BUYER)
    nid = started["id"]
    moves = f"{NEGOTIATIONS}/{nid}/moves"
    opening = (await until_moves(api, nid, 1))["moves"][0]

    fake_deal = await post(api, moves, {"action": "accept", "price": 1.0, "message": "Deal at 1"})
    message = error_of(fake_deal, "INVALID_MOVE", 422)
    assert "accept only takes the seller's latest offer" in message
    no_price = await post(api, moves, {"action": "offer", "message": "How about..."})
    message = error_of(no_price, "INVALID_MOVE", 422)
    assert "needs a price" in message and "stored as invalid and the turn passes" in message

    passed = await until_moves(api, nid, 3)
    invalid = passed["moves"][1]
    assert (invalid["turn"], invalid["side"], invalid["action"]) == (2, "buyer", "offer")
    assert invalid["invalid"] is True and "needs a price" in invalid["reason"]
    assert passed["moves"][2]["side"] == "seller"  # the turn passed
    assert passed["moves"][0] == opening

    walked = await post(api, moves, {"action": "walk_away", "message": "Bye"})
    assert walked.status_code == 201, walked.content
    ended = await until_over(api, nid)
    assert (ended["status"], ended["ended_by"]) == ("no_deal", "walk_away")
    assert ended["metrics"]["invalid_moves"] == 1 and ended["metrics"]["deal"] is False


async def test_cancelling_a_negotiation_that_waits_for_a_person(api: AsyncClient) -> None:
    started = await start(api, HUMAN_BUYER)
    nid = started["id"]
    await until_moves(api, nid, 1)  # the seller opened: the person is awaited
    began = time.monotonic()
    response = await post(api, f"{NEGOTIATIONS}/{nid}/cancel")
    assert time.monotonic() - began < 1.0
    assert response.status_code == 200, response.content
    body = response.json()
    check_shape(body)
    assert (body["status"], body["ended_by"]) == ("cancelled", "cancel")
    assert body["finished_at"] and body["metrics"]["deal"] is False
    assert body["scenario"]["seller_cost"] == 243.19
    assert (await api.get(f"{NEGOTIATIONS}/{nid}")).json()["status"] == "cancelled"
    error_of(await post(api, f"{NEGOTIATIONS}/{nid}/cancel"), "NEGOTIATION_OVER", 409)
    gone = await post(api, f"{NEGOTIATIONS}/{nid}/moves", {"action": "walk_away"})
    error_of(gone, "NEGOTIATION_OVER", 409)


async def test_a_person_who_does_not_move_in_time_ends_it_without_a_deal(
    api: AsyncClient, settings: Any
) -> None:
    settings.NEGOTIATION_HUMAN_TIMEOUT = 0.3
    started = await start(api, HUMAN_BUYER)
    ended = await until_over(api, started["id"])
    assert (ended["status"], ended["ended_by"]) == ("no_deal", "timeout"), ended
    assert len(ended["moves"]) == 1 and ended["metrics"]["deal"] is False
    late = await post(api, f"{NEGOTIATIONS}/{started['id']}/moves", {"action": "walk_away"})
    assert "no_deal" in error_of(late, "NEGOTIATION_OVER", 409)


async def test_an_interrupted_negotiation_resumes_to_its_end(
    api: AsyncClient, upstream: FakeUpstream
) -> None:
    # Slow moves (about 0.4 s each), so the stop lands mid-negotiation even on a loaded machine:
    # with instant replies CI once saw all six moves made before the stop.
    upstream.default = Reply(tokens=["Let", "'s", " talk", "."], delay=0.1)
    started = await start(api, {**CUSTOM, "max_turns": 6})
    nid = started["id"]
    await until_moves(api, nid, 1)
    run = runner.running(nid)
    assert run is not None
    await run.stop(as_restart=True)  # the server stopping
    interrupted = (await api.get(f"{NEGOTIATIONS}/{nid}")).json()
    assert (interrupted["status"], interrupted["ended_by"]) == ("interrupted", "restart")
    kept = len(interrupted["moves"])
    assert kept >= 1

    error_of(
        await post(api, f"{NEGOTIATIONS}/{nid}/moves", {"action": "walk_away"}),
        "NEGOTIATION_OVER",
        409,
    )
    resumed = await post(api, f"{NEGOTIATIONS}/{nid}/resume")
    assert resumed.status_code == 202, resumed.content
    assert resumed.json()["status"] == "running" and resumed.json()["metrics"] is None
    ended = await until_over(api, nid)
    assert ended["status"] == "deal", ended
    assert ended["moves"][:kept] == interrupted["moves"]
    assert ended["metrics"]["turns"] == len(ended["moves"]) <= 6
    error_of(await post(api, f"{NEGOTIATIONS}/{nid}/resume"), "NEGOTIATION_OVER", 409)


# API_TOKEN and the rate limit ---------------------------------------------------------------------


async def test_api_token_guards_every_negotiation_endpoint(api: AsyncClient, settings: Any) -> None:
    settings.API_TOKEN = TOKEN
    some = f"{NEGOTIATIONS}/{uuid.uuid4()}"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for response in (
            await post(api, NEGOTIATIONS, {"scenario": 0}, headers=headers),
            await api.get(NEGOTIATIONS, headers=headers),
            await api.get(some, headers=headers),
            await post(api, f"{some}/moves", {"action": "walk_away"}, headers=headers),
            await post(api, f"{some}/cancel", headers=headers),
            await post(api, f"{some}/resume", headers=headers),
        ):
            error_of(response, "UNAUTHORIZED", 401)
    assert await Negotiation.objects.acount() == 0
    started = await start(api, {**HUMAN_BUYER}, headers=BEARER)
    assert (await api.get(f"{NEGOTIATIONS}/{started['id']}", headers=BEARER)).status_code == 200
    assert (await api.get(NEGOTIATIONS, headers=BEARER)).json()["count"] == 1
    assert (await api.get(SCENARIOS)).status_code == 200  # public library data


async def _away_from_a_window_edge(period: int = 60, margin: float = 3.0) -> None:
    into = time.time() % period
    if into > period - margin:
        await asyncio.sleep(period - into + 0.05)


async def test_starting_and_resuming_are_rate_limited_like_generating(
    api: AsyncClient, settings: Any
) -> None:
    settings.LLM_RATE_LIMIT = "2/m"
    await _away_from_a_window_edge()
    first = await start(api, HUMAN_BUYER)
    await start(api, HUMAN_BUYER)
    third = await post(api, NEGOTIATIONS, HUMAN_BUYER)
    assert "per 60 s" in error_of(third, "RATE_LIMITED", 429)
    assert 1 <= int(third["Retry-After"]) <= 61
    assert await Negotiation.objects.acount() == 2
    resumed = await post(api, f"{NEGOTIATIONS}/{first['id']}/resume")
    error_of(resumed, "RATE_LIMITED", 429)
    for _ in range(3):  # reading and moving are not counted
        assert (await api.get(NEGOTIATIONS)).status_code == 200
    await until_moves(api, first["id"], 1)
    move = await post(api, f"{NEGOTIATIONS}/{first['id']}/moves", {"action": "walk_away"})
    assert move.status_code == 201, move.content


async def test_the_endpoints_are_documented() -> None:
    document = (await AsyncClient().get("/api/v1/openapi.json")).json()
    paths = document["paths"]
    assert {"get"} <= set(paths[SCENARIOS]) and "get" in paths[f"{SCENARIOS}/{{index}}"]
    assert set(paths[NEGOTIATIONS]) == {"get", "post"}
    for action in ("moves", "cancel", "resume"):
        assert "post" in paths[f"{NEGOTIATIONS}/{{negotiation_id}}/{action}"]
    started = paths[NEGOTIATIONS]["post"]["responses"]
    assert {"201", "401", "404", "422", "429"} <= set(started)
    schemas = document["components"]["schemas"]
    assert set(schemas["NegotiationDetailOut"]["properties"]) == NEGOTIATION_KEYS | {"moves"}
    assert set(schemas["MoveOut"]["properties"]) == MOVE_KEYS
    assert set(schemas["MetricsOut"]["properties"]) == METRIC_KEYS
    listed = {p["name"] for p in paths[NEGOTIATIONS]["get"]["parameters"]}
    assert {"status", "buyer_policy", "seller_policy", "page", "page_size"} <= listed
