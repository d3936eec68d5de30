"""The OpenAI-compatible providers against respx-mocked upstreams (LM Studio flavour).

Every test here asserts something that fails when the behaviour is missing: ping, model
resolution, generate(), stream() (SSE parsing, usage, reported model), retries and backoff,
Retry-After, timeouts (idle, stall after the first token, a real read timeout), closing the
upstream response, and the provider manager. OpenRouter specifics are in
`test_providers_openrouter.py`, which reuses the helpers below.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import respx
from django.core.exceptions import ImproperlyConfigured

from llm.exceptions import LLMError
from llm.providers import ProviderManager, get_provider, providers
from llm.providers.lm_studio import LMStudioProvider
from llm.providers.openrouter import OpenRouterProvider
from llm.types import ChatRequest, StreamChunk
from tests.conftest import UPSTREAM

MODELS_URL = f"{UPSTREAM}/models"
CHAT_URL = f"{UPSTREAM}/chat/completions"
SERVED = "served-model"  # what the upstream says it runs, whatever name was asked for
SSE_HEADERS = {"content-type": "text/event-stream"}
HI = ChatRequest(messages=[{"role": "user", "content": "Hi"}])


# Helpers: SSE bodies, byte streams, collecting a stream --------------------------------------


def chunk(
    text: str | None = None,
    *,
    finish: str | None = None,
    model: str = SERVED,
    usage: dict[str, int] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One `chat.completion.chunk` with a text delta and/or a finish reason."""
    choice: dict[str, Any] = {
        "index": 0,
        "delta": {} if text is None else {"role": "assistant", "content": text},
        "finish_reason": finish,
    }
    payload: dict[str, Any] = {
        "id": "cmpl-1",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [choice],
        **extra,
    }
    if usage is not None:
        payload["usage"] = usage
    return payload


def usage_chunk(prompt: int, completion: int, *, model: str = SERVED) -> dict[str, Any]:
    """The trailing chunk `stream_options.include_usage` asks for: no choices, only usage."""
    return {
        "id": "cmpl-1",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def comment(text: str = "OPENROUTER PROCESSING") -> bytes:
    return f": {text}\n\n".encode()


DONE = b"data: [DONE]\n\n"


def sse_events(
    *texts: str,
    finish: str | None = "stop",
    usage: tuple[int, int] | None = None,
    done: bool = True,
    model: str = SERVED,
) -> list[bytes]:
    """Events of a reply: one chunk per text, a finish chunk, an optional usage chunk, [DONE]."""
    events = [event(chunk(text, model=model)) for text in texts]
    if finish:
        events.append(event(chunk(finish=finish, model=model)))
    if usage:
        events.append(event(usage_chunk(*usage, model=model)))
    if done:
        events.append(DONE)
    return events


class Pieces(httpx.AsyncByteStream):
    """A response body delivered piece by piece: bytes are sent, a number sleeps that many
    seconds, an exception is raised (a cut connection). Records whether it was closed."""

    def __init__(self, *parts: bytes | float | BaseException) -> None:
        self.parts = parts
        self.sent = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, BaseException):
                raise part
            if isinstance(part, int | float):
                await asyncio.sleep(part)
                continue
            self.sent += 1
            yield part

    async def aclose(self) -> None:
        self.closed = True


class KeepAlive(httpx.AsyncByteStream):
    """Sends `first`, then an SSE keep-alive comment every `every` seconds, forever."""

    def __init__(self, *first: bytes, every: float = 0.05) -> None:
        self.first = first
        self.every = every
        self.comments = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.first:
            yield part
        while True:
            await asyncio.sleep(self.every)
            self.comments += 1
            yield comment("keep-alive")

    async def aclose(self) -> None:
        self.closed = True


def sse_response(*parts: bytes | float | BaseException) -> httpx.Response:
    return httpx.Response(200, headers=SSE_HEADERS, stream=Pieces(*parts))


def models_response(*ids: str) -> httpx.Response:
    return httpx.Response(
        200, json={"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}
    )


def completion_response(
    content: str = "Hello there",
    *,
    finish: str = "stop",
    model: str = SERVED,
    usage: dict[str, int] | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return httpx.Response(200, json=body)


def error_response(
    status: int, message: str = "upstream says no", **headers: str
) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message}}, headers=headers)


def sent_json(route: respx.Route, index: int = -1) -> dict[str, Any]:
    return json.loads(route.calls[index].request.content)


async def run_stream(
    provider: Any, request: ChatRequest = HI
) -> tuple[list[StreamChunk], LLMError | None]:
    """Everything the caller received, and the error that ended the stream (if any)."""
    received: list[StreamChunk] = []
    try:
        async for piece in provider.stream(request):
            received.append(piece)
    except LLMError as exc:
        return received, exc
    return received, None


def texts(chunks: list[StreamChunk]) -> list[str]:
    return [c.text for c in chunks if c.text]


@pytest.fixture
def lm(llm_config: Callable[..., dict[str, Any]]) -> Callable[..., LMStudioProvider]:
    """`lm(**options)` configures (options as `llm_config` takes them) and returns lm_studio."""

    def build(**options: Any) -> LMStudioProvider:
        if options:
            llm_config(**options)
        provider = get_provider("lm_studio")
        assert isinstance(provider, LMStudioProvider)
        return provider

    return build


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await providers.aclose()


# ping -------------------------------------------------------------------------------------------


async def test_ping_lists_models_and_measures_latency(respx_mock: respx.MockRouter, lm) -> None:
    async def slow_models(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return models_response("qwen-7b", "smollm2")

    route = respx_mock.get(MODELS_URL).mock(side_effect=slow_models)
    result = await lm().ping()
    assert result.reachable is True
    assert result.models == ["qwen-7b", "smollm2"]
    assert result.error is None
    assert result.latency_ms is not None and 50 <= result.latency_ms < 1000
    assert result.provider == "lm_studio" and result.base_url == UPSTREAM
    assert route.call_count == 1


async def test_ping_connection_refused_is_unavailable_without_retry(
    respx_mock: respx.MockRouter, lm
) -> None:
    route = respx_mock.get(MODELS_URL).mock(side_effect=httpx.ConnectError("Connection refused"))
    result = await lm(max_retries=3).ping()
    assert result.reachable is False
    assert result.latency_ms is None and result.models == []
    assert result.error is not None and result.error["code"] == "LLM_UNAVAILABLE"
    assert route.call_count == 1


async def test_ping_server_error_is_not_retried(respx_mock: respx.MockRouter, lm) -> None:
    route = respx_mock.get(MODELS_URL).mock(return_value=error_response(500))
    result = await lm(max_retries=3).ping()
    assert result.reachable is False and result.error["code"] == "LLM_UNAVAILABLE"
    assert route.call_count == 1


async def test_ping_hung_models_times_out_within_ping_timeout(
    respx_mock: respx.MockRouter, lm
) -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return models_response("never")

    respx_mock.get(MODELS_URL).mock(side_effect=hang)
    provider = lm(ping_timeout=0.2)
    started = time.perf_counter()
    async with asyncio.timeout(
        2
    ):  # fail fast, not after the whole hang, if ping_timeout is ignored
        result = await provider.ping()
    elapsed = time.perf_counter() - started
    assert result.reachable is False
    assert result.error is not None and result.error["code"] == "LLM_TIMEOUT"
    assert 0.15 <= elapsed < 0.8


# resolve_model ----------------------------------------------------------------------------------


async def test_explicit_model_wins_and_models_not_listed(respx_mock: respx.MockRouter, lm) -> None:
    models = respx_mock.get(MODELS_URL).mock(return_value=models_response("listed"))
    chat = respx_mock.post(CHAT_URL).mock(return_value=completion_response())
    await lm().generate(ChatRequest(messages=HI.messages, model="explicit-model"))
    assert sent_json(chat)["model"] == "explicit-model"
    assert models.call_count == 0


async def test_default_model_used_when_request_names_none(respx_mock: respx.MockRouter, lm) -> None:
    models = respx_mock.get(MODELS_URL).mock(return_value=models_response("listed"))
    chat = respx_mock.post(CHAT_URL).mock(return_value=completion_response())
    await lm(lm_studio={"default_model": "configured-default"}).generate(HI)
    assert sent_json(chat)["model"] == "configured-default"
    assert models.call_count == 0


async def test_first_listed_model_used_and_cached(respx_mock: respx.MockRouter, lm) -> None:
    models = respx_mock.get(MODELS_URL).mock(
        return_value=models_response("first-model", "second-model")
    )
    chat = respx_mock.post(CHAT_URL).mock(
        side_effect=lambda request: sse_response(*sse_events("ok"))
    )
    provider = lm(lm_studio={"default_model": ""})
    for _ in range(2):
        received, error = await run_stream(provider)
        assert error is None and texts(received) == ["ok"]
    assert chat.call_count == 2
    assert [sent_json(chat, i)["model"] for i in range(2)] == ["first-model", "first-model"]
    assert models.call_count == 1


async def test_empty_model_list_is_bad_gateway(respx_mock: respx.MockRouter, lm) -> None:
    respx_mock.get(MODELS_URL).mock(return_value=models_response())
    chat = respx_mock.post(CHAT_URL).mock(return_value=completion_response())
    with pytest.raises(LLMError) as info:
        await lm(lm_studio={"default_model": ""}).generate(HI)
    assert info.value.code == "LLM_BAD_GATEWAY"
    assert chat.call_count == 0


# generate() -------------------------------------------------------------------------------------


async def test_generate_parses_reply_with_upstream_usage(respx_mock: respx.MockRouter, lm) -> None:
    respx_mock.post(CHAT_URL).mock(
        return_value=completion_response(
            "Hello there",
            finish="length",
            model=SERVED,
            usage={"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
        )
    )
    result = await lm().generate(ChatRequest(messages=HI.messages, model="asked-for"))
    assert result.content == "Hello there"
    assert result.finish_reason == "length"
    assert result.model == SERVED
    assert result.provider == "lm_studio"
    assert (
        result.usage.prompt_tokens,
        result.usage.completion_tokens,
        result.usage.total_tokens,
    ) == (11, 2, 13)
    assert result.usage.estimated is False


async def test_generate_estimates_usage_when_upstream_sends_none(
    respx_mock: respx.MockRouter, lm
) -> None:
    respx_mock.post(CHAT_URL).mock(return_value=completion_response("Hello there, how are you?"))
    usage = (await lm().generate(HI)).usage
    assert usage.estimated is True
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_generate_payload_defaults(respx_mock: respx.MockRouter, lm) -> None:
    chat = respx_mock.post(CHAT_URL).mock(return_value=completion_response())
    await lm(max_tokens=77).generate(HI)
    payload = sent_json(chat)
    assert payload["max_tokens"] == 77  # LLM_MAX_TOKENS when the request gives none
    assert "temperature" not in payload
    assert payload["stream"] is False
    assert payload["messages"] == HI.messages
    assert payload["model"] == "test-model"


async def test_generate_payload_takes_request_values(respx_mock: respx.MockRouter, lm) -> None:
    chat = respx_mock.post(CHAT_URL).mock(return_value=completion_response())
    await lm(max_tokens=77).generate(
        ChatRequest(messages=HI.messages, max_tokens=5, temperature=0.25)
    )
    payload = sent_json(chat)
    assert payload["max_tokens"] == 5
    assert payload["temperature"] == 0.25


async def test_generate_request_carries_configured_timeouts(
    respx_mock: respx.MockRouter, lm
) -> None:
    chat = respx_mock.post(CHAT_URL).mock(return_value=completion_response())
    await lm(connect_timeout=1.5, lm_studio={"read_timeout": 4.5}).generate(HI)
    timeout = chat.calls.last.request.extensions["timeout"]
    assert timeout["connect"] == 1.5  # LLM_CONNECT_TIMEOUT
    assert timeout["read"] == 4.5  # LM_STUDIO_TIMEOUT


async def test_lm_studio_sends_no_authorization(respx_mock: respx.MockRouter, lm) -> None:
    chat = respx_mock.post(CHAT_URL).mock(return_value=completion_response())
    await lm().generate(HI)
    assert "authorization" not in chat.calls.last.request.headers


# stream(): parsing --------------------------------------------------------------------------------


async def test_stream_yields_text_in_order_then_one_final_chunk(
    respx_mock: respx.MockRouter, lm
) -> None:
    respx_mock.post(CHAT_URL).mock(return_value=sse_response(*sse_events("Hel", "lo", " world")))
    received, error = await run_stream(lm())
    assert error is None
    assert [c.text for c in received[:-1]] == ["Hel", "lo", " world"]
    assert all(c.finish_reason is None for c in received[:-1])
    final = received[-1]
    assert final.text == "" and final.finish_reason == "stop" and final.usage is not None


async def test_stream_payload_asks_for_usage(respx_mock: respx.MockRouter, lm) -> None:
    chat = respx_mock.post(CHAT_URL).mock(return_value=sse_response(*sse_events("x")))
    await run_stream(lm(max_tokens=33))
    payload = sent_json(chat)
    assert payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert payload["max_tokens"] == 33
    assert "temperature" not in payload


async def test_stream_ignores_comment_lines(respx_mock: respx.MockRouter, lm) -> None:
    events = sse_events("a", "b")
    body = [comment(), events[0], comment(), comment("keep-alive"), *events[1:]]
    respx_mock.post(CHAT_URL).mock(return_value=sse_response(*body))
    received, error = await run_stream(lm())
    assert error is None
    assert [c.text for c in received] == ["a", "b", ""]
    assert received[-1].finish_reason == "stop"


async def test_stream_events_split_across_reads(respx_mock: respx.MockRouter, lm) -> None:
    body = b"".join(sse_events("Hello", ", ", "wörld", usage=(4, 3)))
    # Cut mid-line, mid-JSON, inside a multi-byte character, between the two newlines.
    cuts = sorted(
        {
            3,
            17,
            40,
            body.index("ö".encode()) + 1,
            body.index(b"\n\n") + 1,
            *range(60, len(body), 13),
        }
    )
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert b"".join(pieces) == body and len(pieces) > 8
    respx_mock.post(CHAT_URL).mock(return_value=sse_response(*pieces))
    received, error = await run_stream(lm())
    assert error is None
    assert texts(received) == ["Hello", ", ", "wörld"]
    assert received[-1].finish_reason == "stop"
    usage = received[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 3 and usage.estimated is False


async def test_stream_stops_at_done(respx_mock: respx.MockRouter, lm) -> None:
    body = [*sse_events("one"), event(chunk("AFTER-DONE")), event("not json")]
    respx_mock.post(CHAT_URL).mock(return_value=sse_response(*body))
    received, error = await run_stream(lm())
    assert error is None
    assert texts(received) == ["one"]
    assert received[-1].finish_reason == "stop"


async def test_stream_usage_chunk_after_finish_is_upstream_usage(
    respx_mock: respx.MockRouter, lm
) -> None:
    respx_mock.post(CHAT_URL).mock(return_value=sse_response(*sse_events("a", "b", usage=(21, 2))))
    received, error = await run_stream(lm())
    assert error is None
    final = received[-1]
    assert final.finish_reason == "stop"
    usage = final.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (21, 2, 23)
    assert usage.estimated is False


async def test_stream_without_usage_is_estimated_from_chunks(
    respx_mock: respx.MockRouter, lm
) -> None:
    respx_mock.post(CHAT_URL).mock(return_value=sse_response(*sse_events("a", "bb", "ccc", "dddd")))
    received, error = await run_stream(lm())
    assert error is None
    usage = received[-1].usage
    assert usage is not None
    assert usage.estimated is True
    assert usage.completion_tokens == 4  # one per content chunk
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + 4


async def test_stream_chunks_carry_the_model_upstream_reports(
    respx_mock: respx.MockRouter, lm
) -> None:
    respx_mock.post(CHAT_URL).mock(
        return_value=sse_response(*sse_events("a", "b", model="loaded-qwen"))
    )
    received, error = await run_stream(lm(), ChatRequest(messages=HI.messages, model="asked-for"))
    assert error is None
    assert [c.model for c in received] == ["loaded-qwen"] * 3


async def test_stream_finish_chunk_with_text_keeps_the_text(
    respx_mock: respx.MockRouter, lm
) -> None:
    body = [event(chunk("a")), event(chunk("b", finish="length")), DONE]
    respx_mock.post(CHAT_URL).mock(return_value=sse_response(*body))
    received, error = await run_stream(lm())
    assert error is None
    assert texts(received) == ["a", "b"]
    assert received[-1].finish_reason == "length"


async def test_stream_answered_with_json_not_sse_is_bad_gateway(
    respx_mock: respx.MockRouter, lm
) -> None:
    respx_mock.post(CHAT_URL).mock(return_value=completion_response())
    received, error = await run_stream(lm())
    assert received == []
    assert error is not None and error.code == "LLM_BAD_GATEWAY"


# Retries ------------------------------------------------------------------------------------------

RETRIED = [
    pytest.param(httpx.ConnectError("Connection refused"), "LLM_UNAVAILABLE", id="connect-error"),
    pytest.param(httpx.ConnectTimeout("connect timed out"), "LLM_TIMEOUT", id="connect-timeout"),
    pytest.param(httpx.ReadTimeout("read timed out"), "LLM_TIMEOUT", id="read-timeout"),
    pytest.param(408, "LLM_TIMEOUT", id="408"),
    pytest.param(429, "LLM_UNAVAILABLE", id="429"),
    pytest.param(500, "LLM_UNAVAILABLE", id="500"),
    pytest.param(502, "LLM_UNAVAILABLE", id="502"),
    pytest.param(503, "LLM_UNAVAILABLE", id="503"),
]


def failing(failure: int | httpx.RequestError) -> Callable[[httpx.Request], httpx.Response]:
    def side_effect(request: httpx.Request) -> httpx.Response:
        if isinstance(failure, Exception):
            raise type(failure)(str(failure), request=request)
        return error_response(failure)

    return side_effect


async def call(provider: Any, method: str) -> None:
    """Run `generate` or a whole `stream`, raising what it raises."""
    if method == "generate":
        await provider.generate(HI)
    else:
        async for _ in provider.stream(HI):
            pass


@pytest.mark.parametrize("method", ["generate", "stream"])
@pytest.mark.parametrize(("failure", "code"), RETRIED)
async def test_retryable_failures_are_retried_then_mapped(
    respx_mock: respx.MockRouter, lm, method: str, failure: int | httpx.RequestError, code: str
) -> None:
    route = respx_mock.post(CHAT_URL).mock(side_effect=failing(failure))
    with pytest.raises(LLMError) as info:
        await call(lm(max_retries=2), method)
    assert route.call_count == 3  # the first attempt and max_retries retries
    assert info.value.code == code


async def test_list_models_is_retried(respx_mock: respx.MockRouter, lm) -> None:
    route = respx_mock.get(MODELS_URL).mock(side_effect=[error_response(503), models_response("m")])
    assert await lm(max_retries=2).list_models() == ["m"]
    assert route.call_count == 2


@pytest.mark.parametrize("method", ["generate", "stream"])
@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_client_errors_are_not_retried(
    respx_mock: respx.MockRouter, lm, method: str, status: int
) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        return_value=error_response(status, "model 'nope' is not loaded")
    )
    with pytest.raises(LLMError) as info:
        await call(lm(max_retries=3), method)
    assert route.call_count == 1
    assert info.value.code == "LLM_BAD_REQUEST"
    assert "model 'nope' is not loaded" in info.value.message


async def test_generate_succeeds_after_two_failures(respx_mock: respx.MockRouter, lm) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=[
            error_response(503),
            httpx.ConnectError("refused"),
            completion_response("finally"),
        ]
    )
    result = await lm(max_retries=3).generate(HI)
    assert result.content == "finally"
    assert route.call_count == 3


async def test_stream_succeeds_after_a_503(respx_mock: respx.MockRouter, lm) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=[
            error_response(503),
            sse_response(*sse_events("good", " stream")),
        ]
    )
    received, error = await run_stream(lm(max_retries=3))
    assert error is None
    assert texts(received) == ["good", " stream"]
    assert received[-1].finish_reason == "stop"
    assert route.call_count == 2


# Backoff and Retry-After --------------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the provider sleeps between attempts (instantly)."""
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, *args: Any, **kwargs: Any) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr("llm.providers.base.asyncio.sleep", fake_sleep)
    return delays


async def test_backoff_is_exponential_with_jitter(
    respx_mock: respx.MockRouter, lm, sleeps: list[float]
) -> None:
    route = respx_mock.post(CHAT_URL).mock(side_effect=failing(503))
    provider = lm(max_retries=3, retry_delay=1)
    firsts = []
    for _ in range(8):
        sleeps.clear()
        with pytest.raises(LLMError):
            await provider.generate(HI)
        assert len(sleeps) == 3
        assert 0.5 <= sleeps[0] <= 1
        assert 1 <= sleeps[1] <= 2
        assert 2 <= sleeps[2] <= 4
        firsts.append(sleeps[0])
    assert len(set(firsts)) > 1  # jitter: not the same delay every time
    assert route.call_count == 8 * 4


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_seconds_is_honoured(
    respx_mock: respx.MockRouter, lm, sleeps: list[float], status: int
) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=[
            error_response(status, **{"Retry-After": "7"}),
            completion_response("ok"),
        ]
    )
    result = await lm(retry_delay=1).generate(HI)
    assert result.content == "ok"
    assert sleeps == [7]
    assert route.call_count == 2


async def test_retry_after_is_honoured_by_stream(
    respx_mock: respx.MockRouter, lm, sleeps: list[float]
) -> None:
    respx_mock.post(CHAT_URL).mock(
        side_effect=[
            error_response(503, **{"Retry-After": "3"}),
            sse_response(*sse_events("ok")),
        ]
    )
    received, error = await run_stream(lm(retry_delay=1))
    assert error is None and texts(received) == ["ok"]
    assert sleeps == [3]


async def test_retry_after_http_date_is_honoured(
    respx_mock: respx.MockRouter, lm, sleeps: list[float]
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=5), usegmt=True)
    respx_mock.post(CHAT_URL).mock(
        side_effect=[
            error_response(503, **{"Retry-After": when}),
            completion_response("ok"),
        ]
    )
    await lm(retry_delay=1).generate(HI)
    assert len(sleeps) == 1
    assert 3.5 <= sleeps[0] <= 5.5  # the date has one-second resolution


@pytest.mark.parametrize("method", ["generate", "stream"])
async def test_retry_after_over_the_maximum_fails_at_once(
    respx_mock: respx.MockRouter, lm, sleeps: list[float], method: str
) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=lambda request: error_response(503, **{"Retry-After": "120"})
    )
    with pytest.raises(LLMError) as info:
        await call(lm(max_retries=3, retry_after_max=60), method)
    assert route.call_count == 1
    assert sleeps == []
    assert info.value.code == "LLM_UNAVAILABLE"
    assert "120" in info.value.message


# stream(): failures after the first token ---------------------------------------------------------


@pytest.mark.parametrize(
    "cut",
    [httpx.RemoteProtocolError("peer closed connection"), httpx.ReadError("reset")],
    ids=["remote-protocol-error", "read-error"],
)
async def test_cut_stream_after_first_token_is_not_retried(
    respx_mock: respx.MockRouter, lm, cut: Exception
) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=lambda request: sse_response(event(chunk("Hel")), cut)
    )
    received, error = await run_stream(lm(max_retries=3))
    assert texts(received) == ["Hel"]
    assert error is not None and error.code == "LLM_BAD_GATEWAY"
    assert route.call_count == 1


async def test_read_timeout_after_first_token_is_timeout_not_retried(
    respx_mock: respx.MockRouter, lm
) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=lambda request: sse_response(
            event(chunk("Hel")), httpx.ReadTimeout("timed out")
        )
    )
    received, error = await run_stream(lm(max_retries=3))
    assert texts(received) == ["Hel"]
    assert error is not None and error.code == "LLM_TIMEOUT"
    assert route.call_count == 1


@pytest.mark.parametrize("done", [False, True], ids=["eof", "done"])
@pytest.mark.parametrize("tokens", [(), ("partial",)], ids=["no-token", "after-token"])
async def test_stream_without_finish_reason_is_bad_gateway(
    respx_mock: respx.MockRouter, lm, done: bool, tokens: tuple[str, ...]
) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=lambda request: sse_response(*sse_events(*tokens, finish=None, done=done))
    )
    received, error = await run_stream(lm(max_retries=3))
    assert texts(received) == list(tokens)
    assert all(c.finish_reason is None for c in received)
    assert error is not None and error.code == "LLM_BAD_GATEWAY"
    if tokens:
        assert route.call_count == 1


async def test_invalid_json_mid_stream_is_bad_gateway(respx_mock: respx.MockRouter, lm) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=lambda request: sse_response(
            event(chunk("ok")), event('{"choices": [{"delta": '), DONE
        )
    )
    received, error = await run_stream(lm(max_retries=3))
    assert texts(received) == ["ok"]
    assert error is not None and error.code == "LLM_BAD_GATEWAY"
    assert route.call_count == 1


ERROR_CHUNKS = [
    pytest.param(
        {"error": {"code": 502, "message": "Provider disconnected"}},
        "Provider disconnected",
        id="top-level-error",
    ),
    pytest.param(
        chunk("", finish="error", error={"code": 502, "message": "Provider disconnected"}),
        "Provider disconnected",
        id="openrouter-error-and-finish-error",
    ),
    pytest.param(
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {},
                    "finish_reason": "error",
                    "error": {"message": "Model crashed"},
                }
            ]
        },
        "Model crashed",
        id="choice-error-finish-error",
    ),
    pytest.param(chunk(finish="error"), "error", id="finish-reason-error-only"),
]


@pytest.mark.parametrize(("bad", "expected"), ERROR_CHUNKS)
async def test_in_stream_error_chunk_is_bad_gateway(
    respx_mock: respx.MockRouter, lm, bad: dict[str, Any], expected: str
) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=lambda request: sse_response(event(chunk("Hi")), event(bad), DONE)
    )
    received, error = await run_stream(lm(max_retries=3))
    assert texts(received) == ["Hi"]
    assert error is not None and error.code == "LLM_BAD_GATEWAY"
    assert expected in error.message
    assert route.call_count == 1


async def test_generate_error_body_is_bad_gateway(respx_mock: respx.MockRouter, lm) -> None:
    respx_mock.post(CHAT_URL).mock(
        return_value=httpx.Response(
            200, json={"error": {"code": 502, "message": "Provider disconnected"}}
        )
    )
    with pytest.raises(LLMError) as info:
        await lm().generate(HI)
    assert info.value.code == "LLM_BAD_GATEWAY"
    assert "Provider disconnected" in info.value.message


async def test_generate_non_json_body_is_bad_gateway(respx_mock: respx.MockRouter, lm) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        return_value=httpx.Response(200, text="<html>proxy</html>")
    )
    with pytest.raises(LLMError) as info:
        await lm(max_retries=3).generate(HI)
    assert info.value.code == "LLM_BAD_GATEWAY"
    assert route.call_count == 1


# Timeouts -----------------------------------------------------------------------------------------


async def test_idle_timeout_is_not_reset_by_keep_alive_comments(
    respx_mock: respx.MockRouter, lm
) -> None:
    body = KeepAlive(every=0.05)
    respx_mock.post(CHAT_URL).mock(
        return_value=httpx.Response(200, headers=SSE_HEADERS, stream=body)
    )
    provider = lm(idle_timeout=0.3, max_retries=0)
    started = time.perf_counter()
    async with asyncio.timeout(3):  # the keep-alives never end: fail fast without an idle timeout
        received, error = await run_stream(provider)
    elapsed = time.perf_counter() - started
    assert received == []
    assert error is not None and error.code == "LLM_TIMEOUT"
    assert body.comments >= 3  # bytes kept flowing all along
    assert 0.25 <= elapsed < 1.0


async def test_idle_timeout_bounds_the_gap_between_tokens_not_the_whole_stream(
    respx_mock: respx.MockRouter, lm
) -> None:
    parts: list[bytes | float] = []
    for text in ["a", "b", "c", "d", "e", "f"]:
        parts += [0.08, event(chunk(text))]
    parts += sse_events(finish="stop")
    respx_mock.post(CHAT_URL).mock(return_value=sse_response(*parts))
    received, error = await run_stream(lm(idle_timeout=0.25, max_retries=0))  # whole stream ~0.5 s
    assert error is None
    assert texts(received) == ["a", "b", "c", "d", "e", "f"]


async def test_stall_after_first_token_times_out_without_retry(
    respx_mock: respx.MockRouter, lm
) -> None:
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=lambda request: sse_response(event(chunk("first")), 10.0, *sse_events("late"))
    )
    provider = lm(idle_timeout=0.3, max_retries=3)
    started = time.perf_counter()
    async with asyncio.timeout(3):
        received, error = await run_stream(provider)
    elapsed = time.perf_counter() - started
    assert texts(received) == ["first"]
    assert error is not None and error.code == "LLM_TIMEOUT"
    assert route.call_count == 1
    assert elapsed < 1.0


async def test_read_timeout_ends_a_stalled_stream_on_a_real_socket(lm) -> None:
    """httpx's own read timeout (LM_STUDIO_TIMEOUT), which respx's mocked transport never fires:
    a real local server sends headers and one token, then stalls with the connection open."""
    release = asyncio.Event()
    first = event(chunk("first"))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        writer.write(b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        await release.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        provider = lm(
            idle_timeout=30,
            max_retries=3,
            lm_studio={"base_url": f"http://127.0.0.1:{port}/v1", "read_timeout": 0.3},
        )
        started = time.perf_counter()
        async with asyncio.timeout(5):
            received, error = await run_stream(provider)
        elapsed = time.perf_counter() - started
    finally:
        release.set()
        server.close()
        await server.wait_closed()
    assert texts(received) == ["first"]
    assert error is not None and error.code == "LLM_TIMEOUT"
    assert 0.25 <= elapsed < 2.0


# Closing the upstream response --------------------------------------------------------------------


async def test_stopping_early_closes_the_upstream_response(
    respx_mock: respx.MockRouter, lm
) -> None:
    body = Pieces(*sse_events("one", "two", "three"))
    respx_mock.post(CHAT_URL).mock(
        return_value=httpx.Response(200, headers=SSE_HEADERS, stream=body)
    )
    agen = lm().stream(HI)
    first = await anext(agen)
    assert first.text == "one"
    assert body.closed is False
    await agen.aclose()
    assert body.closed is True


async def test_finished_stream_closes_the_upstream_response(
    respx_mock: respx.MockRouter, lm
) -> None:
    body = Pieces(*sse_events("one"))
    respx_mock.post(CHAT_URL).mock(
        return_value=httpx.Response(200, headers=SSE_HEADERS, stream=body)
    )
    received, error = await run_stream(lm())
    assert error is None and received[-1].finish_reason == "stop"
    assert body.closed is True


async def test_failed_stream_closes_the_upstream_response(respx_mock: respx.MockRouter, lm) -> None:
    body = Pieces(event(chunk("one")), event("not json"))
    respx_mock.post(CHAT_URL).mock(
        return_value=httpx.Response(200, headers=SSE_HEADERS, stream=body)
    )
    _, error = await run_stream(lm())
    assert error is not None and error.code == "LLM_BAD_GATEWAY"
    assert body.closed is True


# ProviderManager ----------------------------------------------------------------------------------


def test_manager_returns_the_same_instance(llm_config) -> None:
    assert get_provider("lm_studio") is get_provider("lm_studio")
    assert providers["lm_studio"] is get_provider("lm_studio")


def test_manager_reset_builds_a_new_instance(llm_config) -> None:
    before = get_provider("lm_studio")
    providers.reset()
    after = get_provider("lm_studio")
    assert after is not before
    assert isinstance(after, LMStudioProvider)


def test_changing_settings_builds_a_new_instance(llm_config) -> None:
    before = get_provider("lm_studio")
    llm_config(lm_studio={"base_url": "http://elsewhere.test/v1"})
    after = get_provider("lm_studio")
    assert after is not before
    assert after.base_url == "http://elsewhere.test/v1"


def test_get_provider_without_alias_is_the_selected_one(llm_config) -> None:
    assert isinstance(get_provider(), LMStudioProvider)
    llm_config(provider="openrouter")
    assert isinstance(get_provider(), OpenRouterProvider)


@pytest.mark.parametrize("how", ["alias", "setting"])
def test_unknown_provider_is_improperly_configured(llm_config, how: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"llm\.E001"):
        if how == "alias":
            get_provider("banana")
        else:
            llm_config(provider="banana")
            get_provider()


def test_a_separate_manager_builds_from_settings(llm_config) -> None:
    manager = ProviderManager()
    built = manager["openrouter"]
    assert isinstance(built, OpenRouterProvider)
    assert manager["openrouter"] is built
    assert built is not get_provider("openrouter")
