"""Probes of each part the service depends on, each bounded in time and never raising."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connections

from llm.providers import get_provider
from llm.types import PingResult

DATABASE_TIMEOUT = 5.0
CHANNEL_LAYER_TIMEOUT = 2.0


def _select_one(alias: str) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def database(alias: str = "default", timeout: float = DATABASE_TIMEOUT) -> dict[str, Any]:
    """`SELECT 1` through Django's connection: `{"status", "engine", "latency_ms"[, "error"]}`."""
    engine = connections[alias].vendor
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await sync_to_async(_select_one, thread_sensitive=True)(alias)
    except TimeoutError:
        return {
            "status": "error",
            "engine": engine,
            "latency_ms": None,
            "error": {"code": "DATABASE_TIMEOUT", "message": f"no answer within {timeout:g} s"},
        }
    except Exception as exc:  # any driver error means the database is down for us
        return {
            "status": "error",
            "engine": engine,
            "latency_ms": None,
            "error": {
                "code": "DATABASE_UNAVAILABLE",
                "message": f"{type(exc).__name__}: {exc}"[:300],
            },
        }
    return {
        "status": "ok",
        "engine": engine,
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
    }


async def provider(alias: str | None = None) -> PingResult:
    """The provider's own `ping()`: already bounded by `LLM_PING_TIMEOUT`, never raises."""
    return await get_provider(alias).ping()


async def channel_layer(timeout: float = CHANNEL_LAYER_TIMEOUT) -> dict[str, Any] | None:
    """A real round trip through the channel layer when it is Redis (`REDIS_URL`); else None."""
    if not settings.REDIS_URL:
        return None
    layer = get_channel_layer()
    backend = type(layer).__name__
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            channel = await layer.new_channel()
            await layer.send(channel, {"type": "health.ping"})
            await layer.receive(channel)
    except TimeoutError:
        return {
            "status": "error",
            "backend": backend,
            "latency_ms": None,
            "error": {
                "code": "CHANNEL_LAYER_TIMEOUT",
                "message": f"no round trip within {timeout:g} s",
            },
        }
    except Exception as exc:  # any Redis error means watchers across workers are down
        return {
            "status": "error",
            "backend": backend,
            "latency_ms": None,
            "error": {
                "code": "CHANNEL_LAYER_UNAVAILABLE",
                "message": f"{type(exc).__name__}: {exc}"[:300],
            },
        }
    return {
        "status": "ok",
        "backend": backend,
        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
    }
