"""Per-client rate limit on generate (`LLM_RATE_LIMIT`, e.g. `60/m`), counted in Django's cache.

A fixed window per client: with REDIS_URL the cache is Redis, so the count is shared by workers.
"""

from __future__ import annotations

import logging
import math
import re
import time

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches

from .exceptions import RateLimited

logger = logging.getLogger("llm.ratelimit")

PERIODS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")


def parse_rate(rate: str) -> tuple[int, int] | None:
    """`"60/m"` -> (60, 60); empty or `off` -> None; raises ValueError on anything else."""
    if not rate or rate.strip().lower() in ("off", "none", "0"):
        return None
    match = _RATE.match(rate.lower())
    if not match or match.group(2) not in PERIODS or int(match.group(1)) < 1:
        raise ValueError(f"not a rate: {rate!r}")
    return int(match.group(1)), PERIODS[match.group(2)]


async def check_rate(client: str) -> None:
    """Count one generate for `client`; raise `RateLimited` (with Retry-After) past the limit."""
    rate = parse_rate(settings.LLM_RATE_LIMIT)
    if rate is None:
        return
    limit, period = rate
    now = time.time()
    window = int(now // period)
    key = f"llm:rate:{client}:{window}"
    try:
        count = await _count(key, period)
    except Exception as exc:  # a cache outage must not stop generation: fail open, loudly
        logger.warning("rate limit not applied: the cache failed (%s: %s)", type(exc).__name__, exc)
        return
    if count > limit:
        retry_after = max(1, math.ceil((window + 1) * period - now))
        raise RateLimited(
            f"More than {limit} generations per {period} s; retry in {retry_after} s",
            retry_after=retry_after,
        )


async def _count(key: str, period: int) -> int:
    # Off the thread the ORM runs on: Django's `cache.aadd()` would queue a generate behind every
    # database write of every stream (its caches have no async I/O of their own).
    return await sync_to_async(_count_sync, thread_sensitive=False)(key, period)


def _count_sync(key: str, period: int) -> int:
    cache = caches["default"]
    if cache.add(key, 1, timeout=period + 1):
        return 1
    try:
        return cache.incr(key)
    except ValueError:  # expired between the two calls
        cache.set(key, 1, timeout=period + 1)
        return 1
