"""OpenRouter against a respx-mocked upstream: key and attribution headers, usage accounting,
in-stream errors, the disabled provider, and the key kept out of every error and log line."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import respx

from llm.exceptions import LLMError, ProviderDisabled
from llm.providers import get_provider, providers
from llm.providers.openrouter import OpenRouterProvider
from llm.types import ChatRequest
from tests.conftest import OPENROUTER, OPENROUTER_KEY
from tests.llm.test_providers import (
    DONE,
    HI,
    chunk,
    comment,
    completion_response,
    error_response,
    event,
    models_response,
    run_stream,
    sent_json,
    sse_events,
    sse_response,
    texts,
)

MODELS_URL = f"{OPENROUTER}/models"
CHAT_URL = f"{OPENROUTER}/chat/completions"
SITE = "https://negotiator.example"
APP = "Negotiator Tests"


@pytest.fixture
def orp(llm_config: Callable[..., dict[str, Any]]) -> Callable[..., OpenRouterProvider]:
    """`orp(**openrouter_config)` configures OpenRouter (with site/app headers) and returns it."""

    def build(max_retries: int = 3, **config: Any) -> OpenRouterProvider:
        llm_config(
            max_retries=max_retries, openrouter={"site_url": SITE, "app_name": APP, **config}
        )
        provider = get_provider("openrouter")
        assert isinstance(provider, OpenRouterProvider)
        return provider

    return build


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    await providers.aclose()


def chain_text(exc: BaseException) -> str:
    """The messages of an exception and of everything it was raised from, and its dict form."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 20:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, LLMError):
        parts.append(repr(exc.as_dict()))
    return "\n".join(parts)


# Headers and payload ------------------------------------------------------------------------------


async def test_generate_sends_key_and_attribution_headers(
    respx_mock: respx.MockRouter, orp
) -> None:
    chat = respx_mock.post(CHAT_URL).mock(return_value=completion_response())
    await orp().generate(HI)
    headers = chat.calls.last.request.headers
    assert headers["authorization"] == f"Bearer {OPENROUTER_KEY}"
    assert headers["http-referer"] == SITE
    assert headers["x-title"] == APP


async def test_stream_and_ping_send_the_same_headers(respx_mock: respx.MockRouter, orp) -> None:
    chat = respx_mock.post(CHAT_URL).mock(return_value=sse_response(*sse_events("hi")))
    models = respx_mock.get(MODELS_URL).mock(return_value=models_response("openrouter/auto"))
    provider = orp()
    received, error = await run_stream(provider)
    assert error is None and texts(received) == ["hi"]
    assert (await provider.ping()).reachable is True
    for route in (chat, models):
        headers = route.calls.last.request.headers
        assert headers["authorization"] == f"Bearer {OPENROUTER_KEY}"
        assert headers["http-referer"] == SITE and headers["x-title"] == APP


@pytest.mark.parametrize("stream", [False, True])
async def test_payload_asks_for_usage_accounting(
    respx_mock: respx.MockRouter, orp, stream: bool
) -> None:
    reply = sse_response(*sse_events("hi")) if stream else completion_response()
    chat = respx_mock.post(CHAT_URL).mock(return_value=reply)
    provider = orp()
    if stream:
        await run_stream(provider)
    else:
        await provider.generate(HI)
    payload = sent_json(chat)
    assert payload["usage"] == {"include": True}
    assert payload["model"] == "openrouter/auto"
    assert payload["stream"] is stream
    if stream:
        assert payload["stream_options"] == {"include_usage": True}


# Streams as OpenRouter sends them -----------------------------------------------------------------


async def test_processing_comments_ignored_and_usage_reported(
    respx_mock: respx.MockRouter, orp
) -> None:
    body = [
        comment(),
        comment(),
        event(chunk("Hello", model="anthropic/claude")),
        comment(),
        event(chunk(" you", model="anthropic/claude")),
        event(
            chunk(
                "",
                finish="stop",
                model="anthropic/claude",
                usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
            )
        ),
        DONE,
    ]
    respx_mock.post(CHAT_URL).mock(return_value=sse_response(*body))
    received, error = await run_stream(orp())
    assert error is None
    assert [c.text for c in received] == ["Hello", " you", ""]
    final = received[-1]
    assert final.finish_reason == "stop" and final.model == "anthropic/claude"
    usage = final.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (9, 2, False)


async def test_mid_stream_error_is_bad_gateway_with_upstream_message(
    respx_mock: respx.MockRouter, orp
) -> None:
    bad = chunk(
        "",
        finish="error",
        error={"code": "server_error", "message": "Provider disconnected unexpectedly"},
    )
    route = respx_mock.post(CHAT_URL).mock(
        side_effect=lambda request: sse_response(comment(), event(chunk("Par")), event(bad), DONE)
    )
    received, error = await run_stream(orp())
    assert texts(received) == ["Par"]
    assert error is not None and error.code == "LLM_BAD_GATEWAY"
    assert "Provider disconnected unexpectedly" in error.message
    assert route.call_count == 1


# Disabled -----------------------------------------------------------------------------------------


async def _every_entry_point(provider: OpenRouterProvider) -> list[tuple[str, str]]:
    """The code each entry point fails with."""
    codes = []
    for name in ("generate", "stream", "list_models"):
        try:
            if name == "generate":
                await provider.generate(HI)
            elif name == "stream":
                async for _ in provider.stream(HI):
                    pass
            else:
                await provider.list_models()
        except ProviderDisabled as exc:
            codes.append((name, exc.code))
    ping = await provider.ping()
    assert ping.reachable is False and ping.error is not None
    codes.append(("ping", ping.error["code"]))
    return codes


@pytest.mark.parametrize(
    "config", [{"enabled": False}, {"enabled": True, "api_key": ""}], ids=["switched-off", "no-key"]
)
async def test_disabled_refuses_without_any_http_call(
    respx_mock: respx.MockRouter, orp, config: dict[str, Any]
) -> None:
    anything = respx_mock.route(host="openrouter.test").mock(return_value=completion_response())
    codes = await _every_entry_point(orp(**config))
    assert codes == [
        (name, "LLM_PROVIDER_DISABLED") for name in ("generate", "stream", "list_models", "ping")
    ]
    assert anything.call_count == 0


def test_disabled_error_is_provider_disabled() -> None:
    provider = OpenRouterProvider(
        "openrouter", base_url=OPENROUTER, api_key=OPENROUTER_KEY, enabled=False
    )
    with pytest.raises(ProviderDisabled) as info:
        provider.check_enabled()
    assert info.value.code == "LLM_PROVIDER_DISABLED" and info.value.status == 400
    assert "LLM_ENABLE_OPENROUTER" in info.value.message


# The key stays secret -----------------------------------------------------------------------------

ECHO = f"Invalid API key {OPENROUTER_KEY} (sent as Bearer {OPENROUTER_KEY})"


async def test_key_echoed_in_401_is_not_in_the_error(respx_mock: respx.MockRouter, orp) -> None:
    route = respx_mock.post(CHAT_URL).mock(return_value=error_response(401, ECHO))
    with pytest.raises(LLMError) as info:
        await orp().generate(HI)
    assert route.call_count == 1 and info.value.code == "LLM_BAD_REQUEST"
    assert "Invalid API key" in info.value.message  # the upstream's message is kept...
    assert OPENROUTER_KEY not in chain_text(info.value)  # ...without the key


async def test_key_echoed_in_plain_text_5xx_is_not_in_the_error(
    respx_mock: respx.MockRouter, orp
) -> None:
    respx_mock.post(CHAT_URL).mock(side_effect=lambda request: httpx.Response(502, text=ECHO))
    with pytest.raises(LLMError) as info:
        await orp(max_retries=1).generate(HI)
    assert info.value.code == "LLM_UNAVAILABLE"
    assert OPENROUTER_KEY not in chain_text(info.value)


async def test_key_echoed_in_stream_error_response_is_not_in_the_error(
    respx_mock: respx.MockRouter, orp
) -> None:
    respx_mock.post(CHAT_URL).mock(return_value=error_response(403, ECHO))
    received, error = await run_stream(orp())
    assert received == [] and error is not None and error.code == "LLM_BAD_REQUEST"
    assert OPENROUTER_KEY not in chain_text(error)


async def test_key_echoed_in_an_in_stream_error_chunk_is_not_in_the_error(
    respx_mock: respx.MockRouter, orp
) -> None:
    bad = {"error": {"code": 401, "message": ECHO}}
    respx_mock.post(CHAT_URL).mock(return_value=sse_response(event(chunk("a")), event(bad), DONE))
    received, error = await run_stream(orp())
    assert texts(received) == ["a"]
    assert error is not None and error.code == "LLM_BAD_GATEWAY"
    assert OPENROUTER_KEY not in chain_text(error)


async def test_key_echoed_in_invalid_stream_json_is_not_in_the_error(
    respx_mock: respx.MockRouter, orp
) -> None:
    respx_mock.post(CHAT_URL).mock(
        return_value=sse_response(event(chunk("a")), event(f"oops {ECHO}"), DONE)
    )
    _received, error = await run_stream(orp())
    assert error is not None and error.code == "LLM_BAD_GATEWAY"
    assert OPENROUTER_KEY not in chain_text(error)


async def test_key_echoed_in_a_200_error_body_is_not_in_the_error(
    respx_mock: respx.MockRouter, orp
) -> None:
    respx_mock.post(CHAT_URL).mock(
        return_value=httpx.Response(200, json={"error": {"message": ECHO}})
    )
    with pytest.raises(LLMError) as info:
        await orp().generate(HI)
    assert info.value.code == "LLM_BAD_GATEWAY"
    assert OPENROUTER_KEY not in chain_text(info.value)


async def test_key_echoed_to_ping_is_not_in_its_result(respx_mock: respx.MockRouter, orp) -> None:
    respx_mock.get(MODELS_URL).mock(return_value=error_response(401, ECHO))
    result = await orp().ping()
    assert result.reachable is False and result.error["code"] == "LLM_BAD_REQUEST"
    assert OPENROUTER_KEY not in repr(result)


async def test_key_never_in_log_records(
    respx_mock: respx.MockRouter, orp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm")
    caplog.set_level(logging.INFO, logger="httpx")
    respx_mock.post(CHAT_URL).mock(
        side_effect=[
            error_response(503, ECHO),  # retried, logged
            error_response(401, ECHO),  # refused
            sse_response(event(chunk("a")), event({"error": {"message": ECHO}}), DONE),
            completion_response(ECHO),  # the key in a reply's content
        ]
    )
    provider = orp(max_retries=1)
    with pytest.raises(LLMError):
        await provider.generate(HI)
    await run_stream(provider)
    await provider.generate(HI)
    upstream_lines = [r for r in caplog.records if r.name.startswith("llm")]
    assert len(upstream_lines) >= 3  # the requests were logged at all
    leaking = [r.getMessage() for r in caplog.records if OPENROUTER_KEY in r.getMessage()]
    assert leaking == []


def test_key_not_in_repr(llm_config) -> None:
    provider = get_provider("openrouter")
    assert OPENROUTER_KEY not in repr(provider) and OPENROUTER_KEY not in str(provider)


async def test_explicit_model_is_sent_to_openrouter(respx_mock: respx.MockRouter, orp) -> None:
    chat = respx_mock.post(CHAT_URL).mock(return_value=completion_response(model="meta/llama"))
    result = await orp().generate(ChatRequest(messages=HI.messages, model="meta/llama"))
    assert sent_json(chat)["model"] == "meta/llama"
    assert result.model == "meta/llama" and result.provider == "openrouter"
