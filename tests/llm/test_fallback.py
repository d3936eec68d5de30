"""Provider fallback: LLM_FALLBACK_PROVIDERS takes over before the first token, never after."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from django.test import AsyncClient

from llm.local_model import free_port
from llm.providers import providers
from tests.fake_upstream import FakeUpstream, Reply

from .ws_client import assert_sequence, generate, open_socket, session_row, text_of, until_end

pytestmark = pytest.mark.django_db(transaction=True)

CLOSED = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused


@pytest.fixture
async def fallback() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(Reply(tokens=["From", " the", " fallback"], model="backup-model"))
    await fake.start()
    yield fake
    await fake.stop()
    await providers.aclose()


@pytest.fixture
def chain(llm_config: Callable[..., Any], fallback: FakeUpstream) -> Callable[..., None]:
    """lm_studio at `primary_url` first, then openrouter at the fallback fake."""

    def configure(primary_url: str, **defaults: Any) -> None:
        llm_config(
            fallbacks=["openrouter"],
            lm_studio={"base_url": primary_url, "default_model": ""},
            openrouter={"base_url": fallback.base_url, "default_model": "backup-model"},
            **{"max_retries": 1, **defaults},
        )

    return configure


async def test_refused_primary_falls_back_and_says_so(chain: Callable[..., None], fallback: FakeUpstream) -> None:
    chain(CLOSED)
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm)
    await comm.disconnect()

    assert_sequence(frames)
    start = frames[0]
    assert start["provider"] == "openrouter" and start["model"] == "backup-model"
    assert start["tried"] == [{"provider": "lm_studio", "code": "LLM_UNAVAILABLE"}]
    assert text_of(frames) == "From the fallback"
    session, _ = await session_row(start["session_id"])
    assert session.provider == "openrouter" and session.status == "completed"
    assert session.tried == [{"provider": "lm_studio", "code": "LLM_UNAVAILABLE"}]
    assert fallback.chat_requests[-1].headers["authorization"].startswith("Bearer ")


async def test_5xx_primary_falls_back_after_its_retries(
    chain: Callable[..., None], upstream: FakeUpstream, fallback: FakeUpstream
) -> None:
    upstream.default = Reply(status=503)
    chain(upstream.base_url, max_retries=2)
    client = AsyncClient()
    response = await client.post(
        "/api/v1/llm/generate", {"messages": [{"role": "user", "content": "Hi"}]}, content_type="application/json"
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["provider"] == "openrouter" and body["content"] == "From the fallback"
    assert len(upstream.chat_requests) == 3  # the first attempt and its 2 retries
    assert len(fallback.chat_requests) == 1


async def test_no_fallback_after_the_first_token(
    chain: Callable[..., None], upstream: FakeUpstream, fallback: FakeUpstream
) -> None:
    upstream.default = Reply(tokens=["one", " two", " three"], cut_after=2)
    chain(upstream.base_url)
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm)
    await comm.disconnect()

    assert [f["type"] for f in frames][-1] == "error"
    assert frames[-1]["code"] == "LLM_BAD_GATEWAY"
    assert text_of(frames) == "one two"
    assert "tried" not in frames[0]
    assert fallback.chat_requests == []


async def test_no_fallback_when_the_upstream_refuses_the_request(
    chain: Callable[..., None], upstream: FakeUpstream, fallback: FakeUpstream
) -> None:
    upstream.default = Reply(status=400)
    chain(upstream.base_url)
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm)
    await comm.disconnect()

    assert frames == [frames[-1]] and frames[-1]["code"] == "LLM_BAD_REQUEST"
    assert fallback.chat_requests == []


async def test_every_provider_down_reports_the_last_error(chain: Callable[..., None], fallback: FakeUpstream) -> None:
    fallback.default = Reply(status=502)
    chain(CLOSED, max_retries=0)
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm)
    await comm.disconnect()

    assert len(frames) == 1 and frames[0]["type"] == "error" and frames[0]["code"] == "LLM_UNAVAILABLE"
    session, _ = await session_row(frames[0]["session_id"])
    assert session.status == "failed" and session.provider == "openrouter"
    assert session.tried == [{"provider": "lm_studio", "code": "LLM_UNAVAILABLE"}]
