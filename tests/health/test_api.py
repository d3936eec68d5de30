"""`GET /api/v1/health` (healthy / degraded / unhealthy, bounded probes) and
`GET /api/v1/llm/status`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from django.db import OperationalError
from django.test import AsyncClient

from health import probes
from negotiator import __version__
from tests.conftest import OPENROUTER, OPENROUTER_KEY, UPSTREAM

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("close_clients")]

MODELS = {
    "object": "list",
    "data": [{"id": "test-model", "object": "model"}, {"id": "other-model"}],
}


def assert_error(error: Any, code: str) -> None:
    assert isinstance(error, dict)
    assert set(error) == {"code", "message"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


async def get(path: str) -> tuple[int, dict[str, Any], bytes]:
    response = await AsyncClient().get(path)
    assert response["Content-Type"].startswith("application/json")
    return response.status_code, response.json(), response.content


async def hang(request: httpx.Request) -> httpx.Response:
    await asyncio.sleep(10)
    return httpx.Response(200, json=MODELS)


def break_database(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(alias: str) -> None:
        raise OperationalError("could not connect to server: Connection refused")

    monkeypatch.setattr(probes, "_select_one", refuse)


# /health -------------------------------------------------------------------------------------


async def test_health_healthy(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    models = respx_mock.get(f"{UPSTREAM}/models").respond(json=MODELS)
    status, body, _ = await get("/api/v1/health")
    assert status == 200
    assert body["status"] == "healthy"
    assert body["version"] == __version__
    database, llm = body["checks"]["database"], body["checks"]["llm"]
    assert database["status"] == "ok"
    assert database["engine"] == "sqlite" or database["engine"] == "postgresql"
    assert isinstance(database["latency_ms"], int | float) and database["latency_ms"] >= 0
    assert llm["status"] == "ok"
    assert llm["provider"] == "lm_studio"
    assert llm["reachable"] is True
    assert isinstance(llm["latency_ms"], int | float) and llm["latency_ms"] >= 0
    assert llm.get("error") is None
    assert models.call_count == 1


async def test_health_degraded_when_the_provider_refuses(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    respx_mock.get(f"{UPSTREAM}/models").mock(side_effect=httpx.ConnectError("Connection refused"))
    status, body, _ = await get("/api/v1/health")
    assert status == 200
    assert body["status"] == "degraded"
    assert body["checks"]["database"]["status"] == "ok"
    llm = body["checks"]["llm"]
    assert llm["status"] == "error"
    assert llm["reachable"] is False
    assert llm["latency_ms"] is None
    assert_error(llm["error"], "LLM_UNAVAILABLE")


async def test_health_degraded_pings_once_without_retries(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(max_retries=3)
    route = respx_mock.get(f"{UPSTREAM}/models").respond(500, json={"error": "boom"})
    status, body, _ = await get("/api/v1/health")
    assert status == 200
    assert body["status"] == "degraded"
    assert_error(body["checks"]["llm"]["error"], "LLM_UNAVAILABLE")
    assert route.call_count == 1


async def test_health_unhealthy_when_the_database_fails(
    llm_config: Callable[..., Any], respx_mock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    respx_mock.get(f"{UPSTREAM}/models").respond(json=MODELS)
    break_database(monkeypatch)
    status, body, content = await get("/api/v1/health")
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["version"] == __version__
    database = body["checks"]["database"]
    assert database["status"] == "error"
    assert database["latency_ms"] is None
    assert database["error"]["code"]
    assert "Connection refused" in database["error"]["message"]
    assert b"Traceback" not in content
    # The provider is still reported, so an operator sees both.
    assert body["checks"]["llm"]["reachable"] is True


async def test_health_unhealthy_when_both_are_down(
    llm_config: Callable[..., Any], respx_mock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    respx_mock.get(f"{UPSTREAM}/models").mock(side_effect=httpx.ConnectError("refused"))
    break_database(monkeypatch)
    status, body, _ = await get("/api/v1/health")
    assert status == 503
    assert body["status"] == "unhealthy"
    assert_error(body["checks"]["llm"]["error"], "LLM_UNAVAILABLE")


async def test_a_hung_provider_does_not_hang_health(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(ping_timeout=0.3)
    respx_mock.get(f"{UPSTREAM}/models").mock(side_effect=hang)
    started = time.monotonic()
    status, body, _ = await asyncio.wait_for(get("/api/v1/health"), timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"/health took {elapsed:.2f} s with a 0.3 s ping timeout"
    assert status == 200
    assert body["status"] == "degraded"
    assert body["checks"]["database"]["status"] == "ok"
    assert_error(body["checks"]["llm"]["error"], "LLM_TIMEOUT")


async def test_probes_run_concurrently(
    llm_config: Callable[..., Any], respx_mock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow database (0.5 s) and a slow provider (0.5 s) answer in about 0.5 s, not 1 s."""

    async def slow_models(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.5)
        return httpx.Response(200, json=MODELS)

    original = probes._select_one

    def slow_select(alias: str) -> None:
        time.sleep(0.5)
        original(alias)

    respx_mock.get(f"{UPSTREAM}/models").mock(side_effect=slow_models)
    monkeypatch.setattr(probes, "_select_one", slow_select)
    started = time.monotonic()
    status, body, _ = await get("/api/v1/health")
    elapsed = time.monotonic() - started
    assert status == 200 and body["status"] == "healthy"
    assert elapsed < 0.9, f"probes ran one after the other ({elapsed:.2f} s)"


async def test_a_hung_database_probe_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The database probe has its own timeout: a stuck query reports an error instead of waiting.

    (Called directly: Django's test client runs its own end-of-request database clean-up in the
    same thread as the stuck query, so through the client it would wait for the query anyway.)
    """

    def stuck(alias: str) -> None:
        time.sleep(0.6)

    monkeypatch.setattr(probes, "_select_one", stuck)
    started = time.monotonic()
    result = await probes.database(timeout=0.2)
    assert time.monotonic() - started < 0.45
    assert result["status"] == "error"
    assert result["latency_ms"] is None
    assert result["error"]["code"] == "DATABASE_TIMEOUT"
    await asyncio.sleep(0.5)  # let the stuck thread finish before the test database is torn down


# /llm/status ---------------------------------------------------------------------------------


async def test_llm_status_reachable(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    respx_mock.get(f"{UPSTREAM}/models").respond(json=MODELS)
    status, body, _ = await get("/api/v1/llm/status")
    assert status == 200
    assert set(body) == {
        "provider",
        "base_url",
        "reachable",
        "latency_ms",
        "models",
        "error",
        "database",
    }
    assert body["provider"] == "lm_studio"
    assert body["base_url"] == UPSTREAM
    assert body["reachable"] is True
    assert isinstance(body["latency_ms"], int | float) and body["latency_ms"] >= 0
    assert body["models"] == ["test-model", "other-model"]
    assert body["error"] is None
    assert body["database"]["status"] == "ok"


async def test_llm_status_unreachable(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    respx_mock.get(f"{UPSTREAM}/models").mock(side_effect=httpx.ConnectError("Connection refused"))
    status, body, _ = await get("/api/v1/llm/status")
    assert status == 200
    assert body["provider"] == "lm_studio"
    assert body["base_url"] == UPSTREAM
    assert body["reachable"] is False
    assert body["latency_ms"] is None
    assert body["models"] == []
    assert_error(body["error"], "LLM_UNAVAILABLE")


async def test_llm_status_upstream_bad_json(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    respx_mock.get(f"{UPSTREAM}/models").respond(200, content=b"<html>not json</html>")
    status, body, _ = await get("/api/v1/llm/status")
    assert status == 200
    assert body["reachable"] is False
    assert_error(body["error"], "LLM_BAD_GATEWAY")


async def test_llm_status_openrouter_never_shows_the_key(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(provider="openrouter")
    route = respx_mock.get(f"{OPENROUTER}/models").respond(
        json={"data": [{"id": "openrouter/auto"}]}
    )
    status, body, content = await get("/api/v1/llm/status")
    assert status == 200
    assert body["provider"] == "openrouter"
    assert body["base_url"] == OPENROUTER
    assert body["reachable"] is True
    assert body["models"] == ["openrouter/auto"]
    # The key was used upstream, and appears nowhere in the answer.
    assert route.calls.last.request.headers["Authorization"] == f"Bearer {OPENROUTER_KEY}"
    assert OPENROUTER_KEY.encode() not in content
    assert b"TESTKEY" not in content
    assert not any("key" in name.lower() for name in body)


async def test_llm_status_openrouter_error_echoing_the_key_is_redacted(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(provider="openrouter")
    respx_mock.get(f"{OPENROUTER}/models").respond(
        401, json={"error": {"message": f"Invalid API key {OPENROUTER_KEY}", "code": 401}}
    )
    for path in ("/api/v1/llm/status", "/api/v1/health"):
        status, body, content = await get(path)
        assert status == 200, path
        assert OPENROUTER_KEY.encode() not in content, path
        assert b"TESTKEY" not in content, path
    status, body, _ = await get("/api/v1/llm/status")
    assert body["reachable"] is False
    assert_error(body["error"], "LLM_BAD_REQUEST")


async def test_llm_status_openrouter_disabled(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(provider="openrouter", openrouter={"enabled": False})
    status, body, content = await get("/api/v1/llm/status")
    assert status == 200
    assert body["provider"] == "openrouter"
    assert body["reachable"] is False
    assert_error(body["error"], "LLM_PROVIDER_DISABLED")
    assert OPENROUTER_KEY.encode() not in content
    assert not respx_mock.calls  # a disabled provider is never called


async def test_llm_status_with_the_database_down(
    llm_config: Callable[..., Any], respx_mock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    respx_mock.get(f"{UPSTREAM}/models").respond(json=MODELS)
    break_database(monkeypatch)
    status, body, _ = await get("/api/v1/llm/status")
    assert status == 200
    assert body["reachable"] is True
    assert body["database"]["status"] == "error"


async def test_a_hung_provider_does_not_hang_llm_status(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(ping_timeout=0.3)
    respx_mock.get(f"{UPSTREAM}/models").mock(side_effect=hang)
    started = time.monotonic()
    status, body, _ = await asyncio.wait_for(get("/api/v1/llm/status"), timeout=5)
    assert time.monotonic() - started < 1.0
    assert status == 200
    assert body["reachable"] is False
    assert_error(body["error"], "LLM_TIMEOUT")
