"""`POST /api/v1/llm/generate`: JSON and SSE replies, upstream failures mapped to statuses, client
errors.

The pipeline always streams from the upstream (even for `"stream": false`), so the fake upstream
answers `/chat/completions` with SSE bodies.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from django.conf import settings as django_settings
from django.test import AsyncClient

from tests.conftest import OPENROUTER, OPENROUTER_KEY, UPSTREAM

COMPLETIONS = f"{UPSTREAM}/chat/completions"
SERVED = "served-model-Q4_K_M"  # what the upstream reports, whatever name was asked for
HELLO = [{"role": "user", "content": "Hello"}]
SSE_HEADERS = {"content-type": "text/event-stream"}

# The pipeline may store what it generates: let it reach the database from its threads.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]


# Fake upstream ------------------------------------------------------------------------------


def chunk(
    text: str | None = None, finish: str | None = None, *, model: str = SERVED, **extra: Any
) -> dict:
    delta = {} if text is None else {"content": text}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def sse(*events: dict | str, done: bool = True) -> bytes:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    if done:
        lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


def reply(*tokens: str, finish: str = "stop", usage: dict | None = None) -> httpx.Response:
    role = chunk(None)
    role["choices"][0]["delta"] = {"role": "assistant"}
    events: list[dict] = [role, *(chunk(token) for token in tokens)]
    events.append(chunk(None, finish))
    if usage is not None:
        events.append({"id": "chatcmpl-1", "model": SERVED, "choices": [], "usage": usage})
    return httpx.Response(200, headers=SSE_HEADERS, content=sse(*events))


class CutStream(httpx.AsyncByteStream):
    """Sends `first`, then the connection drops."""

    def __init__(self, first: bytes) -> None:
        self.first = first

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.first
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body"
        )


# Client helpers -----------------------------------------------------------------------------


async def post(
    body: Any, *, raw: bytes | str | None = None, content_type: str = "application/json"
) -> Any:
    data = raw if raw is not None else json.dumps(body)
    return await AsyncClient().post("/api/v1/llm/generate", data=data, content_type=content_type)


async def read_frames(response: Any) -> list[dict[str, Any]]:
    assert response.streaming
    parts = []
    async for part in response.streaming_content:
        parts.append(part)
    text = b"".join(parts).decode()
    assert "Traceback" not in text
    frames = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        assert data, f"an SSE event without data: {block!r}"
        frames.append(json.loads("\n".join(data)))
    return frames


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    content = response.content
    assert response.status_code == status, content
    assert response["Content-Type"].startswith("application/json")
    assert b"Traceback" not in content
    assert OPENROUTER_KEY.encode() not in content
    body = json.loads(content)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def sent_payload(route: Any, index: int = -1) -> dict[str, Any]:
    return json.loads(route.calls[index].request.content)


# JSON replies -------------------------------------------------------------------------------


async def test_a_whole_number_written_with_a_point_is_a_whole_number(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    """JSON Schema's integer, which the OpenAPI document promises: 8.0 is 8 (8.5 is a 422)."""
    route = respx_mock.post(COMPLETIONS).mock(return_value=reply("Hi"))
    response = await post({"messages": HELLO, "max_tokens": 8.0})
    assert response.status_code == 200, response.content
    assert json.loads(route.calls.last.request.content)["max_tokens"] == 8


async def test_json_reply(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    route = respx_mock.post(COMPLETIONS).mock(return_value=reply("Hel", "lo", " there!"))
    response = await post({"messages": HELLO})
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"session_id", "model", "provider", "content", "finish_reason", "usage"}
    uuid.UUID(body["session_id"])
    assert body["model"] == SERVED  # as the upstream reported it, not "test-model"
    assert body["provider"] == "lm_studio"
    assert body["content"] == "Hello there!"
    assert body["finish_reason"] == "stop"
    usage = body["usage"]
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "estimated"}
    assert usage["estimated"] is True  # the upstream sent none
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert route.call_count == 1
    payload = sent_payload(route)
    assert payload["model"] == "test-model"
    assert payload["messages"] == HELLO
    assert payload["stream"] is True
    assert payload["max_tokens"] == 64  # LLM_MAX_TOKENS when the client gives none


async def test_json_reply_with_upstream_usage(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    respx_mock.post(COMPLETIONS).mock(return_value=reply("Hi", "!", usage=usage))
    response = await post({"messages": HELLO})
    assert response.status_code == 200, response.content
    assert response.json()["usage"] == {**usage, "estimated": False}


async def test_json_reply_finish_reason_length(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    respx_mock.post(COMPLETIONS).mock(return_value=reply("a", "b", finish="length"))
    response = await post({"messages": HELLO, "max_tokens": 2})
    assert response.status_code == 200, response.content
    assert response.json()["finish_reason"] == "length"
    assert response.json()["content"] == "ab"


async def test_client_options_are_sent_upstream(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    route = respx_mock.post(COMPLETIONS).mock(return_value=reply("ok"))
    messages = [
        {"role": "system", "content": "You sell bicycles."},
        {"role": "user", "content": "120?"},
        {"role": "assistant", "content": "150."},
        {"role": "user", "content": "130?"},
    ]
    response = await post(
        {
            "messages": messages,
            "model": "my-model",
            "max_tokens": 7,
            "temperature": 0.5,
            "stream": False,
        }
    )
    assert response.status_code == 200, response.content
    payload = sent_payload(route)
    assert payload["messages"] == messages
    assert payload["model"] == "my-model"
    assert payload["max_tokens"] == 7
    assert payload["temperature"] == 0.5


async def test_json_body_without_content_type_header_is_accepted(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    """`curl -d '{...}'` sends application/x-www-form-urlencoded; the body is still JSON."""
    respx_mock.post(COMPLETIONS).mock(return_value=reply("Hi"))
    response = await post(
        None, raw=json.dumps({"messages": HELLO}), content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 200, response.content
    assert response.json()["content"] == "Hi"


# Streamed replies ---------------------------------------------------------------------------


async def test_stream_reply_frames(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    respx_mock.post(COMPLETIONS).mock(return_value=reply("Hel", "lo", " there!"))
    response = await post({"messages": HELLO, "stream": True})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    frames = await read_frames(response)
    kinds = [frame["type"] for frame in frames]
    assert kinds[0] == "start"
    assert kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"token"}
    assert len(kinds) >= 3
    start, done = frames[0], frames[-1]
    assert start == {
        "type": "start",
        "session_id": start["session_id"],
        "provider": "lm_studio",
        "model": SERVED,
    }
    uuid.UUID(start["session_id"])
    assert "".join(frame["text"] for frame in frames[1:-1]) == "Hello there!"
    assert all(frame["text"] for frame in frames[1:-1])
    assert done["session_id"] == start["session_id"]
    assert done["finish_reason"] == "stop"
    assert done["usage"]["estimated"] is True
    assert set(done["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "estimated"}


async def test_stream_reply_carries_upstream_usage(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    respx_mock.post(COMPLETIONS).mock(return_value=reply("Hi", usage=usage))
    frames = await read_frames(await post({"messages": HELLO, "stream": True}))
    assert frames[-1]["type"] == "done"
    assert frames[-1]["usage"] == {**usage, "estimated": False}


async def test_stream_refuses_a_session_it_cannot_continue_with_a_status(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    """Before the event stream starts, so the status tells: unknown 404, still generating 409."""
    from llm.models import Session

    unknown = await post({"messages": HELLO, "stream": True, "session_id": str(uuid.uuid4())})
    assert not unknown.streaming, "answered 200 with an event stream"
    assert_error(unknown, 404, "SESSION_NOT_FOUND")
    busy = await Session.objects.acreate(provider="lm_studio", status=Session.Status.STREAMING)
    response = await post({"messages": HELLO, "stream": True, "session_id": str(busy.pk)})
    assert_error(response, 409, "GENERATION_IN_PROGRESS")


async def test_stream_failure_before_first_token_is_one_error_frame(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(max_retries=0)
    respx_mock.post(COMPLETIONS).mock(side_effect=httpx.ConnectError("Connection refused"))
    response = await post({"messages": HELLO, "stream": True})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    frames = await read_frames(response)
    assert len(frames) == 1, frames
    frame = frames[0]
    assert frame["type"] == "error"
    assert frame["code"] == "LLM_UNAVAILABLE"
    assert frame["message"]
    uuid.UUID(frame["session_id"])


async def test_stream_failure_after_tokens_ends_with_an_error_frame(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    first = sse(chunk("Hel"), chunk("lo"), done=False)
    route = respx_mock.post(COMPLETIONS).mock(
        side_effect=lambda request: httpx.Response(
            200, headers=SSE_HEADERS, stream=CutStream(first)
        )
    )
    frames = await read_frames(await post({"messages": HELLO, "stream": True}))
    kinds = [frame["type"] for frame in frames]
    assert kinds[0] == "start" and kinds[-1] == "error"
    assert set(kinds[1:-1]) == {"token"}
    assert "".join(frame["text"] for frame in frames[1:-1]) == "Hello"
    assert frames[-1]["code"] == "LLM_BAD_GATEWAY"
    assert frames[-1]["session_id"] == frames[0]["session_id"]
    assert route.call_count == 1  # never retried after the first token


# Upstream failures without streaming ---------------------------------------------------------


async def test_refused_is_503_unavailable(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    llm_config(max_retries=0)
    respx_mock.post(COMPLETIONS).mock(side_effect=httpx.ConnectError("Connection refused"))
    assert_error(await post({"messages": HELLO}), 503, "LLM_UNAVAILABLE")


async def test_refused_is_retried_then_503(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    llm_config(max_retries=2)
    route = respx_mock.post(COMPLETIONS).mock(side_effect=httpx.ConnectError("Connection refused"))
    assert_error(await post({"messages": HELLO}), 503, "LLM_UNAVAILABLE")
    assert route.call_count == 3


async def test_retry_then_success(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    route = respx_mock.post(COMPLETIONS).mock(
        side_effect=[httpx.ConnectError("refused"), httpx.Response(503), reply("fine")]
    )
    response = await post({"messages": HELLO})
    assert response.status_code == 200, response.content
    assert response.json()["content"] == "fine"
    assert route.call_count == 3


@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.ConnectTimeout])
async def test_timeout_is_503_timeout(
    llm_config: Callable[..., Any], respx_mock: Any, error: type[Exception]
) -> None:
    llm_config(max_retries=0)
    respx_mock.post(COMPLETIONS).mock(side_effect=error("timed out"))
    assert_error(await post({"messages": HELLO}), 503, "LLM_TIMEOUT")


async def test_5xx_after_retries_is_503_unavailable(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(max_retries=1)
    route = respx_mock.post(COMPLETIONS).respond(500, json={"error": {"message": "model crashed"}})
    error = assert_error(await post({"messages": HELLO}), 503, "LLM_UNAVAILABLE")
    assert "500" in error["message"]
    assert route.call_count == 2


async def test_retry_after_beyond_the_maximum_fails_at_once(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(max_retries=3, retry_after_max=60)
    route = respx_mock.post(COMPLETIONS).respond(429, headers={"Retry-After": "120"})
    response = await post({"messages": HELLO})
    error = assert_error(response, 503, "LLM_UNAVAILABLE")
    assert "120" in error["message"]
    assert route.call_count == 1
    assert response["Retry-After"] == "120"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(sse("{not json", done=False), id="bad-json"),
        pytest.param(sse(chunk("Hi"), "{not json"), id="bad-json-after-a-token"),
        pytest.param(
            sse({"error": {"message": "Provider overloaded", "code": 502}}), id="error-chunk"
        ),
        pytest.param(
            sse(
                {
                    **chunk(None, "error"),
                    "choices": [
                        {
                            "index": 0,
                            "delta": {},
                            "finish_reason": "error",
                            "error": {"message": "upstream died"},
                        }
                    ],
                }
            ),
            id="choice-error",
        ),
        pytest.param(sse(chunk("Hi"), done=False), id="eof-without-finish-reason"),
        pytest.param(sse(chunk("Hi"), done=True), id="done-without-finish-reason"),
        pytest.param(sse(done=True), id="empty-stream"),
    ],
)
async def test_unusable_upstream_is_502(
    llm_config: Callable[..., Any], respx_mock: Any, body: bytes
) -> None:
    llm_config(max_retries=0)
    respx_mock.post(COMPLETIONS).respond(200, headers=SSE_HEADERS, content=body)
    assert_error(await post({"messages": HELLO}), 502, "LLM_BAD_GATEWAY")


async def test_cut_stream_is_502(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    route = respx_mock.post(COMPLETIONS).mock(
        side_effect=lambda request: httpx.Response(
            200, headers=SSE_HEADERS, stream=CutStream(sse(chunk("Hel"), done=False))
        )
    )
    error = assert_error(await post({"messages": HELLO}), 502, "LLM_BAD_GATEWAY")
    assert "cut" in error["message"].lower()
    assert route.call_count == 1  # a token was delivered: not retried


async def test_non_event_stream_answer_is_502(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(max_retries=0)
    respx_mock.post(COMPLETIONS).respond(200, html="<html>proxy login</html>")
    assert_error(await post({"messages": HELLO}), 502, "LLM_BAD_GATEWAY")


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_upstream_4xx_is_400_bad_request(
    llm_config: Callable[..., Any], respx_mock: Any, status: int
) -> None:
    route = respx_mock.post(COMPLETIONS).respond(
        status, json={"error": {"message": "context length exceeded"}}
    )
    error = assert_error(await post({"messages": HELLO}), 400, "LLM_BAD_REQUEST")
    assert str(status) in error["message"]
    assert route.call_count == 1  # not retried


async def test_openrouter_disabled_is_400(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    llm_config(provider="openrouter", openrouter={"enabled": False})
    error = assert_error(await post({"messages": HELLO}), 400, "LLM_PROVIDER_DISABLED")
    assert "LLM_ENABLE_OPENROUTER" in error["message"]
    assert not respx_mock.calls


async def test_openrouter_without_key_is_400(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(provider="openrouter", openrouter={"api_key": ""})
    assert_error(await post({"messages": HELLO}), 400, "LLM_PROVIDER_DISABLED")
    assert not respx_mock.calls


async def test_openrouter_disabled_stream_is_one_error_frame(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(provider="openrouter", openrouter={"enabled": False})
    frames = await read_frames(await post({"messages": HELLO, "stream": True}))
    assert [frame["type"] for frame in frames] == ["error"]
    assert frames[0]["code"] == "LLM_PROVIDER_DISABLED"


async def test_openrouter_error_echoing_the_key_is_redacted(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(provider="openrouter")
    respx_mock.post(f"{OPENROUTER}/chat/completions").respond(
        403, json={"error": {"message": f"Key {OPENROUTER_KEY} is not allowed this model"}}
    )
    assert_error(
        await post({"messages": HELLO}), 400, "LLM_BAD_REQUEST"
    )  # asserts the key is absent


# Client errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('{"messages": [', id="truncated"),
        pytest.param("not json at all", id="text"),
        pytest.param("{'messages': []}", id="single-quotes"),
        pytest.param("", id="empty"),
        pytest.param(b"\xff\xfe\x00garbage", id="binary"),
    ],
)
async def test_malformed_json_is_400(
    llm_config: Callable[..., Any], respx_mock: Any, raw: Any
) -> None:
    assert_error(await post(None, raw=raw), 400, "INVALID_JSON")
    assert not respx_mock.calls


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(
            {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", id="unknown-role"
        ),
        pytest.param({"messages": [{"role": "user"}]}, "messages.0.content", id="missing-content"),
        pytest.param({"messages": [{"content": "x"}]}, "messages.0.role", id="missing-role"),
        pytest.param({"messages": []}, "messages", id="empty-messages"),
        pytest.param({}, "messages", id="missing-messages"),
        pytest.param({"messages": "Hello"}, "messages", id="messages-not-a-list"),
        pytest.param({"messages": ["Hello"]}, "messages.0", id="message-not-an-object"),
        pytest.param(
            {"messages": [{"role": "user", "content": 42}]}, "messages.0.content", id="content-int"
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": None}]},
            "messages.0.content",
            id="content-null",
        ),
        pytest.param({"messages": HELLO, "max_tokens": "ten"}, "max_tokens", id="max-tokens-text"),
        pytest.param({"messages": HELLO, "max_tokens": 0}, "max_tokens", id="max-tokens-zero"),
        pytest.param({"messages": HELLO, "max_tokens": 1.5}, "max_tokens", id="max-tokens-float"),
        pytest.param(
            {"messages": HELLO, "temperature": "hot"}, "temperature", id="temperature-text"
        ),
        pytest.param(
            {"messages": HELLO, "temperature": -1}, "temperature", id="temperature-negative"
        ),
        pytest.param({"messages": HELLO, "stream": "yes"}, "stream", id="stream-text"),
        pytest.param({"messages": HELLO, "stream": 1}, "stream", id="stream-int"),
        pytest.param({"messages": HELLO, "model": 7}, "model", id="model-int"),
        pytest.param({"messages": HELLO, "model": "m" * 256}, "model", id="model-too-long"),
        pytest.param(
            {"messages": HELLO, "model": "fake\r\nX-Injected: 1"}, "model", id="model-two-lines"
        ),
        pytest.param({"messages": HELLO, "banana": 1}, "banana", id="unknown-field"),
        pytest.param(
            {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
            "messages.0.name",
            id="unknown-message-field",
        ),
    ],
)
async def test_wrong_fields_are_422_naming_the_field(
    llm_config: Callable[..., Any], respx_mock: Any, body: dict[str, Any], field: str
) -> None:
    error = assert_error(await post(body), 422, "INVALID_REQUEST")
    assert field in error["message"], error
    assert not respx_mock.calls


@pytest.mark.parametrize("raw", ["[]", "null", '"Hello"', "42", "true"])
async def test_json_that_is_not_an_object_is_422(
    llm_config: Callable[..., Any], respx_mock: Any, raw: str
) -> None:
    assert_error(await post(None, raw=raw), 422, "INVALID_REQUEST")
    assert not respx_mock.calls


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
async def test_body_over_the_limit_is_413(
    settings: Any, llm_config: Callable[..., Any], respx_mock: Any, content_type: str
) -> None:
    settings.LLM_MAX_REQUEST_BYTES = 1000
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    raw = json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]})
    assert len(raw) > 2000
    assert_error(await post(None, raw=raw, content_type=content_type), 413, "MESSAGE_TOO_LARGE")
    assert not respx_mock.calls


async def test_body_over_the_limit_is_413_even_when_django_allows_more(
    settings: Any, llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    settings.LLM_MAX_REQUEST_BYTES = 1000
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    raw = json.dumps({"messages": [{"role": "user", "content": "x" * 2000}]})
    assert_error(await post(None, raw=raw), 413, "MESSAGE_TOO_LARGE")
    assert not respx_mock.calls


async def test_body_under_the_limit_is_served(
    settings: Any, llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    settings.LLM_MAX_REQUEST_BYTES = 1000
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    respx_mock.post(COMPLETIONS).mock(return_value=reply("ok"))
    raw = json.dumps({"messages": [{"role": "user", "content": "x" * 900}]})
    assert len(raw) <= 1000
    response = await post(None, raw=raw)
    assert response.status_code == 200, response.content


async def test_default_limit_is_one_mib(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    assert django_settings.LLM_MAX_REQUEST_BYTES == 1024 * 1024
    raw = json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]})
    assert_error(await post(None, raw=raw), 413, "MESSAGE_TOO_LARGE")
    assert not respx_mock.calls


async def test_oversize_malformed_body_is_413_not_400(
    settings: Any, llm_config: Callable[..., Any]
) -> None:
    settings.LLM_MAX_REQUEST_BYTES = 1000
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    assert_error(await post(None, raw="{" * 2000), 413, "MESSAGE_TOO_LARGE")


async def test_wrong_method_is_an_error_body_not_a_500(llm_config: Callable[..., Any]) -> None:
    response = await AsyncClient().get("/api/v1/llm/generate")
    assert response.status_code == 405
    assert b"Traceback" not in response.content
