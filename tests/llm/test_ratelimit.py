"""`llm.ratelimit`: the per-client generate rate (`LLM_RATE_LIMIT`), counted in Django's cache.

The HTTP and WebSocket faces are tested with it in test_sessions_api.py and
test_consumers_access.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.cache import cache

from llm.auth import client_key
from llm.exceptions import RateLimited
from llm.ratelimit import check_rate, parse_rate


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    cache.clear()


@pytest.mark.parametrize(
    ("rate", "parsed"),
    [
        ("60/m", (60, 60)),
        ("5/s", (5, 1)),
        ("1000/hour", (1000, 3600)),
        (" 2 / d ", (2, 86400)),
        ("off", None),
        ("", None),
        ("0", None),
    ],
)
def test_parse_rate(rate: str, parsed: tuple[int, int] | None) -> None:
    assert parse_rate(rate) == parsed


@pytest.mark.parametrize("rate", ["60", "60/week", "-1/m", "0/m", "many/m", "60/m/s"])
def test_parse_rate_refuses_what_is_not_a_rate(rate: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(rate)


async def test_past_the_limit_the_client_is_told_when_to_retry(settings: Any) -> None:
    settings.LLM_RATE_LIMIT = "2/m"
    await check_rate("ip:10.0.0.1")
    await check_rate("ip:10.0.0.1")
    with pytest.raises(RateLimited) as refused:
        await check_rate("ip:10.0.0.1")
    assert 1 <= refused.value.retry_after <= 60
    await check_rate("ip:10.0.0.2")  # another client counts on its own


async def test_counting_does_not_wait_for_the_database_thread(settings: Any) -> None:
    """Async code reaches the ORM through one thread; a generate must not queue behind it."""
    settings.LLM_RATE_LIMIT = "100/m"
    # The thread database_sync_to_async uses (without its connection clean-up, which needs a
    # database this test does not open).
    busy = asyncio.ensure_future(sync_to_async(time.sleep, thread_sensitive=True)(1.0))
    await asyncio.sleep(0.05)  # the database thread is now asleep
    started = time.perf_counter()
    await check_rate("ip:10.0.0.3")
    waited = time.perf_counter() - started
    await busy
    assert waited < 0.5, f"the rate check waited {waited:.2f} s for the database thread"


async def test_a_cache_outage_lets_generation_through(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.LLM_RATE_LIMIT = "1/m"

    def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("the cache is down")

    monkeypatch.setattr(cache, "add", down)
    for _ in range(3):
        await check_rate("ip:10.0.0.4")


def test_both_faces_count_a_client_by_one_identity(settings: Any, rf: Any) -> None:
    """The HTTP request and the WebSocket scope go through one rule: the token's holder is one
    client wherever it connects from; anyone else is its address, the same on both faces."""
    settings.API_TOKEN = "the-token"
    by_token = rf.get("/", HTTP_AUTHORIZATION="Bearer the-token", REMOTE_ADDR="10.0.0.9")
    socket = {"client": ("10.0.0.8", 4000), "query_string": b"token=the-token"}
    assert client_key(by_token) == client_key(socket) == "token"

    wrong = rf.get("/", HTTP_AUTHORIZATION="Bearer nope", REMOTE_ADDR="10.0.0.7")
    bare_socket = {"client": ("10.0.0.7", 4001), "query_string": b"token=nope"}
    assert client_key(wrong) == client_key(bare_socket) == "ip:10.0.0.7"
    assert client_key({"query_string": b""}) == "ip:unknown"

    settings.API_TOKEN = ""  # no token configured: nobody is the token's holder
    assert client_key(by_token) == "ip:10.0.0.9"
