"""Who may open `/ws/llm/stream/` and how often it may generate.

Origin check, API_TOKEN, rate limit.
"""

from __future__ import annotations

import random
import re
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.test import Client

from llm.routing import websocket_urlpatterns
from llm.security import HostsAndCorsOriginValidator
from negotiator.asgi import application
from testkit.fake_upstream import FakeUpstream
from tests.llm.ws_client import PATH, TIMEOUT, generate, generate_ok, open_socket, recv, try_connect

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]


def origin(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"origin", value.encode())]


# Origin ---------------------------------------------------------------------------------------


async def test_foreign_origin_is_refused_before_any_frame(upstream: FakeUpstream) -> None:
    connected, _ = await try_connect(headers=origin("http://evil.example"))
    assert connected is False
    connected, _ = await try_connect(headers=origin("http://localhost.evil.example"))
    assert connected is False
    assert upstream.requests == []


async def test_allowed_host_origin_and_no_origin_are_accepted(upstream: FakeUpstream) -> None:
    assert (await try_connect(headers=origin("http://localhost")))[0] is True
    assert (await try_connect(headers=origin("http://127.0.0.1:8000")))[0] is True
    assert (await try_connect(headers=[]))[0] is True  # websocat, scripts: no Origin header
    comm = await open_socket(headers=[])
    await generate_ok(comm)
    await comm.disconnect()


async def test_cors_allowed_origin_is_accepted(upstream: FakeUpstream, settings: Any) -> None:
    """Through the served `application`, with the setting changed at run time (as the HTTP side's
    django-cors-headers honours it)."""
    settings.CORS_ALLOWED_ORIGINS = ["http://localhost:5173", "https://app.example.com"]
    assert (await try_connect(headers=origin("http://localhost:5173")))[0] is True
    # Not an allowed host: accepted through CORS_ALLOWED_ORIGINS alone.
    assert (await try_connect(headers=origin("https://app.example.com")))[0] is True
    assert (await try_connect(headers=origin("http://app.example.com")))[0] is False  # other scheme
    assert (await try_connect(headers=origin("http://evil.example")))[0] is False


async def test_cors_allowed_origin_matching_in_the_validator(settings: Any) -> None:
    """The validator the app is wrapped in, built after the setting is read (as at start-up)."""
    settings.CORS_ALLOWED_ORIGINS = ["http://localhost:5173", "https://app.example.com"]
    app = HostsAndCorsOriginValidator(URLRouter(websocket_urlpatterns))
    expected = {
        "http://localhost:5173": True,
        "https://app.example.com": True,
        "http://app.example.com": False,
        "https://app.example.com.evil.example": False,
        "http://evil.example": False,
    }
    seen = {}
    for value in expected:
        comm = WebsocketCommunicator(app, PATH, headers=origin(value))
        seen[value] = (await comm.connect(timeout=TIMEOUT))[0]
        await comm.disconnect(timeout=TIMEOUT)
    assert seen == expected


# Token auth -----------------------------------------------------------------------------------


async def test_token_required_when_api_token_is_set(upstream: FakeUpstream, settings: Any) -> None:
    settings.API_TOKEN = "secret"
    assert (await try_connect(PATH))[0] is False
    assert (await try_connect(PATH + "?token=wrong"))[0] is False
    assert (await try_connect(PATH + "?token="))[0] is False
    comm = await open_socket(PATH + "?token=secret")
    await generate_ok(comm)
    await comm.disconnect()


async def test_no_token_needed_when_api_token_is_empty(upstream: FakeUpstream) -> None:
    comm = await open_socket(PATH)
    await generate_ok(comm)
    await comm.disconnect()
    assert (await try_connect(PATH + "?token=anything"))[0] is True


async def _session_cookie(*, is_staff: bool) -> list[tuple[bytes, bytes]]:
    user = await get_user_model().objects.acreate(
        username=f"u{random.randrange(10**9)}", is_staff=is_staff
    )
    client = Client()
    await sync_to_async(client.force_login)(user)
    cookie = client.cookies["sessionid"].value
    return [(b"origin", b"http://localhost"), (b"cookie", f"sessionid={cookie}".encode())]


async def test_staff_session_cookie_passes_without_token(
    upstream: FakeUpstream, settings: Any
) -> None:
    settings.API_TOKEN = "secret"
    comm = WebsocketCommunicator(application, PATH, headers=await _session_cookie(is_staff=True))
    connected, _ = await comm.connect(timeout=TIMEOUT)
    assert connected
    await generate_ok(comm)
    await comm.disconnect()
    connected, _ = await try_connect(PATH, headers=await _session_cookie(is_staff=False))
    assert connected is False


# Rate limit -----------------------------------------------------------------------------------


async def test_third_generate_in_a_minute_is_rate_limited(
    upstream: FakeUpstream, settings: Any
) -> None:
    settings.LLM_RATE_LIMIT = "2/m"
    comm = WebsocketCommunicator(application, PATH, headers=origin("http://localhost"))
    # A client address of its own, so no other test's count (same cache, same minute) is shared.
    comm.scope["client"] = (
        f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}",
        5555,
    )
    assert (await comm.connect(timeout=TIMEOUT))[0]
    await generate_ok(comm)
    await generate_ok(comm)
    await generate(comm)
    error = await recv(comm)
    assert (error["type"], error["code"]) == ("error", "RATE_LIMITED")
    assert re.search(r"retry.*\d+\s*s", error["message"], re.IGNORECASE), error["message"]
    assert len(upstream.chat_requests) == 2
    # Still usable for other frames.
    await comm.send_json_to({"type": "cancel"})
    await comm.send_json_to({"type": "shout"})
    assert (await recv(comm))["code"] == "UNKNOWN_TYPE"
    settings.LLM_RATE_LIMIT = "off"
    await generate_ok(comm)
    await comm.disconnect()
