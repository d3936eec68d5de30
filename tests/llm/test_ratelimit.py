"""`llm.ratelimit`: the per-client generate rate (`LLM_RATE_LIMIT`), counted in Django's cache.

The HTTP and WebSocket faces are tested with it in test_sessions_api.py and test_consumers_access.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.core.cache import cache

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
    busy = asyncio.ensure_future(database_sync_to_async(time.sleep)(1.0))
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
