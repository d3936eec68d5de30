"""The OpenAI-compatible provider every concrete provider builds on.

It knows HTTP and the OpenAI wire format and nothing of Django's database, sockets or sessions:
retries with backoff before the first token, timeouts (connect, read, and idle between tokens),
SSE parsing (`llm.streaming.SSEDataReader`, held to httpx-sse's output), error mapping onto
`llm.exceptions`, and one pooled `httpx.AsyncClient` per event loop. Subclasses set headers,
payload extras and `check_enabled`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, cast

import httpx
import orjson

from ..exceptions import (
    BadGateway,
    LLMError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..idle import IdleTimer
from ..loops import PerLoop
from ..retries import backoff_delay
from ..streaming import (
    SSEDataReader,
    estimate_prompt_tokens,
    estimate_tokens,
    parse_chunk,
    parse_usage,
    raise_for_error,
    storable,
)
from ..structured import FORMS, Form, known_form, remember_form
from ..types import ChatRequest, Completion, PingResult, StreamChunk, Usage
from .errors import status_error, transport_error
from .network import closing_stream, upstream_transport

logger = logging.getLogger("llm.upstream")

# The first listed model is looked up again after this long (LM Studio may load another).
MODEL_LIST_TTL = 60.0
# Error messages are cut to this length, after secrets are taken out of them.
MESSAGE_MAX = 500
SECRET_SHAPES = re.compile(r"(?i)\bbearer\s+\S+|\bsk-[a-z0-9][a-z0-9_-]{7,}")


class OpenAICompatibleProvider:
    """A chat-completions server reached over HTTP at `base_url` (`/models`,
    `/chat/completions`)."""

    def __init__(
        self,
        alias: str,
        *,
        base_url: str,
        default_model: str = "",
        api_key: str = "",
        enabled: bool = True,
        read_timeout: float = 30,
        connect_timeout: float = 5,
        idle_timeout: float = 60,
        ping_timeout: float = 5,
        max_retries: int = 3,
        retry_delay: float = 2,
        retry_after_max: float = 60,
        max_connections: int = 20,
        max_keepalive: int = 10,
        max_tokens: int = 1024,
        response_format: str = "auto",
    ) -> None:
        self.alias = alias
        self.base_url = base_url.rstrip("/")
        self.default_model = default_model
        self.enabled = enabled
        self.read_timeout = float(read_timeout)
        self.connect_timeout = float(connect_timeout)
        self.idle_timeout = float(idle_timeout)
        self.ping_timeout = float(ping_timeout)
        self.max_retries = int(max_retries)
        self.retry_delay = float(retry_delay)
        self.retry_after_max = float(retry_after_max)
        self.max_connections = int(max_connections)
        self.max_keepalive = int(max_keepalive)
        self.max_tokens = int(max_tokens)
        # The form of `response_format` this server takes: "json_schema" (OpenAI's),
        # "json_object" (llama-cpp-python's), or "auto": as remembered, else found by asking.
        self.response_format = response_format
        self._api_key = api_key
        # httpx clients cannot cross event loops.
        self._clients = PerLoop(self._new_client, usable=lambda client: not client.is_closed)
        self._resolved_model: str | None = None
        self._resolved_at = 0.0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.alias} {self.base_url}>"

    # Hooks for subclasses ------------------------------------------------------------------

    def check_enabled(self) -> None:
        """Raise `ProviderDisabled` when this provider must not be called."""

    def get_headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def build_payload(self, request: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": model,
            "messages": list(request.messages),
            "max_tokens": request.max_tokens or self.max_tokens,
            "stream": stream,
        }
        if request.temperature is not None:
            payload["temperature"] = request.temperature
        if request.response_format is not None:
            payload["response_format"] = request.response_format.in_form(self.structured_form())
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return payload

    def structured_form(self) -> Form:
        """The form of `response_format` to send: as configured, else as found for this server."""
        for form in FORMS:
            if self.response_format == form:
                return form
        return known_form(self.base_url) or FORMS[0]

    # Client --------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.AsyncClient:
        """The pooled client of the running event loop."""
        return self._clients.get()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base_url + "/",
            # A stream holds its connection to the end, so waiting for a free one is queueing
            # behind other streams (up to LLM_MAX_CONNECTIONS), bounded like a read.
            timeout=httpx.Timeout(
                connect=self.connect_timeout,
                read=self.read_timeout,
                write=self.read_timeout,
                pool=self.read_timeout,
            ),
            transport=upstream_transport(
                self.base_url,
                httpx.Limits(
                    max_connections=self.max_connections,
                    max_keepalive_connections=self.max_keepalive,
                ),
            ),
            headers=self.get_headers(),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        """Close the current event loop's client."""
        client = self._clients.pop()
        if client is not None:
            await client.aclose()

    # Public API ----------------------------------------------------------------------------

    async def ping(self) -> PingResult:
        """List the models once, without retries, within `ping_timeout`; never raises an
        `LLMError`."""
        started = time.perf_counter()
        try:
            self.check_enabled()
            async with asyncio.timeout(self.ping_timeout):
                models = await self._list_models(retries=0)
        except TimeoutError:
            error: LLMError = UpstreamTimeout(
                f"{self.alias} did not answer within {self.ping_timeout:g} s", provider=self.alias
            )
        except LLMError as exc:
            error = exc
        else:
            latency = (time.perf_counter() - started) * 1000
            return PingResult(self.alias, self.base_url, True, round(latency, 1), models)
        return PingResult(self.alias, self.base_url, False, None, [], error.as_dict())

    async def list_models(self) -> list[str]:
        self.check_enabled()
        return await self._list_models(retries=self.max_retries)

    async def resolve_model(self, requested: str | None) -> str:
        """The model to ask for: the request's, the configured default, else the first listed."""
        if requested:
            return requested
        if self.default_model:
            return self.default_model
        now = time.monotonic()
        if self._resolved_model is None or now - self._resolved_at > MODEL_LIST_TTL:
            models = await self._list_models(retries=self.max_retries)
            if not models:
                raise BadGateway(f"{self.alias} lists no models to use", provider=self.alias)
            self._resolved_model, self._resolved_at = models[0], now
        return self._resolved_model

    async def generate(self, request: ChatRequest) -> Completion:
        """One non-streaming completion, retried as the settings say."""
        self.check_enabled()
        model = await self.resolve_model(request.model)
        payload = self.build_payload(request, model, stream=False)
        try:
            response = await self._send("POST", "chat/completions", model=model, json=payload)
        except LLMError as exc:
            if not self._form_refused(exc, payload):
                raise
            self._switch_form(request, payload)
            response = await self._send("POST", "chat/completions", model=model, json=payload)
        body = self._json(response)
        try:
            raise_for_error(body, provider=self.alias)
        except LLMError as exc:
            raise self._redacted(exc) from exc.__cause__
        try:
            choice = body["choices"][0]
            content = storable(choice["message"].get("content")) or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BadGateway(
                f"{self.alias} sent a completion without a message", provider=self.alias
            ) from exc
        usage = parse_usage(body.get("usage")) or Usage.estimate(
            estimate_prompt_tokens(request.messages), estimate_tokens(content)
        )
        return Completion(
            provider=self.alias,
            model=storable(body.get("model")) or model,
            content=content,
            finish_reason=storable(choice.get("finish_reason")) or "stop",
            usage=usage,
        )

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamChunk, None]:
        """Stream a completion: text pieces, then one last piece with finish reason and usage.

        Failures before the first text piece are retried like any request; after it they go to
        the caller, who holds the text so far. Closing this iterator closes the upstream response.
        """
        self.check_enabled()
        model = await self.resolve_model(request.model)
        payload = self.build_payload(request, model, stream=True)
        prompt_tokens = estimate_prompt_tokens(request.messages)
        attempt = 0
        switched = False
        while True:
            delivered = False
            try:
                async with aclosing(
                    self._stream_once(payload, model, attempt, prompt_tokens)
                ) as chunks:
                    async for chunk in chunks:
                        delivered = delivered or bool(chunk.text)
                        yield chunk
                return
            except LLMError as exc:
                self._redacted(exc)
                if delivered:
                    raise
                if not switched and self._form_refused(exc, payload):
                    switched = True
                    self._switch_form(request, payload)
                    continue  # at once, and not counted as a retry: it is another request
                await self._before_retry(exc, attempt, retries=self.max_retries)
            attempt += 1

    # Internals -----------------------------------------------------------------------------

    def _form_refused(self, exc: LLMError, payload: dict[str, Any]) -> bool:
        """Whether `exc` is the server refusing the form of `response_format` it was sent (so the
        other form may work): only when the form is not configured, and the refusal names it."""
        return (
            "response_format" in payload
            and self.response_format not in FORMS
            and isinstance(exc, UpstreamRejected | UpstreamUnavailable)
            and "response_format" in exc.message
        )

    def _switch_form(self, request: ChatRequest, payload: dict[str, Any]) -> None:
        """Ask in the other form from now on, for this server (remembered by base URL)."""
        assert request.response_format is not None
        refused = payload["response_format"]["type"]
        form = next(form for form in FORMS if form != refused)
        payload["response_format"] = request.response_format.in_form(form)
        remember_form(self.base_url, form)
        logger.info(
            "provider=%s refused response_format %s; asking as %s from now on",
            self.alias,
            refused,
            form,
        )

    async def _list_models(self, *, retries: int) -> list[str]:
        body = self._json(await self._send("GET", "models", retries=retries))
        try:
            return [str(item["id"]) for item in body["data"]]
        except (KeyError, TypeError) as exc:
            raise BadGateway(
                f"{self.alias} sent a model list without data", provider=self.alias
            ) from exc

    async def _send(
        self, method: str, path: str, *, model: str = "", retries: int | None = None, **kwargs: Any
    ) -> httpx.Response:
        """A whole (non-streaming) request, retried on timeouts, refusals, 408, 429 and 5xx."""
        retries = self.max_retries if retries is None else retries
        attempt = 0
        while True:
            started = time.perf_counter()
            cause: Exception | None = None
            try:
                response = await self.client.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                self._log(method, path, model, type(exc).__name__, attempt, started)
                error, cause = transport_error(self, exc, started_body=False), exc
            else:
                self._log(method, path, model, response.status_code, attempt, started)
                if response.status_code < 400:
                    return response
                error = status_error(self, response)
                if self._form_refused(error, kwargs.get("json") or {}):
                    raise error  # not retried: the caller asks again in the other form
            await self._before_retry(error, attempt, retries=retries, cause=cause)
            attempt += 1

    async def _stream_once(
        self, payload: dict[str, Any], model: str, attempt: int, prompt_tokens: int
    ) -> AsyncGenerator[StreamChunk, None]:
        """One streaming request: text pieces, then the closing piece; errors mapped, not
        retried."""
        started = time.perf_counter()
        status: int | str = "-"
        outcome = "ok"
        reported_model = finish_reason = None
        usage = None
        tokens = 0
        try:
            async with closing_stream(
                self.client, "POST", "chat/completions", json=payload
            ) as response:
                status = response.status_code
                if response.status_code >= 400:
                    await response.aread()
                    raise status_error(self, response)
                if "text/event-stream" not in response.headers.get("content-type", ""):
                    raise BadGateway(
                        f"{self.alias} did not answer with an event stream "
                        f"(Content-Type {response.headers.get('content-type')!r})",
                        provider=self.alias,
                    )
                # All the tokens one read brings go on as one piece (they arrived together).
                events = SSEDataReader()
                # An async generator, typed by httpx only as an iterator (we close it).
                reads = cast(AsyncGenerator[bytes, None], response.aiter_bytes())
                network = response.extensions.get("network_stream")
                idle = IdleTimer(self.idle_timeout, getattr(network, "has_data", None))
                ended = False
                try:
                    while not ended:
                        idle.reading = True
                        try:
                            data = await anext(reads)
                        except StopAsyncIteration:
                            data = None
                            ended = True
                        except asyncio.CancelledError as exc:
                            if not idle.caused(exc):
                                raise
                            if finish_reason:
                                break
                            raise UpstreamTimeout(
                                f"{self.alias} sent no token for {self.idle_timeout:g} s "
                                "(LLM_STREAM_IDLE_TIMEOUT)",
                                provider=self.alias,
                            ) from None
                        except httpx.HTTPError as exc:
                            if finish_reason:
                                break  # the reply was whole; only trailing usage or [DONE] is lost
                            raise transport_error(self, exc, started_body=True) from exc
                        finally:
                            idle.reading = False
                        pieces = []
                        failure = None
                        for event in events.flush() if data is None else events.feed(data):
                            try:
                                chunk = parse_chunk(event, provider=self.alias)
                            except BadGateway as exc:  # the tokens before it in this read go first
                                failure = exc
                                break
                            if chunk is None:
                                ended = True
                                break
                            reported_model = reported_model or chunk.model
                            usage = chunk.usage or usage
                            finish_reason = chunk.finish_reason or finish_reason
                            if chunk.text:
                                pieces.append(chunk.text)
                        if pieces:
                            tokens += len(pieces)
                            yield StreamChunk(
                                text="".join(pieces), model=reported_model or model, pieces=pieces
                            )
                            idle.touch()  # time the caller spent with the tokens is not idleness
                        if failure is not None:
                            raise failure
                finally:
                    idle.stop()
                    await reads.aclose()
            if not finish_reason:
                raise BadGateway(
                    f"{self.alias} ended the stream without a finish reason"
                    + (f" after {tokens} tokens" if tokens else ""),
                    provider=self.alias,
                )
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
            raise transport_error(self, exc, started_body=False) from exc
        except LLMError as exc:
            outcome = exc.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "closed-by-caller"
            raise
        finally:
            self._log(
                "POST",
                "chat/completions",
                model,
                status,
                attempt,
                started,
                tokens=tokens,
                outcome=outcome,
            )
        yield StreamChunk(
            finish_reason=finish_reason,
            usage=usage or Usage.estimate(prompt_tokens, tokens),
            model=reported_model or model,
        )

    async def _before_retry(
        self, exc: LLMError, attempt: int, *, retries: int, cause: Exception | None = None
    ) -> None:
        """Sleep before attempt `attempt + 1`, or raise `exc` when no retry is allowed."""
        retry_after = getattr(exc, "retry_after", None)
        if not exc.retryable or attempt >= retries:
            raise exc from cause or exc.__cause__
        if retry_after is not None and retry_after > self.retry_after_max:
            raise UpstreamUnavailable(
                f"{exc.message}; it asks to retry after {retry_after:g} s, more than "
                f"LLM_RETRY_AFTER_MAX ({self.retry_after_max:g} s)",
                provider=self.alias,
                retry_after=retry_after,
            ) from cause or exc
        delay = retry_after if retry_after is not None else backoff_delay(attempt, self.retry_delay)
        logger.info(
            "retrying provider=%s code=%s attempt=%d delay_s=%.2f",
            self.alias,
            exc.code,
            attempt + 2,
            delay,
        )
        await asyncio.sleep(delay)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise BadGateway(
                f"{self.alias} sent a body that is not JSON", provider=self.alias
            ) from exc
        if not isinstance(body, dict):
            raise BadGateway(f"{self.alias} sent JSON that is not an object", provider=self.alias)
        return body

    def redact(self, text: str) -> str:
        """`text` without our key, nor anything shaped like a key or a bearer credential (an
        upstream may echo the key back whole, cut, or in an Authorization header)."""
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        return SECRET_SHAPES.sub("[redacted]", text)

    def _redacted(self, exc: LLMError) -> LLMError:
        """The same error with secrets taken out of its message, then cut to a readable length."""
        message = self.redact(exc.message)
        if len(message) > MESSAGE_MAX:
            message = message[:MESSAGE_MAX] + "…"
        if message != exc.message:
            exc.message = message
            exc.args = (message,)
        return exc

    def _log(
        self,
        method: str,
        path: str,
        model: str,
        status: int | str,
        attempt: int,
        started: float,
        **extra: Any,
    ) -> None:
        latency_ms = (time.perf_counter() - started) * 1000
        details = "".join(f" {key}={value}" for key, value in extra.items())
        logger.info(
            "upstream provider=%s %s /%s model=%s status=%s attempt=%d latency_ms=%.1f%s",
            self.alias,
            method,
            path,
            model or "-",
            status,
            attempt + 1,
            latency_ms,
            details,
        )
