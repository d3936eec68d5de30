"""Redis down: health says so with a clear code, and generating keeps working."""

from __future__ import annotations

import os
from typing import Any

import pytest
from django.test import AsyncClient

from llm.local_model import free_port
from llm.providers import providers
from tests.llm.ws_client import generate_ok, open_socket, wait_for_status

DOWN = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
REDIS_UP = os.environ.get("SCALEOUT_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_down(settings: Any) -> None:
    settings.REDIS_URL = DOWN
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "negotiator.layers.ResilientRedisChannelLayer",
            "CONFIG": {"hosts": [DOWN]},
        }
    }
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": DOWN}
    }


@pytest.mark.django_db(transaction=True)
async def test_health_is_degraded_with_a_clear_code(redis_down: None, upstream: Any) -> None:
    response = await AsyncClient().get("/api/v1/health")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "degraded"
    layer = body["checks"]["channel_layer"]
    assert layer["status"] == "error" and layer["error"]["code"] == "CHANNEL_LAYER_UNAVAILABLE"
    assert (
        body["checks"]["database"]["status"] == "ok" and body["checks"]["llm"]["reachable"] is True
    )
    await providers.aclose()


@pytest.mark.django_db(transaction=True)
async def test_generation_and_the_rate_limit_survive_a_redis_outage(
    redis_down: None, upstream: Any, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.LLM_RATE_LIMIT = "1/m"  # counted in the (unreachable) Redis cache: fails open
    client = AsyncClient()
    for _ in range(2):
        response = await client.post(
            "/api/v1/llm/generate",
            {"messages": [{"role": "user", "content": "Hi"}]},
            content_type="application/json",
        )
        assert response.status_code == 200, response.content
        assert response.json()["content"] == "Hello, world!"
    assert "rate limit not applied" in caplog.text
    await providers.aclose()


@pytest.mark.django_db(transaction=True)
async def test_a_websocket_generation_works_while_redis_is_down(
    redis_down: None, upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumer's channel (polled by its dispatch loop) and the generation's broadcaster both
    live on the unreachable Redis layer: the socket still streams start, tokens, done."""
    comm = await open_socket()
    try:
        frames = await generate_ok(comm)  # start, tokens making "Hello, world!", done/stop
        session, _ = await wait_for_status(frames[0]["session_id"], "completed")
        assert session.status == "completed"
        frames = await generate_ok(comm)  # and the socket stays usable
    finally:
        await comm.disconnect()
        await providers.aclose()
    # The layer really was the unreachable Redis: the broadcaster tried it and carried on.
    assert "cannot be watched: the channel layer failed" in caplog.text


@pytest.mark.scaleout  # needs the real Redis
@pytest.mark.django_db
async def test_health_reports_a_working_channel_layer_when_redis_answers(settings: Any) -> None:
    from health import probes

    settings.REDIS_URL = REDIS_UP
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "negotiator.layers.ResilientRedisChannelLayer",
            "CONFIG": {"hosts": [settings.REDIS_URL]},
        }
    }
    layer = await probes.channel_layer()
    assert layer is not None
    assert layer == layer | {"status": "ok", "backend": "ResilientRedisChannelLayer"}
    assert layer["latency_ms"] > 0
