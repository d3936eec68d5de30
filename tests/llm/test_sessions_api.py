"""The sessions API, API_TOKEN and the generate rate limit (issue 3, items 9 and 10)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.test import AsyncClient
from django.utils import timezone

from llm.models import Message, Session
from testkit.fake_upstream import Reply

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]

SESSIONS = "/api/v1/sessions"
GENERATE = "/api/v1/llm/generate"
HELLO = {"messages": [{"role": "user", "content": "Hello"}]}
TOKEN = "secret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _clear_cache() -> Any:
    cache.clear()  # the rate limit counts in the cache
    yield
    cache.clear()


class ClientAt(AsyncClient):
    """An AsyncClient whose requests come from `ip` (the ASGI scope's client address)."""

    def __init__(self, ip: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ip = ip

    def _base_scope(self, **request: Any) -> dict[str, Any]:
        scope = super()._base_scope(**request)
        scope["client"] = [self.ip, 0]
        return scope


def error_of(response: Any) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    return body["error"]


@sync_to_async
def make_session(
    *, age: timedelta = timedelta(0), texts: tuple[tuple[str, str], ...] = (), **fields: Any
) -> Session:
    created = timezone.now() - age
    values = {
        "provider": "lm_studio",
        "model": "fake-model",
        "status": "completed",
        "created_at": created,
        "updated_at": created,
    }
    values.update(fields)
    session = Session.objects.create(**values)
    for position, (role, text) in enumerate(texts):
        Message.objects.create(session=session, position=position, role=role, content=text)
    return session


@sync_to_async
def make_user(name: str, *, staff: bool) -> Any:
    return get_user_model().objects.create_user(name, password="pw", is_staff=staff)


# The list -----------------------------------------------------------------------------------------


async def test_list_is_paginated_newest_first() -> None:
    made = [await make_session(age=timedelta(minutes=10 - i), model=f"m{i}") for i in range(5)]
    newest_first = [str(s.id) for s in reversed(made)]
    client = AsyncClient()

    response = await client.get(SESSIONS)
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 5
    assert [item["id"] for item in body["items"]] == newest_first

    first = (await client.get(SESSIONS, {"page": 1, "page_size": 2})).json()
    second = (await client.get(SESSIONS, {"page": 2, "page_size": 2})).json()
    last = (await client.get(SESSIONS, {"page": 3, "page_size": 2})).json()
    assert [body["count"] for body in (first, second, last)] == [5, 5, 5]
    pages = [[item["id"] for item in body["items"]] for body in (first, second, last)]
    assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    beyond = await client.get(SESSIONS, {"page": 9, "page_size": 2})
    assert beyond.status_code in (200, 404)
    if beyond.status_code == 200:
        assert beyond.json()["items"] == []


async def test_list_items_carry_the_session_fields() -> None:
    session = await make_session(
        status="failed",
        finish_reason="",
        error_code="LLM_TIMEOUT",
        error_message="stalled",
        prompt_tokens=7,
        completion_tokens=3,
        usage_estimated=True,
        ttft_ms=12.5,
        tokens_per_second=40.0,
    )
    item = (await AsyncClient().get(SESSIONS)).json()["items"][0]
    assert item["id"] == str(session.id)
    assert item["provider"] == "lm_studio"
    assert item["model"] == "fake-model"
    assert item["status"] == "failed"
    assert item["error"] == {"code": "LLM_TIMEOUT", "message": "stalled"}
    assert item["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
        "estimated": True,
    }
    assert item["ttft_ms"] == 12.5 and item["tokens_per_second"] == 40.0


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"status": "failed"}, {"failed"}),
        ({"status": "completed"}, {"done-lm", "done-or"}),
        ({"provider": "openrouter"}, {"done-or"}),
        ({"model": "other-model"}, {"failed"}),
        ({"status": "completed", "provider": "lm_studio"}, {"done-lm"}),
        ({"status": "interrupted"}, set()),
    ],
)
async def test_list_filters_by_status_provider_and_model(
    query: dict[str, str], expected: set[str]
) -> None:
    made = {
        "done-lm": await make_session(),
        "done-or": await make_session(provider="openrouter", model="openrouter/auto"),
        "failed": await make_session(
            status="failed", model="other-model", error_code="LLM_BAD_GATEWAY"
        ),
    }
    body = (await AsyncClient().get(SESSIONS, query)).json()
    assert {item["id"] for item in body["items"]} == {str(made[name].id) for name in expected}
    assert body["count"] == len(expected)


@pytest.mark.parametrize(
    "query",
    [{"status": "bogus"}, {"page": "0"}, {"page": "x"}, {"page_size": "0"}, {"page_size": "many"}],
)
async def test_bad_list_parameters_are_invalid_requests(query: dict[str, str]) -> None:
    response = await AsyncClient().get(SESSIONS, query)
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "INVALID_REQUEST"
    assert next(iter(query)) in error["message"]  # names the field


# The detail ---------------------------------------------------------------------------------------


async def test_detail_has_messages_in_order_timings_usage_and_error() -> None:
    created = timezone.now() - timedelta(seconds=5)
    session = await make_session(
        status="failed",
        finish_reason="",
        error_code="LLM_BAD_GATEWAY",
        error_message="cut mid-stream",
        prompt_tokens=9,
        completion_tokens=4,
        usage_estimated=True,
        created_at=created,
        first_token_at=created + timedelta(milliseconds=250),
        finished_at=created + timedelta(seconds=1),
        ttft_ms=250.0,
        tokens_per_second=5.3,
    )
    # Stored out of order: the API returns them by position.
    for position, role, text in [
        (2, "assistant", "partial rep"),
        (0, "system", "Be brief."),
        (1, "user", "Hi"),
    ]:
        await Message.objects.acreate(session=session, position=position, role=role, content=text)

    response = await AsyncClient().get(f"{SESSIONS}/{session.id}")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(session.id)
    assert body["status"] == "failed"
    assert body["finish_reason"] is None
    assert body["error"] == {"code": "LLM_BAD_GATEWAY", "message": "cut mid-stream"}
    assert body["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 4,
        "total_tokens": 13,
        "estimated": True,
    }
    assert body["ttft_ms"] == 250.0 and body["tokens_per_second"] == 5.3
    for key in ("created_at", "first_token_at", "finished_at"):
        assert body[key], key
    assert body["created_at"] < body["first_token_at"] < body["finished_at"]  # ISO 8601, same zone
    assert [(m["position"], m["role"], m["content"]) for m in body["messages"]] == [
        (0, "system", "Be brief."),
        (1, "user", "Hi"),
        (2, "assistant", "partial rep"),
    ]
    assert all(m["created_at"] for m in body["messages"])


async def test_detail_of_a_completed_session_has_no_error() -> None:
    session = await make_session(
        finish_reason="stop", texts=(("user", "Hi"), ("assistant", "Hello!"))
    )
    body = (await AsyncClient().get(f"{SESSIONS}/{session.id}")).json()
    assert body["error"] is None
    assert body["finish_reason"] == "stop"
    assert body["usage"] is None  # nothing counted
    assert [m["content"] for m in body["messages"]] == ["Hi", "Hello!"]


async def test_generated_session_reads_back_through_the_api(upstream: Any) -> None:
    upstream.replies.append(Reply(tokens=["Hi", " there"], ttft=0.02, delay=0.01))
    generated = (await AsyncClient().post(GENERATE, HELLO, content_type="application/json")).json()

    body = (await AsyncClient().get(f"{SESSIONS}/{generated['session_id']}")).json()
    assert body["status"] == "completed"
    assert body["model"] == "fake-model"
    assert body["usage"] == generated["usage"]
    assert body["ttft_ms"] > 0
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "Hello"),
        ("assistant", "Hi there"),
    ]


async def test_unknown_session_is_404_session_not_found() -> None:
    response = await AsyncClient().get(f"{SESSIONS}/{uuid.uuid4()}")
    assert response.status_code == 404
    assert error_of(response)["code"] == "SESSION_NOT_FOUND"


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123", "0f0f0f0f-0f0f-0f0f-0f0f-0f0f0f0f0f0"])
async def test_malformed_session_id_is_422(bad_id: str) -> None:
    response = await AsyncClient().get(f"{SESSIONS}/{bad_id}")
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "INVALID_REQUEST"
    assert "session_id" in error["message"]


async def test_both_endpoints_are_in_the_openapi_schema() -> None:
    response = await AsyncClient().get("/api/v1/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "get" in paths["/api/v1/sessions"]
    detail = [path for path in paths if path.startswith("/api/v1/sessions/{")]
    assert len(detail) == 1 and "get" in paths[detail[0]]
    listed = paths["/api/v1/sessions"]["get"]
    params = {p["name"] for p in listed.get("parameters", [])}
    assert {"page", "page_size", "status", "provider", "model"} <= params
    assert "404" in paths[detail[0]]["get"]["responses"]


# API_TOKEN ----------------------------------------------------------------------------------------


@pytest.fixture
def token_set(settings: Any) -> str:
    settings.API_TOKEN = TOKEN
    return TOKEN


async def _protected_requests(
    client: AsyncClient, session_id: str, headers: dict[str, str]
) -> list[Any]:
    return [
        await client.get(SESSIONS, headers=headers),
        await client.get(f"{SESSIONS}/{session_id}", headers=headers),
        await client.post(GENERATE, HELLO, content_type="application/json", headers=headers),
    ]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "secret"},
        {"Authorization": "Basic secret"},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "wrong", "no-scheme", "basic", "empty"],
)
async def test_without_the_token_protected_endpoints_are_401(
    token_set: str, upstream: Any, headers: dict[str, str]
) -> None:
    session = await make_session()
    for response in await _protected_requests(AsyncClient(), str(session.id), headers):
        assert response.status_code == 401, response.content
        assert error_of(response)["code"] == "UNAUTHORIZED"
        assert TOKEN.encode() not in response.content
    assert upstream.chat_requests == []  # nothing was generated


async def test_with_the_bearer_token_protected_endpoints_answer(
    token_set: str, upstream: Any
) -> None:
    session = await make_session()
    responses = await _protected_requests(AsyncClient(), str(session.id), BEARER)
    assert [r.status_code for r in responses] == [200, 200, 200], [r.content for r in responses]
    assert responses[2].json()["content"] == "Hello, world!"


async def test_a_logged_in_staff_user_passes_without_the_token(
    token_set: str, upstream: Any
) -> None:
    session = await make_session()
    client = AsyncClient()
    await client.aforce_login(await make_user("staffer", staff=True))
    responses = await _protected_requests(client, str(session.id), {})
    assert [r.status_code for r in responses] == [200, 200, 200], [r.content for r in responses]


async def test_a_staff_cookie_needs_the_csrf_token_to_generate(
    token_set: str, upstream: Any
) -> None:
    """Another site's page can make the browser POST with the staff cookie, never with the token."""
    client = AsyncClient(enforce_csrf_checks=True)
    await client.aforce_login(await make_user("staffer", staff=True))
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    forged = await client.post("/api/v1/llm/generate", body, content_type="application/json")
    assert forged.status_code == 401 and error_of(forged)["code"] == "UNAUTHORIZED"
    assert "CSRF" in error_of(forged)["message"]
    assert await Session.objects.acount() == 0

    page = await client.get("/admin/")  # any page of the site hands the browser its CSRF cookie
    assert page.status_code == 200
    token = client.cookies["csrftoken"].value
    allowed = await client.post(
        "/api/v1/llm/generate",
        body,
        content_type="application/json",
        headers={"X-CSRFToken": token},
    )
    assert allowed.status_code == 200, allowed.content
    listed = await client.get("/api/v1/sessions")  # reading needs no CSRF token
    assert listed.status_code == 200

    broken = await client.post(
        "/api/v1/llm/generate", b"--x\r\nnonsense", content_type="multipart/form-data; boundary="
    )  # unreadable: no token
    assert broken.status_code == 401 and error_of(broken)["code"] == "UNAUTHORIZED"


async def test_a_logged_in_non_staff_user_is_401(token_set: str, upstream: Any) -> None:
    session = await make_session()
    client = AsyncClient()
    await client.aforce_login(await make_user("plain", staff=False))
    for response in await _protected_requests(client, str(session.id), {}):
        assert response.status_code == 401
        assert error_of(response)["code"] == "UNAUTHORIZED"


async def test_without_api_token_the_api_is_open(upstream: Any) -> None:
    session = await make_session()
    responses = await _protected_requests(AsyncClient(), str(session.id), {})
    assert [r.status_code for r in responses] == [200, 200, 200]


@pytest.mark.parametrize(
    "path", ["/api/v1/health", "/api/v1/llm/status", "/api/v1/docs", "/api/v1/openapi.json", "/"]
)
async def test_health_status_docs_and_root_stay_open_with_the_token_set(
    token_set: str, upstream: Any, path: str
) -> None:
    response = await AsyncClient().get(path)
    assert response.status_code == 200, response.content


# Rate limit ---------------------------------------------------------------------------------------


async def _away_from_a_window_edge(period: int = 60, margin: float = 3.0) -> None:
    """Fixed windows: do not straddle one, or the third request would land in a fresh window."""
    into = time.time() % period
    if into > period - margin:
        await asyncio.sleep(period - into + 0.05)


async def test_third_generate_in_a_minute_is_rate_limited(settings: Any, upstream: Any) -> None:
    settings.LLM_RATE_LIMIT = "2/m"
    await _away_from_a_window_edge()
    client = AsyncClient()
    first = await client.post(GENERATE, HELLO, content_type="application/json")
    second = await client.post(GENERATE, HELLO, content_type="application/json")
    third = await client.post(GENERATE, HELLO, content_type="application/json")
    assert [first.status_code, second.status_code] == [200, 200]
    assert third.status_code == 429
    assert error_of(third)["code"] == "RATE_LIMITED"
    retry_after = int(third["Retry-After"])
    assert 1 <= retry_after <= 61
    assert len(upstream.chat_requests) == 2  # the refused one never reached the upstream
    # Streaming requests are counted and refused the same way.
    streamed = await client.post(
        GENERATE, {**HELLO, "stream": True}, content_type="application/json"
    )
    assert streamed.status_code == 429
    assert error_of(streamed)["code"] == "RATE_LIMITED"


async def test_rate_limit_counts_each_client_on_its_own(settings: Any, upstream: Any) -> None:
    settings.LLM_RATE_LIMIT = "2/m"
    await _away_from_a_window_edge()
    one, other = ClientAt("10.0.0.1"), ClientAt("10.0.0.2")
    for _ in range(2):
        assert (await one.post(GENERATE, HELLO, content_type="application/json")).status_code == 200
    assert (await one.post(GENERATE, HELLO, content_type="application/json")).status_code == 429
    assert (await other.post(GENERATE, HELLO, content_type="application/json")).status_code == 200


async def test_rate_limit_off_lets_every_request_through(settings: Any, upstream: Any) -> None:
    settings.LLM_RATE_LIMIT = "off"
    client = AsyncClient()
    for _ in range(4):
        assert (
            await client.post(GENERATE, HELLO, content_type="application/json")
        ).status_code == 200


async def test_rate_limit_does_not_apply_to_reading_sessions(settings: Any) -> None:
    settings.LLM_RATE_LIMIT = "2/m"
    client = AsyncClient()
    for _ in range(4):
        assert (await client.get(SESSIONS)).status_code == 200


async def test_a_private_session_is_read_by_staff_only(token_set: str) -> None:
    """A private session (a negotiating model's, while a person plays against it: its prompt
    holds a private number) is neither listed nor readable with the API token; staff see it."""
    private = await make_session(private=True, texts=(("system", "Your cost is $243.19."),))
    public = await make_session()
    holder = {"Authorization": f"Bearer {TOKEN}"}
    client = AsyncClient()
    listed = await client.get("/api/v1/sessions", headers=holder)
    assert [item["id"] for item in listed.json()["items"]] == [str(public.id)]
    hidden = await client.get(f"/api/v1/sessions/{private.id}", headers=holder)
    assert hidden.status_code == 404 and error_of(hidden)["code"] == "SESSION_NOT_FOUND"
    assert "243.19" not in hidden.content.decode()

    staff = AsyncClient()
    await staff.aforce_login(await make_user("staffer", staff=True))
    assert (await staff.get("/api/v1/sessions")).json()["count"] == 2
    seen = await staff.get(f"/api/v1/sessions/{private.id}")
    assert seen.status_code == 200 and "243.19" in seen.content.decode()
