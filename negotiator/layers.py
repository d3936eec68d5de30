"""The Redis channel layer, made to ride out a Redis outage instead of failing every consumer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels_redis.core import RedisChannelLayer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger("negotiator.layers")

RETRY_DELAY_MAX = 10.0


class ResilientRedisChannelLayer(RedisChannelLayer):
    """channels-redis, but `receive` waits for Redis to come back (with backoff) instead of raising.

    Channels runs `receive` in every consumer's dispatch loop, so a raised connection error
    would drop every open WebSocket; plain HTTP and non-watching streams need no Redis at all.
    Sends still raise: their callers decide (the broadcaster logs and carries on).
    """

    async def receive(self, channel: str) -> dict[str, Any]:
        delay = 0.5
        while True:
            try:
                return await super().receive(channel)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("channel layer receive failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX)
