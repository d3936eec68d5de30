"""Provider fallback: LLM_FALLBACK_PROVIDERS takes over before the first token, never after."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from django.test import AsyncClient

from llm.local_model import free_port
from llm.providers import providers
from testkit.fake_upstream import FakeUpstream, Reply

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

    def configure(primary_url: str, primary: dict[str, Any] | None = None, **defaults: Any) -> None:
        llm_config(
            fallbacks=["openrouter"],
            lm_studio={"base_url": primary_url, "default_model": "", **(primary or {})},
            openrouter={"base_url": fallback.base_url, "default_model": "backup-model"},
            **{"max_retries": 1, **defaults},
        )

    return configure


async def test_refused_primary_falls_back_and_says_so(
    chain: Callable[..., None], fallback: FakeUpstream
) -> None:
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
        "/api/v1/llm/generate",
        {"messages": [{"role": "user", "content": "Hi"}]},
        content_type="application/json",
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


async def test_every_provider_down_reports_the_last_error(
    chain: Callable[..., None], fallback: FakeUpstream
) -> None:
    fallback.default = Reply(status=502)
    chain(CLOSED, max_retries=0)
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm)
    await comm.disconnect()

    assert (
        len(frames) == 1 and frames[0]["type"] == "error" and frames[0]["code"] == "LLM_UNAVAILABLE"
    )
    session, _ = await session_row(frames[0]["session_id"])
    assert session.status == "failed" and session.provider == "openrouter"
    assert session.tried == [{"provider": "lm_studio", "code": "LLM_UNAVAILABLE"}]


# The other ways a primary is unavailable before its first token (FALLBACK_ERRORS) ---------------

FALLBACK_TEXT = "From the fallback"


async def assert_served_by_fallback(
    tried: list[dict[str, str]], serving: str = "openrouter", timeout: float = 10
) -> dict[str, Any]:
    """One WebSocket generate: served by `serving`, which the start frame, the stored session and
    `GET /api/v1/sessions/{id}` all name, with `tried` as given. The start frame."""
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm, timeout=timeout)
    await comm.disconnect()

    assert_sequence(frames)
    start = frames[0]
    assert start["provider"] == serving and start["model"] == "backup-model", start
    assert start["tried"] == tried, start
    assert text_of(frames) == FALLBACK_TEXT
    session, messages = await session_row(start["session_id"])
    assert (session.provider, session.status, session.tried) == (serving, "completed", tried)
    assert messages[-1] == ("assistant", FALLBACK_TEXT)

    response = await AsyncClient().get(f"/api/v1/sessions/{start['session_id']}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["provider"] == serving and body["status"] == "completed", body
    assert body["tried"] == tried, body
    assert body["messages"][-1]["content"] == FALLBACK_TEXT
    return start


@contextlib.contextmanager
def full_backlog() -> Iterator[str]:
    """A base URL whose listener never accepts and whose backlog is full: the kernel drops
    further SYNs, so a connect hangs until the connect timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.1)  # the handshakes of the fillers settle into the (full) queue
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for sock in [*fillers, listener]:
            sock.close()


@pytest.fixture
async def silent() -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that accepts and reads the request but never sends a byte: (base URL, requests)."""
    received: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(Exception, asyncio.CancelledError):
            received.append(await reader.readuntil(b"\r\n\r\n"))
            await reader.read()  # until the client gives up and closes

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", received
    for writer in writers:
        writer.close()
    server.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(server.wait_closed(), 2)


@pytest.mark.usefixtures("close_clients")  # the API read leaves a connection in the sync thread
async def test_connect_timeout_of_the_primary_falls_back(
    chain: Callable[..., None], fallback: FakeUpstream
) -> None:
    with full_backlog() as primary:
        chain(primary, primary={"default_model": "fake-model"}, connect_timeout=0.3, max_retries=1)
        started = time.monotonic()
        await assert_served_by_fallback([{"provider": "lm_studio", "code": "LLM_TIMEOUT"}])
        elapsed = time.monotonic() - started
    assert elapsed < 4, f"{elapsed:.1f} s: the connect timeout (0.3 s, 2 attempts) did not end it"
    assert len(fallback.chat_requests) == 1


@pytest.mark.usefixtures("close_clients")  # the API read leaves a connection in the sync thread
async def test_read_timeout_before_any_byte_falls_back(
    chain: Callable[..., None], fallback: FakeUpstream, silent: tuple[str, list[bytes]]
) -> None:
    primary, received = silent
    chain(primary, primary={"default_model": "fake-model", "read_timeout": 0.3}, max_retries=1)
    await assert_served_by_fallback([{"provider": "lm_studio", "code": "LLM_TIMEOUT"}])
    # The primary got the chat request itself, twice (its retry), and never answered.
    assert len(received) == 2 and all(
        r.startswith(b"POST /v1/chat/completions") for r in received
    ), received
    assert len(fallback.chat_requests) == 1


@pytest.mark.usefixtures("close_clients")  # the API read leaves a connection in the sync thread
async def test_primary_stalled_before_its_first_token_falls_back(
    chain: Callable[..., None], upstream: FakeUpstream, fallback: FakeUpstream
) -> None:
    """Headers and the role chunk, then only keep-alive comments (which do not reset the idle
    timeout) and never a token: LLM_TIMEOUT, and the fallback answers."""
    upstream.default = Reply(tokens=["never"], stall_after=0, keepalive=0.05)
    chain(upstream.base_url, idle_timeout=0.3, max_retries=0)
    await assert_served_by_fallback([{"provider": "lm_studio", "code": "LLM_TIMEOUT"}])
    assert len(upstream.chat_requests) == 1 and len(fallback.chat_requests) == 1
    assert await upstream.wait_for_disconnects(1)  # the stalled stream was closed, not left open


@pytest.mark.usefixtures("close_clients")  # the API read leaves a connection in the sync thread
async def test_429_primary_falls_back_after_its_retries(
    chain: Callable[..., None], upstream: FakeUpstream, fallback: FakeUpstream
) -> None:
    upstream.default = Reply(status=429)
    chain(upstream.base_url, max_retries=2)
    await assert_served_by_fallback([{"provider": "lm_studio", "code": "LLM_UNAVAILABLE"}])
    assert len(upstream.chat_requests) == 3  # the first attempt and its 2 retries
    assert len(fallback.chat_requests) == 1


@pytest.mark.usefixtures("close_clients")  # the API read leaves a connection in the sync thread
async def test_disabled_primary_falls_back(
    llm_config: Callable[..., Any], fallback: FakeUpstream
) -> None:
    """OpenRouter first but switched off (ProviderDisabled), LM Studio next: LM Studio serves."""
    llm_config(
        provider="openrouter",
        fallbacks=["lm_studio"],
        openrouter={"enabled": False, "base_url": CLOSED},
        lm_studio={"base_url": fallback.base_url, "default_model": "backup-model"},
        max_retries=0,
    )
    await assert_served_by_fallback(
        [{"provider": "openrouter", "code": "LLM_PROVIDER_DISABLED"}], serving="lm_studio"
    )
    assert len(fallback.chat_requests) == 1
    assert "authorization" not in fallback.chat_requests[0].headers  # LM Studio sends no key


@pytest.mark.usefixtures("close_clients")  # the API read leaves a connection in the sync thread
async def test_sessions_api_shows_an_empty_tried_without_fallback(
    chain: Callable[..., None], upstream: FakeUpstream, fallback: FakeUpstream
) -> None:
    chain(upstream.base_url)
    comm = await open_socket()
    await generate(comm)
    frames = await until_end(comm)
    await comm.disconnect()
    assert_sequence(frames)
    assert frames[0]["provider"] == "lm_studio" and "tried" not in frames[0]
    body = (await AsyncClient().get(f"/api/v1/sessions/{frames[0]['session_id']}")).json()
    assert body["provider"] == "lm_studio" and body["tried"] == []
    assert fallback.chat_requests == []
