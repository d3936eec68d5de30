"""Secrets (issue 6, hardening 5): the OpenRouter key and the API token show up nowhere.

OpenRouter is the provider (switched on, with a recognisable key), pointed at a fake upstream that
echoes the `Authorization` header it receives in every error it sends: error statuses (JSON and
text bodies), in-stream error chunks (top level, in the choice, as a string), chunks that are not
JSON, and its model list. `API_TOKEN` is set too, so every client sends that recognisable value.
Every path is run, errors included, and neither value (nor a telling piece of it) may appear in:

- a log line: a handler on the root logger, every logger at DEBUG, through the `RedactSecrets`
  filter that `settings.LOGGING` configures (what the real console and file handlers apply);
- an HTTP response body or header: `/`, health, status, the docs, the schema, generate in JSON and
  SSE (success and each failure), the sessions API, invalid JSON, a missing or wrong token;
- a WebSocket frame: generate (success and each failure), bad frames, a watcher's frames;
- an admin page for a staff user: session list, session detail, message list and detail, searches;
- the database rows behind them;
- `manage.py llm_ping` and `llm_ping --json` (in-process and as a subprocess), and a live daphne's
  own output and log file.

The canary test proves the fake upstream really sends the key back, and the path tests check that
the upstream's words reach the client with the key cut out (`[redacted]`): without redaction, they
would fail.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connections
from django.test import AsyncClient
from django.utils.module_loading import import_string

from llm.local_model import free_port
from llm.models import Message, Session
from llm.providers import providers
from testkit import servers
from testkit.fake_upstream import FakeUpstream, Reply
from tests.llm import ws_client

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "sk-or-v1-SECRETSWEEP-9f8e7d6c5b4a"
TOKEN = "negotiator-APITOKENSWEEP-4c3b2a1f0e"
# The values, and the pieces of them that would still give them away if a message were cut.
MARKERS = (KEY, TOKEN, "SECRETSWEEP", "9f8e7d6c5b4a", "APITOKENSWEEP", "4c3b2a1f0e")
REDACTED = "[redacted]"
ROOT = Path(__file__).resolve().parents[2]

GENERATE = "/api/v1/llm/generate"
HI = [{"role": "user", "content": "Hi"}]
BEARER = {"Authorization": f"Bearer {TOKEN}"}
WS_PATH = f"{ws_client.PATH}?token={TOKEN}"


# The echoing upstream -----------------------------------------------------------------------------


@dataclass
class EchoReply(Reply):
    """A stream of `tokens`, then `error_event` (raw SSE bytes) instead of a finish reason."""

    error_event: bytes = b""


def event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def error_body(auth: str, status: int) -> bytes:
    return json.dumps(
        {
            "error": {
                "code": status,
                "message": f"Invalid credentials: Authorization: {auth}",
                "metadata": {"authorization": auth},
            }
        }
    ).encode()


# Each scenario is picked by the `model` of the request; the reply echoes the Authorization header.
SCENARIOS: dict[str, Callable[[str], Reply]] = {
    "echo-401": lambda auth: Reply(status=401, body=error_body(auth, 401)),
    "echo-403-text": lambda auth: Reply(
        status=403, body=f"forbidden for {auth}".encode(), headers={"content-type": "text/plain"}
    ),
    "echo-500": lambda auth: Reply(status=500, body=error_body(auth, 500)),
    "echo-429": lambda auth: Reply(
        status=429, body=error_body(auth, 429), headers={"Retry-After": "3600"}
    ),
    "echo-chunk": lambda auth: EchoReply(
        tokens=[], error_event=event({"error": {"code": 401, "message": f"key rejected: {auth}"}})
    ),
    "echo-chunk-late": lambda auth: EchoReply(
        tokens=["Partial", " reply"],
        error_event=event(
            {
                "error": {"code": 502, "message": f"provider disconnected ({auth})"},
                "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
            }
        ),
    ),
    "echo-choice-error": lambda auth: EchoReply(
        tokens=["x"],
        error_event=event(
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {},
                        "finish_reason": "error",
                        "error": {"message": f"said {auth}"},
                    }
                ]
            }
        ),
    ),
    "echo-string-error": lambda auth: EchoReply(
        tokens=[], error_event=event({"error": f"bad key {auth}"})
    ),
    "echo-invalid-json": lambda auth: EchoReply(
        tokens=["a"], error_event=f"data: {{not json {auth}\n\n".encode()
    ),
}
# Failures whose message carries the upstream's own words (and so the echoed key, redacted).
ECHOED = (
    "echo-401",
    "echo-403-text",
    "echo-500",
    "echo-429",
    "echo-chunk",
    "echo-chunk-late",
    "echo-choice-error",
    "echo-string-error",
    "echo-invalid-json",
)
EXPECTED_CODES = {
    "echo-401": "LLM_BAD_REQUEST",
    "echo-403-text": "LLM_BAD_REQUEST",
    "echo-500": "LLM_UNAVAILABLE",
    "echo-429": "LLM_UNAVAILABLE",
    "echo-chunk": "LLM_BAD_GATEWAY",
    "echo-chunk-late": "LLM_BAD_GATEWAY",
    "echo-choice-error": "LLM_BAD_GATEWAY",
    "echo-string-error": "LLM_BAD_GATEWAY",
    "echo-invalid-json": "LLM_BAD_GATEWAY",
}
# The key placed so that a message cut to its first 300 (status bodies) or 200 (stream chunks)
# characters would keep all of it but its last two characters, if the cut came before the redaction.
STRADDLES: dict[str, Callable[[str], Reply]] = {
    "straddle-401": lambda auth: Reply(
        status=401,
        body=json.dumps({"error": {"message": "A" * (300 - len(auth) + 2) + auth}}).encode(),
    ),
    "straddle-invalid-json": lambda auth: EchoReply(
        tokens=[],
        error_event=(
            "data: {not json " + "A" * (200 - len("{not json ") - len(auth) + 2) + auth + "\n\n"
        ).encode(),
    ),
    "straddle-string-error": lambda auth: EchoReply(
        tokens=[], error_event=event({"error": "A" * (200 - len(auth) + 2) + auth})
    ),
}


class EchoingUpstream(FakeUpstream):
    """tests/fake_upstream.FakeUpstream, answering with the Authorization header in its errors."""

    def __init__(self) -> None:
        super().__init__(models=["echo-model"])
        self.models_reply = "ok"  # "ok", or a SCENARIOS name for `GET /models`
        self.authorizations: list[str] = []

    async def _answer(
        self, request: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        auth = request.headers.get("authorization", "")
        self.authorizations.append(auth)
        if request.path.endswith("/models") and self.models_reply != "ok":
            reply = {**SCENARIOS, **STRADDLES}[self.models_reply](auth)
            await self._send(
                writer,
                reply.status,
                reply.body or b"",
                {"content-type": "application/json", **reply.headers},
            )
            return True
        model = request.body.get("model") if isinstance(request.body, dict) else None
        scenario = (
            (SCENARIOS.get(model) or STRADDLES.get(model)) if isinstance(model, str) else None
        )
        if scenario is not None:
            self.replies.appendleft(scenario(auth))  # taken by the parent before it first awaits
        return await super()._answer(request, reader, writer)

    async def _write_stream(self, reply: Reply, writer: asyncio.StreamWriter) -> bool:
        if not isinstance(reply, EchoReply):
            return await super()._write_stream(reply, writer)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            b"cache-control: no-cache\r\nconnection: close\r\n\r\n"
        )
        await self._event(
            writer, self._chunk(reply, {"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        )
        for index, token in enumerate(reply.tokens):
            if index and reply.delay:
                await asyncio.sleep(reply.delay)
            await self._event(
                writer,
                self._chunk(
                    reply,
                    {"choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]},
                ),
            )
        await self._raw(writer, reply.error_event)
        await self._end(writer)
        return True


class ThreadedUpstream:
    """The echoing upstream on its own event loop in a thread: reachable from sync and async tests,
    from schemathesis-free in-process code, from subprocesses and from a live daphne alike."""

    def __init__(self) -> None:
        self.fake = EchoingUpstream()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="echoing-upstream", daemon=True
        )

    def start(self) -> str:
        self.thread.start()
        return asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def echo_server() -> Iterator[ThreadedUpstream]:
    server = ThreadedUpstream()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def openrouter_at(llm_config: Callable[..., dict[str, Any]]) -> Callable[..., None]:
    """Select OpenRouter, enabled, with KEY, at `base_url`."""

    def configure(base_url: str, **options: Any) -> None:
        llm_config(
            provider="openrouter",
            openrouter={
                "base_url": base_url,
                "api_key": KEY,
                "enabled": True,
                "default_model": "echo-model",
                **options,
            },
            max_retries=1,  # one retry: the retry's log line is covered too
        )

    return configure


@pytest.fixture
def refused() -> str:
    """An address where nothing listens."""
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.fixture
def echo(
    echo_server: ThreadedUpstream, settings: Any, openrouter_at: Callable[..., None]
) -> Iterator[EchoingUpstream]:
    """OpenRouter selected, enabled, with KEY, at the echoing upstream; API_TOKEN set to TOKEN."""
    openrouter_at(echo_server.fake.base_url)
    settings.API_TOKEN = TOKEN
    echo_server.fake.models_reply = "ok"
    yield echo_server.fake
    echo_server.fake.models_reply = "ok"


@pytest.fixture(autouse=True)
async def _close_clients() -> Any:
    yield
    await providers.aclose()
    await sync_to_async(connections.close_all)()  # PostgreSQL drops no test database with one open


# Where secrets must not be ------------------------------------------------------------------------


def leaks(text: str) -> list[str]:
    return [marker for marker in MARKERS if marker in text]


def shown(text: str, marker: str) -> str:
    at = text.find(marker)
    return text[max(0, at - 60) : at + len(marker) + 30].replace("\n", " ")


def assert_clean(where: str, text: str) -> None:
    found = leaks(text)
    if found:
        pytest.fail(f"{found} in {where}: ...{shown(text, found[0])}...")


class Seen:
    """Everything a path showed, by where; checked at once, so a failure lists every leak."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, text: str) -> str:
        self.items.append((where, text))
        return text

    def assert_clean(self) -> None:
        found = [(where, leaks(text), text) for where, text in self.items if leaks(text)]
        if found:
            pytest.fail(
                f"secrets shown in {len(found)} of {len(self.items)} places:\n"
                + "\n".join(
                    f"- {where}: {markers} ...{shown(text, markers[0])}..."
                    for where, markers, text in found
                )
            )


class Logs:
    """Every record of every logger at DEBUG, formatted as the configured handlers format it.

    Through the RedactSecrets filter that settings.LOGGING configures.
    """

    def __init__(self, settings: Any) -> None:
        config = settings.LOGGING
        filter_factory = import_string(config["filters"]["redact_secrets"]["()"])
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setLevel(logging.DEBUG)
        self.handler.addFilter(filter_factory())
        self.handler.setFormatter(logging.Formatter(config["formatters"]["plain"]["format"]))
        # What the project's real handlers carry: every root handler redacts.
        for handler in logging.getLogger().handlers:
            if type(handler).__module__.startswith("logging"):
                assert any(isinstance(f, filter_factory) for f in handler.filters), handler

    def __enter__(self) -> Logs:
        self.loggers = [logging.getLogger()] + [
            logger
            for logger in logging.Logger.manager.loggerDict.values()
            if isinstance(logger, logging.Logger)
        ]
        self.levels = [(logger, logger.level) for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(logging.DEBUG)
        self.attached = [logging.getLogger()] + [
            logger for logger in self.loggers[1:] if not logger.propagate
        ]
        for logger in self.attached:
            logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for logger in self.attached:
            logger.removeHandler(self.handler)
        for logger, level in self.levels:
            logger.setLevel(level)

    @property
    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture
def logs(settings: Any) -> Iterator[Logs]:
    with Logs(settings) as captured:
        yield captured
    assert_clean("the log", captured.text)


def http_text(response: Any, body: bytes | None = None) -> str:
    headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    content = body if body is not None else (b"" if response.streaming else response.content)
    return f"HTTP {response.status_code}\n{headers}\n\n{content.decode('utf-8', 'replace')}"


async def streamed(response: Any) -> bytes:
    return b"".join([chunk async for chunk in response.streaming_content])


def sse_frames(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.decode().split("\n") if line.startswith("data: ")]


class Client(AsyncClient):
    """An AsyncClient sending `headers` with every request (the constructor's `headers` do not reach
    the ASGI scope of an async request)."""

    def __init__(self, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.default_headers = headers or {}

    def generic(
        self,
        method: str,
        path: str,
        *args: Any,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        return super().generic(
            method, path, *args, headers={**self.default_headers, **(headers or {})}, **kwargs
        )


async def post_generate(client: AsyncClient, **fields: Any) -> Any:
    return await client.post(
        GENERATE, data=json.dumps({"messages": HI, **fields}), content_type="application/json"
    )


@sync_to_async
def stored_text() -> str:
    """Every stored session and message, field by field."""
    rows = [repr(list(Session.objects.values())), repr(list(Message.objects.values()))]
    return "\n".join(rows)


# The canary: the fake upstream really echoes the key ----------------------------------------------


@pytest.mark.parametrize("scenario", [*SCENARIOS, *STRADDLES])
def test_the_fake_upstream_echoes_the_key(echo_server: ThreadedUpstream, scenario: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": scenario, "messages": HI, "stream": True}
    raw = httpx.post(
        f"{echo_server.fake.base_url}/chat/completions", json=body, headers=headers, timeout=5
    ).text
    assert KEY in raw, raw


def test_the_fake_model_list_echoes_the_key(echo_server: ThreadedUpstream) -> None:
    echo_server.fake.models_reply = "echo-401"
    try:
        raw = httpx.get(
            f"{echo_server.fake.base_url}/models", headers={"Authorization": f"Bearer {KEY}"}
        ).text
    finally:
        echo_server.fake.models_reply = "ok"
    assert KEY in raw, raw


# HTTP ---------------------------------------------------------------------------------------------


async def test_http_responses_never_show_the_key_or_the_token(
    echo: EchoingUpstream, logs: Logs, openrouter_at: Callable[..., None], refused: str
) -> None:
    seen = Seen()
    client = Client(headers=BEARER)

    for path in (
        "/",
        "/api/v1/health",
        "/api/v1/llm/status",
        "/api/v1/docs",
        "/api/v1/openapi.json",
    ):
        response = await client.get(path)
        assert response.status_code == 200, (path, response.content)
        seen.add(f"GET {path}", http_text(response))
    echo.models_reply = "echo-401"
    for path in ("/api/v1/health", "/api/v1/llm/status"):
        text = seen.add(
            f"GET {path} (the model list echoes the key)", http_text(await client.get(path))
        )
        assert REDACTED in text, text  # the upstream's words arrive, without the key
    echo.models_reply = "ok"

    # Generate, JSON: success and each failure.
    response = await post_generate(client)
    assert response.status_code == 200 and response.json()["content"] == "Hello, world!", (
        response.content
    )
    seen.add("generate ok", http_text(response))
    for scenario in SCENARIOS:
        response = await post_generate(client, model=scenario)
        text = seen.add(f"generate {scenario}", http_text(response))
        assert response.json()["error"]["code"] == EXPECTED_CODES[scenario], text
        assert REDACTED in response.json()["error"]["message"], text

    # Generate, SSE: success and each failure.
    response = await post_generate(client, stream=True)
    body = await streamed(response)
    assert sse_frames(body)[-1]["type"] == "done", body
    seen.add("generate SSE ok", http_text(response, body))
    for scenario in SCENARIOS:
        response = await post_generate(client, stream=True, model=scenario)
        body = await streamed(response)
        seen.add(f"generate SSE {scenario}", http_text(response, body))
        last = sse_frames(body)[-1]
        assert last["type"] == "error" and last["code"] == EXPECTED_CODES[scenario], body
        assert REDACTED in last["message"], body

    # The upstream refuses the connection; OpenRouter switched off (its key still set).
    for name, options, code in (
        ("refused", {"base_url": refused}, "LLM_UNAVAILABLE"),
        ("switched off", {"base_url": echo.base_url, "enabled": False}, "LLM_PROVIDER_DISABLED"),
    ):
        openrouter_at(**options)
        response = await post_generate(client)
        assert response.json()["error"]["code"] == code, response.content
        seen.add(f"generate, upstream {name}", http_text(response))
        response = await post_generate(client, stream=True)
        seen.add(f"generate SSE, upstream {name}", http_text(response, await streamed(response)))
        for path in ("/api/v1/health", "/api/v1/llm/status"):
            seen.add(f"GET {path}, upstream {name}", http_text(await client.get(path)))
    openrouter_at(echo.base_url)

    # What the client sent wrong: no JSON, no token, a wrong token.
    response = await client.post(GENERATE, data=b"{not json", content_type="application/json")
    assert response.json()["error"]["code"] == "INVALID_JSON"
    seen.add("invalid JSON", http_text(response))
    for name, headers in (
        ("no token", {}),
        ("wrong token", {"Authorization": f"Bearer {TOKEN[:-1]}x"}),
        ("the key as token", {"Authorization": f"Bearer {KEY}"}),
    ):
        response = await Client(headers=headers).post(
            GENERATE, data=json.dumps({"messages": HI}), content_type="application/json"
        )
        assert response.status_code == 401, response.content
        seen.add(f"generate, {name}", http_text(response))
        response = await Client(headers=headers).get("/api/v1/sessions")
        assert response.status_code == 401
        seen.add(f"sessions, {name}", http_text(response))

    # The sessions API shows each stored failure.
    response = await client.get("/api/v1/sessions", {"page_size": 100})
    listed = response.json()
    assert listed["count"] == 2 + 2 * len(SCENARIOS) + 4, listed["count"]
    seen.add("sessions list", http_text(response))
    for item in listed["items"]:
        seen.add(
            f"session {item['id']}", http_text(await client.get(f"/api/v1/sessions/{item['id']}"))
        )
    assert REDACTED in http_text(response)

    seen.add("the database", await stored_text())
    seen.assert_clean()
    assert f"Bearer {KEY}" in echo.authorizations  # the key was really sent upstream...
    assert (
        "generation failed" in logs.text and "provider=openrouter" in logs.text
    )  # ...and its failures logged
    # The capture sees DEBUG records of the project's loggers, through the configured filter.
    logging.getLogger("llm.upstream").debug("canary headers=%s", {"Authorization": f"Bearer {KEY}"})
    assert f"canary headers={{'Authorization': 'Bearer {REDACTED}'}}" in logs.text


# WebSocket ----------------------------------------------------------------------------------------


async def until_end(comm: Any, seen: Seen, where: str) -> list[dict[str, Any]]:
    frames = await ws_client.until_end(comm)
    for frame in frames:
        seen.add(f"{where}: {frame['type']} frame", json.dumps(frame))
    return frames


async def test_websocket_frames_never_show_the_key_or_the_token(
    echo: EchoingUpstream, logs: Logs, openrouter_at: Callable[..., None], refused: str
) -> None:
    seen = Seen()
    comm = await ws_client.open_socket(WS_PATH)
    try:
        await ws_client.generate(comm)
        assert (await until_end(comm, seen, "generate ok"))[-1]["type"] == "done"
        for scenario in SCENARIOS:
            await ws_client.generate(comm, model=scenario)
            end = (await until_end(comm, seen, f"generate {scenario}"))[-1]
            assert end["type"] == "error" and end["code"] == EXPECTED_CODES[scenario], end
            assert REDACTED in end["message"], end
        openrouter_at(refused)
        await ws_client.generate(comm)
        assert (await until_end(comm, seen, "generate, upstream refused"))[-1][
            "code"
        ] == "LLM_UNAVAILABLE"
        openrouter_at(echo.base_url)

        await comm.send_to(text_data="{not json")
        await comm.send_json_to({"type": "nonsense", "token": TOKEN})
        await comm.send_json_to({"type": "generate", "messages": "not a list", "api_key": KEY})
        await comm.send_to(bytes_data=b"\xff" + KEY.encode())
        errors = [await ws_client.recv(comm) for _ in range(4)]
        for frame in errors:
            seen.add(f"bad frame: {frame['code']}", json.dumps(frame))
        assert [f["code"] for f in errors[:3]] == [
            "INVALID_JSON",
            "UNKNOWN_TYPE",
            "INVALID_REQUEST",
        ], errors
    finally:
        await comm.disconnect()

    accepted, code = await ws_client.try_connect(f"{ws_client.PATH}?token={TOKEN[:-1]}x")
    assert not accepted, code
    seen.add("the database", await stored_text())
    seen.assert_clean()


async def test_a_watchers_frames_never_show_the_key(echo: EchoingUpstream, logs: Logs) -> None:
    seen = Seen()
    SCENARIOS["echo-slow"] = lambda auth: EchoReply(
        tokens=[f" t{i}" for i in range(10)],
        delay=0.05,
        error_event=event({"error": {"code": 502, "message": f"lost the key {auth}"}}),
    )
    generator = await ws_client.open_socket(WS_PATH)
    watcher = await ws_client.open_socket(WS_PATH)
    try:
        await ws_client.generate(generator, model="echo-slow")
        start = await ws_client.recv(generator)
        assert start["type"] == "start", start
        await watcher.send_json_to({"type": "watch", "session_id": start["session_id"]})
        watched = await until_end(watcher, seen, "watcher")
        await until_end(generator, seen, "generator")
    finally:
        SCENARIOS.pop("echo-slow")
        await generator.disconnect()
        await watcher.disconnect()
    assert watched[0]["type"] == "watching", watched
    assert watched[-1]["type"] == "error" and REDACTED in watched[-1]["message"], watched
    seen.assert_clean()


# Admin --------------------------------------------------------------------------------------------


async def test_admin_pages_never_show_the_key(echo: EchoingUpstream, logs: Logs) -> None:
    client = Client(headers=BEARER)
    for scenario in ECHOED:
        await post_generate(client, model=scenario)
        response = await post_generate(client, model=scenario, stream=True)
        await streamed(response)
    assert (await post_generate(client)).status_code == 200
    ids = await sync_to_async(lambda: list(Session.objects.values_list("id", flat=True)))()
    message_ids = await sync_to_async(lambda: list(Message.objects.values_list("id", flat=True)))()
    errors = await sync_to_async(
        lambda: list(
            Session.objects.exclude(error_message="").values_list("error_message", flat=True)
        )
    )()
    assert len(ids) == 2 * len(ECHOED) + 1 and len(errors) == 2 * len(ECHOED), errors
    assert all(REDACTED in message for message in errors), errors  # stored with the key cut out

    staff = await sync_to_async(get_user_model().objects.create_superuser)(
        "staff", "staff@example.com", "pw"
    )
    admin = Client()
    await admin.aforce_login(staff)
    pages = [
        "/admin/",
        "/admin/llm/",
        "/admin/llm/session/",
        "/admin/llm/session/?status__exact=failed",
        "/admin/llm/session/?q=redacted",
        "/admin/llm/session/?error_code=LLM_BAD_GATEWAY",
        "/admin/llm/message/",
        "/admin/llm/message/?q=Partial",
        "/admin/llm/message/?role__exact=assistant",
        *[f"/admin/llm/session/{pk}/change/" for pk in ids],
        *[f"/admin/llm/message/{pk}/change/" for pk in message_ids],
    ]
    seen = Seen()
    for page in pages:
        response = await admin.get(page)
        assert response.status_code in (200, 302), (
            page,
            response.status_code,
        )  # 302: an unknown filter
        seen.add(f"admin page {page}", http_text(response))
    shown_errors = sum(REDACTED in text for where, text in seen.items if "/change/" in where)
    assert shown_errors == 2 * len(ECHOED), (
        shown_errors
    )  # each failed session shows its error, redacted
    seen.add("the database", await stored_text())
    seen.assert_clean()


# llm_ping -----------------------------------------------------------------------------------------


def ping(*args: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        call_command("llm_ping", *args, stdout=stdout, stderr=stderr)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.mark.parametrize("models_reply", ["ok", "echo-401", "echo-403-text", "echo-500", "refused"])
@pytest.mark.parametrize("args", [(), ("--json",), ("--provider", "openrouter", "--json")])
def test_llm_ping_never_shows_the_key(
    echo: EchoingUpstream,
    logs: Logs,
    openrouter_at: Callable[..., None],
    refused: str,
    models_reply: str,
    args: tuple[str, ...],
) -> None:
    if models_reply == "refused":
        openrouter_at(refused)
    else:
        echo.models_reply = models_reply
    code, out, err = ping(*args)
    assert code == (0 if models_reply == "ok" else 1), (out, err)
    if models_reply.startswith("echo"):
        assert REDACTED in out, out  # the upstream's answer is shown, without the key
    if "--json" in args:
        json.loads(out)
    assert_clean("llm_ping stdout", out)
    assert_clean("llm_ping stderr", err)


@pytest.mark.parametrize("args", [(), ("--json",)])
def test_llm_ping_subprocess_never_shows_the_key(
    echo: EchoingUpstream, tmp_path: Path, args: tuple[str, ...]
) -> None:
    echo.models_reply = "echo-401"
    env = servers.project_env(
        tmp_path,
        LLM_PROVIDER="openrouter",
        LLM_ENABLE_OPENROUTER="true",
        OPENROUTER_API_KEY=KEY,
        OPENROUTER_BASE_URL=echo.base_url,
        API_TOKEN=TOKEN,
        LOG_LEVEL="DEBUG",
        LLM_MAX_RETRIES="0",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "llm_ping", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "LLM_BAD_REQUEST" in result.stdout and REDACTED in result.stdout, result.stdout
    assert f"Bearer {KEY}" in echo.authorizations
    assert_clean("llm_ping subprocess stdout", result.stdout)
    assert_clean("llm_ping subprocess stderr", result.stderr)


# A live server ------------------------------------------------------------------------------------


def test_a_live_servers_output_and_log_file_never_show_secrets(
    echo: EchoingUpstream, tmp_path: Path
) -> None:
    """daphne, as `make run` serves, at LOG_LEVEL=DEBUG with LOG_DIR: its own output (access log
    included, which bypasses Python logging) and the rotating log file."""
    from websockets.sync.client import connect
    from websockets.typing import Origin

    log_dir = tmp_path / "logs"
    env = servers.project_env(
        tmp_path,
        LLM_PROVIDER="openrouter",
        LLM_ENABLE_OPENROUTER="true",
        OPENROUTER_API_KEY=KEY,
        OPENROUTER_BASE_URL=echo.base_url,
        API_TOKEN=TOKEN,
        LOG_LEVEL="DEBUG",
        LOG_DIR=str(log_dir),
        LLM_MAX_RETRIES="0",
    )
    echo.models_reply = "echo-401"
    with servers.daphne(env, tmp_path) as base:
        with httpx.Client(base_url=base, headers=BEARER, timeout=10) as http:
            seen = [http.get("/api/v1/health"), http.get("/api/v1/llm/status")]
            for scenario in ("echo-401", "echo-chunk-late", "echo-invalid-json"):
                seen.append(http.post(GENERATE, json={"messages": HI, "model": scenario}))
                seen.append(
                    http.post(GENERATE, json={"messages": HI, "model": scenario, "stream": True})
                )
            seen.append(
                http.post(
                    GENERATE, content=b"{not json", headers={"content-type": "application/json"}
                )
            )
            seen.append(
                httpx.post(
                    base + GENERATE, json={"messages": HI}, headers={"Authorization": "Bearer no"}
                )
            )
        ws_url = base.replace("http", "ws") + WS_PATH
        frames: list[str] = []
        with connect(ws_url, origin=Origin(base), open_timeout=5, close_timeout=5) as socket:
            for scenario in ("echo-chunk", "echo-choice-error"):
                socket.send(json.dumps({"type": "generate", "messages": HI, "model": scenario}))
                while True:
                    frame = socket.recv(timeout=10)
                    assert isinstance(frame, str), frame  # the contract's frames are text
                    frames.append(frame)
                    if json.loads(frames[-1])["type"] in ("done", "error"):
                        break
    for response in seen:
        assert_clean(
            f"live {response.request.method} {response.request.url.path}",
            f"{response.headers}\n{response.text}",
        )
    assert any(REDACTED in response.text for response in seen)
    for frame in frames:
        assert_clean("live WebSocket frame", frame)
    assert frames and REDACTED in frames[-1], frames

    output = "\n".join(path.read_text(errors="replace") for path in tmp_path.glob("daphne-*.log"))
    log_file = (log_dir / "negotiator.log").read_text(errors="replace")
    assert "generation failed" in log_file and "/ws/llm/stream/" in output, (
        output[-2000:],
        log_file[-2000:],
    )
    assert_clean("daphne's output", output)
    assert_clean("the LOG_DIR file", log_file)


# Truncated messages -------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", list(STRADDLES))
async def test_a_key_cut_by_truncation_is_still_redacted(
    echo: EchoingUpstream, logs: Logs, scenario: str
) -> None:
    """Upstream words are cut short (300 characters of an error body, 200 of a bad chunk).

    That happens before they reach a message: the key must be cut out first, or what is left of it
    (all but two characters here) is shown, stored and logged.
    """
    seen = Seen()
    client = Client(headers=BEARER)
    response = await post_generate(client, model=scenario)
    assert response.status_code in (400, 502), response.content
    seen.add("generate (JSON)", http_text(response))
    response = await post_generate(client, model=scenario, stream=True)
    seen.add("generate (SSE)", http_text(response, await streamed(response)))
    comm = await ws_client.open_socket(WS_PATH)
    try:
        await ws_client.generate(comm, model=scenario)
        await until_end(comm, seen, "WebSocket")
    finally:
        await comm.disconnect()
    seen.add("the sessions API", http_text(await client.get("/api/v1/sessions")))
    staff = await sync_to_async(get_user_model().objects.create_superuser)(
        "staff", "staff@example.com", "pw"
    )
    admin = Client()
    await admin.aforce_login(staff)
    ids = await sync_to_async(lambda: list(Session.objects.values_list("id", flat=True)))()
    for pk in ids:
        seen.add(
            "an admin session page", http_text(await admin.get(f"/admin/llm/session/{pk}/change/"))
        )
    if scenario == "straddle-401":  # the model list's error body is cut the same way
        echo.models_reply = scenario
        for args in ((), ("--json",)):
            code, out, err = await sync_to_async(ping, thread_sensitive=False)(*args)
            assert code == 1, out
            seen.add(f"llm_ping {' '.join(args)}", out + err)
        seen.add("/api/v1/llm/status", http_text(await client.get("/api/v1/llm/status")))
    seen.add("the database", await stored_text())
    seen.assert_clean()
