"""How an upstream's failures map onto the exception tree: HTTP statuses and transport errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import orjson

from ..exceptions import (
    BadGateway,
    LLMError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..retries import RETRY_STATUSES, parse_retry_after

if TYPE_CHECKING:
    from .base import OpenAICompatibleProvider


def status_error(provider: OpenAICompatibleProvider, response: httpx.Response) -> LLMError:
    """The error for an upstream's HTTP error status.

    408 and timeouts are LLM_TIMEOUT, 429 and 5xx LLM_UNAVAILABLE (retried), other 4xx
    LLM_BAD_REQUEST.
    """
    status = response.status_code
    detail = provider.redact(error_detail(response))[:300]
    message = f"{provider.alias} answered HTTP {status}" + (f": {detail}" if detail else "")
    if status == 408:
        return UpstreamTimeout(message, provider=provider.alias)
    if status in RETRY_STATUSES:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return UpstreamUnavailable(message, provider=provider.alias, retry_after=retry_after)
    return UpstreamRejected(message, provider=provider.alias)


def transport_error(
    provider: OpenAICompatibleProvider, exc: httpx.HTTPError, *, started_body: bool
) -> LLMError:
    """A timeout is LLM_TIMEOUT; a failure once the body started is a cut stream (LLM_BAD_GATEWAY);
    before it, the server is unreachable (LLM_UNAVAILABLE)."""
    alias = provider.alias
    if isinstance(exc, httpx.TimeoutException):
        kind = {
            httpx.ConnectTimeout: (
                f"connect within {provider.connect_timeout:g} s (LLM_CONNECT_TIMEOUT)"
            ),
            httpx.PoolTimeout: (
                f"free one of its {provider.max_connections} connections (LLM_MAX_CONNECTIONS) "
                f"within {provider.read_timeout:g} s"
            ),
        }.get(type(exc), f"send a byte within {provider.read_timeout:g} s (LM_STUDIO_TIMEOUT)")
        return UpstreamTimeout(f"{alias} did not {kind}", provider=alias)
    if started_body:
        return BadGateway(f"{alias} cut the stream: {type(exc).__name__}", provider=alias)
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return UpstreamRejected(f"{alias} base URL is not usable: {exc}", provider=alias)
    return UpstreamUnavailable(
        f"{alias} is unreachable at {provider.base_url}: {type(exc).__name__}", provider=alias
    )


def error_detail(response: httpx.Response) -> str:
    """The upstream's own error message, on one line (cut short by the caller, after redaction)."""
    try:
        body = orjson.loads(response.content)
        error = body.get("error") if isinstance(body, dict) else None
        detail = (error.get("message") if isinstance(error, dict) else error) or body.get("detail")
        detail = str(detail) if detail else response.text
    except (orjson.JSONDecodeError, AttributeError):
        detail = response.text
    return " ".join(detail.split())
