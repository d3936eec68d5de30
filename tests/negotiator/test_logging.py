"""Logging: secrets redacted from every line (message and traceback).

One line per upstream request.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from django.test import AsyncClient

from negotiator.logging import RedactSecrets
from tests.conftest import OPENROUTER, OPENROUTER_KEY, UPSTREAM

API_TOKEN = "api-token-s3cr3t-987654"
UPSTREAM_LINE = re.compile(
    r"provider=(?P<provider>\S+) .*model=(?P<model>\S+) status=(?P<status>\S+) "
    r"attempt=(?P<attempt>\d+) latency_ms=(?P<latency>[\d.]+)"
)


@pytest.fixture
def secrets(settings: Any, llm_config: Callable[..., Any]) -> None:
    settings.API_TOKEN = API_TOKEN  # the OpenRouter key is set by llm_config


def record(msg: str, *args: Any, exc_info: Any = None) -> logging.LogRecord:
    return logging.LogRecord("llm.test", logging.ERROR, __file__, 1, msg, args or None, exc_info)


def exc_info_with(message: str) -> Any:
    try:
        raise RuntimeError(message)
    except RuntimeError:
        return sys.exc_info()


# The filter ----------------------------------------------------------------------------------


def test_filter_redacts_the_key_and_token_in_the_message(secrets: None) -> None:
    rec = record(f"calling with key {OPENROUTER_KEY} and token {API_TOKEN}")
    assert RedactSecrets().filter(rec) is True  # redacts, never drops
    message = rec.getMessage()
    assert OPENROUTER_KEY not in message
    assert API_TOKEN not in message
    assert message.count("[redacted]") == 2
    assert message.startswith("calling with key ")


def test_filter_redacts_secrets_passed_as_arguments(secrets: None) -> None:
    rec = record(
        "headers=%s token=%s n=%d", {"Authorization": f"Bearer {OPENROUTER_KEY}"}, API_TOKEN, 3
    )
    RedactSecrets().filter(rec)
    message = rec.getMessage()
    assert OPENROUTER_KEY not in message
    assert API_TOKEN not in message
    assert "n=3" in message


def test_filter_redacts_exception_text(secrets: None) -> None:
    rec = record(
        "request failed", exc_info=exc_info_with(f"401 for key {OPENROUTER_KEY} / {API_TOKEN}")
    )
    RedactSecrets().filter(rec)
    formatted = logging.Formatter("%(message)s").format(rec)
    assert "RuntimeError" in formatted and "Traceback" in formatted  # the traceback is kept...
    assert OPENROUTER_KEY not in formatted  # ...without the secrets
    assert API_TOKEN not in formatted
    assert "[redacted]" in formatted


def test_filter_redacts_precomputed_exception_text(secrets: None) -> None:
    rec = record("boom")
    rec.exc_text = f"Traceback (most recent call last):\nValueError: {OPENROUTER_KEY}"
    RedactSecrets().filter(rec)
    assert OPENROUTER_KEY not in logging.Formatter().format(rec)


def test_filter_leaves_clean_records_alone(secrets: None) -> None:
    rec = record("upstream provider=%s status=%d", "lm_studio", 200)
    RedactSecrets().filter(rec)
    assert rec.getMessage() == "upstream provider=lm_studio status=200"


def test_filter_without_secrets_configured(settings: Any, llm_config: Callable[..., Any]) -> None:
    settings.API_TOKEN = ""
    llm_config(openrouter={"api_key": ""})
    rec = record("nothing secret %s", "here")
    assert RedactSecrets().filter(rec) is True
    assert rec.getMessage() == "nothing secret here"


# The configured handlers ----------------------------------------------------------------------


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    """What the configured console handler writes, captured."""
    handlers = [
        h
        for h in logging.getLogger().handlers
        if any(isinstance(f, RedactSecrets) for f in h.filters)
    ]
    assert handlers, "no root handler carries the RedactSecrets filter"
    stream = io.StringIO()
    previous = [h.setStream(stream) for h in handlers if isinstance(h, logging.StreamHandler)]
    assert previous, "no console handler"
    try:
        yield stream
    finally:
        for handler, old in zip(
            [h for h in handlers if isinstance(h, logging.StreamHandler)], previous, strict=True
        ):
            handler.setStream(old)


def test_console_output_is_redacted(secrets: None, console: io.StringIO) -> None:
    logger = logging.getLogger("llm.anything")
    logger.warning("key=%s token=%s", OPENROUTER_KEY, API_TOKEN)
    try:
        raise ValueError(f"bad key {OPENROUTER_KEY}")
    except ValueError:
        logger.exception("failed")
    output = console.getvalue()
    assert "key=[redacted] token=[redacted]" in output
    assert "ValueError" in output
    assert OPENROUTER_KEY not in output
    assert API_TOKEN not in output


@pytest.mark.django_db(transaction=True)
async def test_openrouter_request_logs_never_show_the_key(
    secrets: None,
    llm_config: Callable[..., Any],
    respx_mock: Any,
    console: io.StringIO,
    caplog: pytest.LogCaptureFixture,
) -> None:
    llm_config(provider="openrouter", max_retries=1)
    respx_mock.post(f"{OPENROUTER}/chat/completions").respond(
        503, json={"error": {"message": f"upstream overloaded for key {OPENROUTER_KEY}"}}
    )
    with caplog.at_level(logging.DEBUG):
        response = await AsyncClient().post(
            "/api/v1/llm/generate",
            data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            content_type="application/json",
            headers={
                "Authorization": f"Bearer {API_TOKEN}"
            },  # API_TOKEN is set: generating needs it
        )
    assert response.status_code == 503, response.content
    output = console.getvalue()
    assert "provider=openrouter" in output
    assert OPENROUTER_KEY not in output
    assert OPENROUTER_KEY.encode() not in response.content


# One line per upstream request -----------------------------------------------------------------


def upstream_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    lines = []
    for rec in caplog.records:
        if rec.name != "llm.upstream":
            continue
        match = UPSTREAM_LINE.search(rec.getMessage())
        if match:
            lines.append({**match.groupdict(), "message": rec.getMessage()})
    return lines


def sse_reply(text: str) -> httpx.Response:
    body = (
        "".join(
            f"data: {json.dumps(c)}\n\n"
            for c in (
                {
                    "model": "served",
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                },
                {
                    "model": "served",
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                },
            )
        )
        + "data: [DONE]\n\n"
    )
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body.encode())


async def generate() -> Any:
    return await AsyncClient().post(
        "/api/v1/llm/generate",
        data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        content_type="application/json",
    )


@pytest.mark.django_db(transaction=True)
async def test_one_line_per_upstream_request(
    llm_config: Callable[..., Any], respx_mock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(return_value=sse_reply("Hello"))
    with caplog.at_level(logging.INFO, logger="llm.upstream"):
        response = await generate()
    assert response.status_code == 200, response.content
    lines = upstream_lines(caplog)
    assert len(lines) == 1, caplog.text
    line = lines[0]
    assert line["provider"] == "lm_studio"
    assert line["model"] == "test-model"
    assert line["status"] == "200"
    assert line["attempt"] == "1"
    assert float(line["latency"]) >= 0


@pytest.mark.django_db(transaction=True)
async def test_each_attempt_gets_its_line(
    llm_config: Callable[..., Any], respx_mock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    llm_config(max_retries=3)
    respx_mock.post(f"{UPSTREAM}/chat/completions").mock(
        side_effect=[httpx.Response(503), httpx.ConnectError("refused"), sse_reply("Hi")]
    )
    with caplog.at_level(logging.INFO, logger="llm.upstream"):
        response = await generate()
    assert response.status_code == 200, response.content
    lines = upstream_lines(caplog)
    assert [line["attempt"] for line in lines] == ["1", "2", "3"], caplog.text
    assert lines[0]["status"] == "503"
    assert "ConnectError" in lines[1]["message"]  # no HTTP status: the line names the failure
    assert lines[2]["status"] == "200"
    assert {line["provider"] for line in lines} == {"lm_studio"}
    assert {line["model"] for line in lines} == {"test-model"}


async def test_a_ping_is_logged_too(
    llm_config: Callable[..., Any], respx_mock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from llm.providers import get_provider

    respx_mock.get(f"{UPSTREAM}/models").respond(json={"data": [{"id": "test-model"}]})
    with caplog.at_level(logging.INFO, logger="llm.upstream"):
        result = await get_provider().ping()
    assert result.reachable
    lines = upstream_lines(caplog)
    assert len(lines) == 1
    assert lines[0]["provider"] == "lm_studio"
    assert lines[0]["status"] == "200"
    assert lines[0]["attempt"] == "1"
