"""Redis down: health says so with a clear code, and generating keeps working."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import AsyncClient

from llm.local_model import free_port
from llm.providers import providers

DOWN = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


@pytest.fixture
def redis_down(settings: Any) -> None:
    settings.REDIS_URL = DOWN
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "negotiator.layers.ResilientRedisChannelLayer", "CONFIG": {"hosts": [DOWN]}}
    }
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": DOWN}}


@pytest.mark.django_db(transaction=True)
async def test_health_is_degraded_with_a_clear_code(redis_down: None, upstream: Any) -> None:
    response = await AsyncClient().get("/api/v1/health")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "degraded"
    layer = body["checks"]["channel_layer"]
    assert layer["status"] == "error" and layer["error"]["code"] == "CHANNEL_LAYER_UNAVAILABLE"
    assert body["checks"]["database"]["status"] == "ok" and body["checks"]["llm"]["reachable"] is True
    await providers.aclose()


@pytest.mark.django_db(transaction=True)
async def test_generation_and_the_rate_limit_survive_a_redis_outage(
    redis_down: None, upstream: Any, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings.LLM_RATE_LIMIT = "1/m"  # counted in the (unreachable) Redis cache: fails open
    client = AsyncClient()
    for _ in range(2):
        response = await client.post(
            "/api/v1/llm/generate", {"messages": [{"role": "user", "content": "Hi"}]},
            content_type="application/json",
        )
        assert response.status_code == 200, response.content
        assert response.json()["content"] == "Hello, world!"
    assert "rate limit not applied" in caplog.text
    await providers.aclose()


@pytest.mark.django_db
async def test_health_reports_a_working_channel_layer_when_redis_answers(settings: Any) -> None:
    from health import probes

    settings.REDIS_URL = "redis://127.0.0.1:6379/0"
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "negotiator.layers.ResilientRedisChannelLayer",
                    "CONFIG": {"hosts": [settings.REDIS_URL]}}
    }
    layer = await probes.channel_layer()
    assert layer == layer | {"status": "ok", "backend": "ResilientRedisChannelLayer"}
    assert layer["latency_ms"] > 0
