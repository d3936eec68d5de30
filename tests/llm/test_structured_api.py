"""Structured output (`response_format`) through every face, against fake upstreams doing what a
real server will not do on demand: refuse one form and take the other, break the schema, answer
as OpenRouter, be down so a fallback that needs the other form takes over.

Each fake here is a real socket (`testkit.fake_upstream`); its request bodies are checked.
`FormServer` is the one addition: it refuses a `response_format` of one type the way
llama-cpp-python's server or LM Studio do, whatever else is queued.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from html import unescape as html_unescape
from typing import Any

import pytest
from django.test import AsyncClient

from llm import ChatRequest, Generation, get_provider, structured
from llm.exceptions import UpstreamRejected
from llm.generation import Done, Token
from llm.local_model import free_port
from llm.models import Session
from llm.providers import providers
from llm.structured import FieldReader, ResponseFormat, known_form, remember_form
from testkit.fake_upstream import FakeUpstream, Reply, Request

from .ws_client import open_socket, recv, session_row, token_frames, until_end

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("close_clients")]

GENERATE = "/api/v1/llm/generate"
HI = [{"role": "user", "content": "The bicycle is 150. Your move?"}]
CLOSED = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused

# `message` first, so it can be shown as it streams.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "message": {"type": "string"},
        "action": {"enum": ["offer", "accept", "reject", "walk_away"]},
        "price": {"type": "number"},
    },
    "required": ["message", "action", "price"],
}
RESPONSE_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "move", "schema": SCHEMA},
}
STRICT_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "move", "schema": SCHEMA, "strict": True},
}
JSON_OBJECT_FORM = {"type": "json_object", "schema": SCHEMA}  # llama-cpp-python's own

MOVE: dict[str, Any] = {
    "message": 'I can do 120, "final" \U0001f600',
    "action": "offer",
    "price": 120,
}
MOVE_TEXT = json.dumps(MOVE)  # the emoji as \ud83d\ude00, cut below between its two halves
MOVE_TOKENS = [MOVE_TEXT[i : i + 5] for i in range(0, len(MOVE_TEXT), 5)]

# llama-cpp-python 0.3.x's server, asked with {"type": "json_schema", ...} (measured).
LLAMA_CPP_REFUSAL = Reply(
    status=500,
    body=json.dumps(
        {
            "error": {
                "message": (
                    "1 validation error: {'type': 'literal_error', 'loc': ('body', "
                    "'response_format', 'type'), 'msg': \"Input should be 'text' or "
                    "'json_object'\", 'input': 'json_schema', 'ctx': {'expected': \"'text' or "
                    "'json_object'\"}}"
                ),
                "type": "internal_server_error",
            }
        }
    ).encode(),
)
# LM Studio, asked with {"type": "json_object"}.
LM_STUDIO_REFUSAL = Reply(
    status=400,
    body=json.dumps({"error": "'response_format.type' must be 'json_schema' or 'text'"}).encode(),
)


class FormServer(FakeUpstream):
    """Refuses a `response_format` of type `refused` with `refusal` (before anything queued),
    and answers every other request as the plain fake does."""

    def __init__(self, refused: str, refusal: Reply) -> None:
        super().__init__(Reply(tokens=MOVE_TOKENS))
        self.refused = refused
        self.refusal = refusal

    async def _answer(
        self, request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        body = request.body if isinstance(request.body, dict) else {}
        form = body.get("response_format")
        if isinstance(form, dict) and form.get("type") == self.refused:
            self.replies.appendleft(self.refusal)
        return await super()._answer(request, reader, writer)


@pytest.fixture(autouse=True)
def _forget_forms() -> Iterator[None]:
    """No server's form is known at the start of a test, nor left behind by one."""
    structured._forms.clear()
    yield
    structured._forms.clear()


@pytest.fixture
def structured_upstream(upstream: FakeUpstream) -> FakeUpstream:
    """The plain fake, answering MOVE (as a server that takes OpenAI's form would)."""
    upstream.default = Reply(tokens=MOVE_TOKENS)
    return upstream


@pytest.fixture
async def llama_cpp() -> AsyncIterator[FormServer]:
    fake = FormServer("json_schema", LLAMA_CPP_REFUSAL)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def lm_studio_like() -> AsyncIterator[FormServer]:
    fake = FormServer("json_object", LM_STUDIO_REFUSAL)
    await fake.start()
    yield fake
    await fake.stop()


def serve_from(
    llm_config: Callable[..., Any],
    fake: FakeUpstream,
    lm_studio: dict[str, Any] | None = None,
    **defaults: Any,
) -> None:
    """lm_studio pointed at `fake` (its first listed model), with these options."""
    llm_config(
        lm_studio={"base_url": fake.base_url, "default_model": "", **(lm_studio or {})}, **defaults
    )


# Faces -----------------------------------------------------------------------------------------


def body(response_format: Any = RESPONSE_FORMAT, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"messages": HI, **extra}
    if response_format is not None:
        fields["response_format"] = response_format
    return fields


async def post(payload: dict[str, Any]) -> Any:
    return await AsyncClient().post(GENERATE, json.dumps(payload), content_type="application/json")


async def sse_frames(payload: dict[str, Any]) -> list[dict[str, Any]]:
    response = await post({**payload, "stream": True})
    assert response.status_code == 200, response
    assert response["Content-Type"].startswith("text/event-stream")
    text = b"".join([part async for part in response.streaming_content]).decode()
    assert "Traceback" not in text
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]


async def ws_frames(payload: dict[str, Any]) -> list[dict[str, Any]]:
    comm = await open_socket()
    try:
        await comm.send_json_to({"type": "generate", **payload})
        return await until_end(comm)
    finally:
        await comm.disconnect()


def kinds(frames: list[dict[str, Any]]) -> list[str]:
    return [frame["type"] for frame in frames]


def streamed_text(frames: list[dict[str, Any]]) -> str:
    return "".join(frame["text"] for frame in token_frames(frames))


def sent_forms(fake: FakeUpstream) -> list[Any]:
    """The `response_format` of each chat request the fake received (None: none sent)."""
    return [
        request.body.get("response_format") if isinstance(request.body, dict) else None
        for request in fake.chat_requests
    ]


def error_of(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.content
    payload = json.loads(response.content)
    assert set(payload) == {"error"} and payload["error"]["code"] == code, payload
    return str(payload["error"]["message"])


async def stored(session_id: str | None = None) -> tuple[Session, str]:
    """The session (the only one when no id is given) and its stored reply's text."""
    if session_id is None:
        sessions = [session async for session in Session.objects.all()]
        assert len(sessions) == 1, sessions
        session_id = str(sessions[0].pk)
    session, messages = await session_row(session_id)
    assert messages and messages[-1][0] == "assistant", messages
    return session, messages[-1][1]


# A valid structured reply on every face ---------------------------------------------------------


async def test_json_reply_carries_the_parsed_output_and_stores_it(
    structured_upstream: FakeUpstream,
) -> None:
    response = await post(body())
    assert response.status_code == 200, response.content
    reply = response.json()
    assert reply["content"] == MOVE_TEXT
    assert reply["output"] == MOVE
    assert reply["finish_reason"] == "stop"
    # Sent in OpenAI's form by default, as given (no strict when none was given).
    assert sent_forms(structured_upstream) == [RESPONSE_FORMAT]
    session, text = await stored(reply["session_id"])
    assert session.status == "completed" and session.error_code == ""
    assert text == MOVE_TEXT
    assert session.response_format == RESPONSE_FORMAT
    assert session.output == MOVE


async def test_sse_done_frame_carries_the_parsed_output(structured_upstream: FakeUpstream) -> None:
    frames = await sse_frames(body(STRICT_FORMAT))
    assert kinds(frames)[0] == "start" and kinds(frames)[-1] == "done"
    assert set(kinds(frames)[1:-1]) == {"token"}
    assert streamed_text(frames) == MOVE_TEXT
    assert frames[-1]["output"] == MOVE
    assert sent_forms(structured_upstream) == [STRICT_FORMAT]  # strict passed on
    session, _ = await stored(frames[-1]["session_id"])
    assert session.response_format == STRICT_FORMAT and session.output == MOVE


async def test_websocket_done_frame_carries_the_parsed_output(
    structured_upstream: FakeUpstream,
) -> None:
    frames = await ws_frames(body())
    assert kinds(frames)[0] == "start" and kinds(frames)[-1] == "done"
    assert streamed_text(frames) == MOVE_TEXT
    assert frames[-1]["output"] == MOVE
    assert frames[-1]["finish_reason"] == "stop"
    assert sent_forms(structured_upstream) == [RESPONSE_FORMAT]
    session, _ = await stored(frames[-1]["session_id"])
    assert session.status == "completed" and session.output == MOVE


async def test_without_response_format_there_is_no_output_key_anywhere(
    upstream: FakeUpstream,
) -> None:
    response = await post(body(None))
    assert response.status_code == 200, response.content
    assert "output" not in response.json()
    sse = await sse_frames(body(None))
    assert kinds(sse)[-1] == "done" and "output" not in sse[-1]
    ws = await ws_frames(body(None))
    assert kinds(ws)[-1] == "done" and "output" not in ws[-1]
    assert sent_forms(upstream) == [None, None, None]
    assert all("response_format" not in request.body for request in upstream.chat_requests)
    session, _ = await stored(response.json()["session_id"])
    assert session.response_format is None and session.output is None


async def test_an_output_of_null_is_still_carried(upstream: FakeUpstream) -> None:
    """A schema may allow null: `output` is then present, and null."""
    upstream.default = Reply(tokens=["nu", "ll"])
    nullable = {
        "type": "json_schema",
        "json_schema": {"name": "maybe", "schema": {"type": ["object", "null"]}},
    }
    response = await post(body(nullable))
    assert response.status_code == 200, response.content
    assert "output" in response.json() and response.json()["output"] is None
    frames = await sse_frames(body(nullable))
    assert kinds(frames)[-1] == "done" and "output" in frames[-1] and frames[-1]["output"] is None


async def test_a_python_caller_reads_the_message_as_it_streams(
    structured_upstream: FakeUpstream,
) -> None:
    structured_upstream.default = Reply(tokens=MOVE_TOKENS, delay=0.02)  # not all in one read
    generation = Generation(
        ChatRequest(messages=HI, response_format=ResponseFormat("move", SCHEMA))
    )
    reader = FieldReader("message")
    shown = []
    end = None
    async for event in generation.events():
        if isinstance(event, Token):
            shown.append(reader.feed(event.text))
        elif isinstance(event, Done):
            end = event
    assert "".join(shown) == MOVE["message"]
    assert len([piece for piece in shown if piece]) > 1  # it came in pieces, not at the end
    assert end is not None and end.output == MOVE
    assert end.frame()["output"] == MOVE


async def test_a_cancelled_structured_reply_is_not_validated(upstream: FakeUpstream) -> None:
    """Cancelled: the text is cut on purpose, so the end is `done`/`cancelled`, no output."""
    upstream.default = Reply(tokens=MOVE_TOKENS, delay=0.05)
    comm = await open_socket()
    try:
        await comm.send_json_to({"type": "generate", **body()})
        frames = [await recv(comm), await recv(comm)]
        assert kinds(frames) == ["start", "token"]
        await comm.send_json_to({"type": "cancel"})
        frames += await until_end(comm)
    finally:
        await comm.disconnect()
    end = frames[-1]
    assert end["type"] == "done" and end["finish_reason"] == "cancelled"
    assert "output" not in end
    session, text = await stored(end["session_id"])
    assert session.status == "cancelled" and session.error_code == ""
    assert text == streamed_text(frames) and text != MOVE_TEXT
    assert session.response_format == RESPONSE_FORMAT and session.output is None


# The form each server takes ------------------------------------------------------------------


async def test_llama_cpp_python_refusal_switches_form_once_and_it_is_remembered(
    llm_config: Callable[..., Any], llama_cpp: FormServer
) -> None:
    # A long retry delay: the refused form is not retried (it would take seconds), the other
    # form is asked at once.
    serve_from(llm_config, llama_cpp, max_retries=2, retry_delay=5)
    started = time.monotonic()
    frames = await sse_frames(body())
    assert time.monotonic() - started < 2.4  # a retry delay would be 2.5 s or more
    assert kinds(frames)[-1] == "done" and frames[-1]["output"] == MOVE
    assert sent_forms(llama_cpp) == [RESPONSE_FORMAT, JSON_OBJECT_FORM]
    assert known_form(llama_cpp.base_url) == "json_object"

    # The next generation asks in the working form at once, on any face, by any provider
    # object for that URL.
    frames = await ws_frames(body())
    assert kinds(frames)[-1] == "done" and frames[-1]["output"] == MOVE
    providers.reset()
    response = await post(body())
    assert response.status_code == 200 and response.json()["output"] == MOVE
    assert sent_forms(llama_cpp) == [
        RESPONSE_FORMAT,
        JSON_OBJECT_FORM,
        JSON_OBJECT_FORM,
        JSON_OBJECT_FORM,
    ]


async def test_llama_cpp_python_refusal_switches_form_without_streaming(
    llm_config: Callable[..., Any], llama_cpp: FormServer
) -> None:
    serve_from(llm_config, llama_cpp, max_retries=2, retry_delay=5)
    request = ChatRequest(messages=HI, response_format=ResponseFormat("move", SCHEMA))
    started = time.monotonic()
    completion = await get_provider().generate(request)
    assert time.monotonic() - started < 2.4  # a retry delay would be 2.5 s or more
    assert completion.content == MOVE_TEXT
    assert [r.body["stream"] for r in llama_cpp.chat_requests] == [False, False]
    assert sent_forms(llama_cpp) == [RESPONSE_FORMAT, JSON_OBJECT_FORM]

    completion = await get_provider().generate(request)
    assert completion.content == MOVE_TEXT
    assert sent_forms(llama_cpp) == [RESPONSE_FORMAT, JSON_OBJECT_FORM, JSON_OBJECT_FORM]


@pytest.mark.parametrize("stream", [True, False])
async def test_the_switch_leaves_the_retries_whole(
    llm_config: Callable[..., Any], llama_cpp: FormServer, stream: bool
) -> None:
    """Refused form, switch, then a passing 503: the one retry allowed still covers it."""
    serve_from(llm_config, llama_cpp, max_retries=1, retry_delay=0)
    llama_cpp.replies.append(Reply(status=503))  # what the json_object request gets first
    request = ChatRequest(messages=HI, response_format=ResponseFormat("move", SCHEMA))
    if stream:
        text = "".join([chunk.text async for chunk in get_provider().stream(request)])
    else:
        text = (await get_provider().generate(request)).content
    assert text == MOVE_TEXT
    assert sent_forms(llama_cpp) == [RESPONSE_FORMAT, JSON_OBJECT_FORM, JSON_OBJECT_FORM]


async def test_lm_studio_is_asked_in_openai_form_first_so_once(
    llm_config: Callable[..., Any], lm_studio_like: FormServer
) -> None:
    serve_from(llm_config, lm_studio_like)
    frames = await ws_frames(body())
    assert kinds(frames)[-1] == "done" and frames[-1]["output"] == MOVE
    assert sent_forms(lm_studio_like) == [RESPONSE_FORMAT]
    assert known_form(lm_studio_like.base_url) != "json_object"


async def test_a_configured_form_is_not_second_guessed(
    llm_config: Callable[..., Any], lm_studio_like: FormServer
) -> None:
    """LM_STUDIO_RESPONSE_FORMAT=json_object against a server refusing it: its 400 is the
    answer, even though it names response_format (and whatever the memory says)."""
    serve_from(llm_config, lm_studio_like, lm_studio={"response_format": "json_object"})
    remember_form(lm_studio_like.base_url, "json_schema")
    message = error_of(await post(body()), 400, "LLM_BAD_REQUEST")
    assert "response_format.type" in message
    frames = await ws_frames(body())
    assert kinds(frames) == ["error"] and frames[0]["code"] == "LLM_BAD_REQUEST"
    request = ChatRequest(messages=HI, response_format=ResponseFormat("move", SCHEMA))
    with pytest.raises(UpstreamRejected):
        await get_provider().generate(request)
    assert sent_forms(lm_studio_like) == [JSON_OBJECT_FORM] * 3
    assert known_form(lm_studio_like.base_url) == "json_schema"  # not changed by the refusals
    sessions = [session async for session in Session.objects.all()]
    assert len(sessions) == 2  # HTTP and WebSocket (the provider's own call stores none)
    assert {(s.status, s.error_code) for s in sessions} == {("failed", "LLM_BAD_REQUEST")}


async def test_a_configured_openai_form_is_retried_as_a_5xx_not_switched(
    llm_config: Callable[..., Any], llama_cpp: FormServer
) -> None:
    serve_from(llm_config, llama_cpp, lm_studio={"response_format": "json_schema"}, max_retries=1)
    error_of(await post(body()), 503, "LLM_UNAVAILABLE")
    assert sent_forms(llama_cpp) == [RESPONSE_FORMAT, RESPONSE_FORMAT]
    assert known_form(llama_cpp.base_url) is None


@pytest.mark.parametrize("stream", [True, False])
async def test_a_refusal_not_naming_response_format_is_retried_not_switched(
    llm_config: Callable[..., Any], structured_upstream: FakeUpstream, stream: bool
) -> None:
    serve_from(llm_config, structured_upstream, max_retries=1)
    structured_upstream.replies.append(
        Reply(status=500, body=b'{"error": {"message": "CUDA error: out of memory"}}')
    )
    request = ChatRequest(messages=HI, response_format=ResponseFormat("move", SCHEMA))
    if stream:
        text = "".join([chunk.text async for chunk in get_provider().stream(request)])
    else:
        text = (await get_provider().generate(request)).content
    assert text == MOVE_TEXT
    assert sent_forms(structured_upstream) == [RESPONSE_FORMAT, RESPONSE_FORMAT]
    assert known_form(structured_upstream.base_url) is None


async def test_a_4xx_not_naming_response_format_is_neither_retried_nor_switched(
    structured_upstream: FakeUpstream,
) -> None:
    structured_upstream.replies.append(
        Reply(status=400, body=b'{"error": {"message": "context length exceeded"}}')
    )
    message = error_of(await post(body()), 400, "LLM_BAD_REQUEST")
    assert "context length exceeded" in message
    assert sent_forms(structured_upstream) == [RESPONSE_FORMAT]
    assert known_form(structured_upstream.base_url) is None


# A reply off its schema ------------------------------------------------------------------------

BROKEN = json.dumps({"message": "Deal?", "action": "haggle", "price": 120})
INVALID_REPLIES = {
    # tokens, finish reason, how the error message starts
    "breaks-the-schema": (
        [BROKEN[:20], BROKEN[20:]],
        "stop",
        "The reply does not follow the schema 'move' at action: 'haggle' is not one of",
    ),
    "prose": (["Sure! I offer ", "120."], "stop", "The reply is not valid JSON ("),
    "cut-at-max-tokens": (
        [MOVE_TEXT[:12], MOVE_TEXT[12:30]],
        "length",
        "The reply is not valid JSON (",
    ),
}


@pytest.mark.parametrize("face", ["json", "sse", "websocket"])
@pytest.mark.parametrize("case", list(INVALID_REPLIES))
async def test_a_reply_off_its_schema_is_invalid_output_and_its_text_is_stored(
    upstream: FakeUpstream, face: str, case: str
) -> None:
    tokens, finish_reason, starts = INVALID_REPLIES[case]
    upstream.default = Reply(tokens=tokens, finish_reason=finish_reason)
    session_id = None
    if face == "json":
        message = error_of(await post(body()), 502, "LLM_INVALID_OUTPUT")
    else:
        frames = await (sse_frames if face == "sse" else ws_frames)(body())
        assert kinds(frames) == ["start", *["token"] * (len(kinds(frames)) - 2), "error"]
        assert streamed_text(frames) == "".join(tokens)  # every token went out first
        end = frames[-1]
        assert end["code"] == "LLM_INVALID_OUTPUT"
        assert end["session_id"] == frames[0]["session_id"]
        message, session_id = end["message"], end["session_id"]
    assert message.startswith(starts), message
    assert "'move'" in message
    session, text = await stored(session_id)
    assert session.status == "failed"
    assert session.error_code == "LLM_INVALID_OUTPUT" and session.error_message == message
    assert text == "".join(tokens)  # the whole text, kept
    assert session.finish_reason == finish_reason
    assert session.response_format == RESPONSE_FORMAT
    assert session.output is None


# OpenRouter ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_openrouter_gets_json_schema_and_require_parameters(
    llm_config: Callable[..., Any], structured_upstream: FakeUpstream, stream: bool
) -> None:
    llm_config(provider="openrouter", openrouter={"base_url": structured_upstream.base_url})
    # Even a memory of the other form for its URL does not change OpenRouter's.
    remember_form(structured_upstream.base_url, "json_object")
    if stream:
        frames = await sse_frames(body(STRICT_FORMAT))
        assert frames[0]["provider"] == "openrouter" and frames[-1]["output"] == MOVE
    else:
        request = ChatRequest(
            messages=HI,
            response_format=ResponseFormat("move", SCHEMA, strict=True),
        )
        assert (await get_provider().generate(request)).content == MOVE_TEXT
    (sent,) = structured_upstream.chat_requests
    assert sent.body["response_format"] == STRICT_FORMAT
    assert sent.body["provider"] == {"require_parameters": True}
    assert sent.body["model"] == "openrouter/auto"


async def test_openrouter_without_response_format_gets_no_provider_preferences(
    llm_config: Callable[..., Any], structured_upstream: FakeUpstream
) -> None:
    llm_config(provider="openrouter", openrouter={"base_url": structured_upstream.base_url})
    response = await post(body(None))
    assert response.status_code == 200, response.content
    assert response.json()["provider"] == "openrouter" and "output" not in response.json()
    (sent,) = structured_upstream.chat_requests
    assert "provider" not in sent.body and "response_format" not in sent.body


async def test_an_openrouter_refusal_is_not_answered_by_switching(
    llm_config: Callable[..., Any], structured_upstream: FakeUpstream
) -> None:
    llm_config(provider="openrouter", openrouter={"base_url": structured_upstream.base_url})
    structured_upstream.replies.append(
        Reply(
            status=404,
            body=b'{"error": {"message": "No endpoints found that support response_format"}}',
        )
    )
    error_of(await post(body()), 400, "LLM_BAD_REQUEST")
    assert sent_forms(structured_upstream) == [RESPONSE_FORMAT]


# Fallback ------------------------------------------------------------------------------------


async def test_fallback_asks_the_next_provider_in_its_own_form(
    llm_config: Callable[..., Any], structured_upstream: FakeUpstream
) -> None:
    """lm_studio at an address known to take json_object is down before its first token;
    OpenRouter takes over and gets OpenAI's form."""
    llm_config(
        fallbacks=["openrouter"],
        lm_studio={"base_url": CLOSED, "default_model": "local"},
        openrouter={"base_url": structured_upstream.base_url},
        max_retries=0,
    )
    remember_form(CLOSED + "/", "json_object")
    request = ChatRequest(messages=HI, response_format=ResponseFormat("move", SCHEMA))
    primary = get_provider("lm_studio").build_payload(request, "local", stream=True)
    assert primary["response_format"] == JSON_OBJECT_FORM  # what lm_studio would have been sent

    frames = await ws_frames(body())
    assert frames[0]["provider"] == "openrouter"
    assert frames[0]["tried"] == [{"provider": "lm_studio", "code": "LLM_UNAVAILABLE"}]
    assert kinds(frames)[-1] == "done" and frames[-1]["output"] == MOVE
    (sent,) = structured_upstream.chat_requests
    assert sent.body["response_format"] == RESPONSE_FORMAT
    assert sent.body["provider"] == {"require_parameters": True}
    session, _ = await stored(frames[0]["session_id"])
    assert session.provider == "openrouter" and session.output == MOVE


# Bad input -----------------------------------------------------------------------------------


def _deep(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(depth):
        schema = {"not": schema}
    return schema


def _with_schema(schema: Any, **inner: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "move", "schema": schema, **inner}}


BAD_INPUT: dict[str, tuple[Any, str, str]] = {
    # response_format, the field named, what is said of it
    "invalid-schema": (
        _with_schema({"type": "nonsense"}),
        "response_format.json_schema.schema",
        "is not a valid JSON Schema at type",
    ),
    "schema-too-large": (
        _with_schema({"type": "object", "description": "x" * 70_000}),
        "response_format.json_schema.schema",
        "bytes of JSON; at most 65536 are accepted",
    ),
    "schema-not-an-object": (
        _with_schema([SCHEMA]),
        "response_format.json_schema.schema",
        "valid dictionary",
    ),
    "unresolvable-ref": (
        _with_schema({"properties": {"a": {"$ref": "#/$defs/nowhere"}}}),
        "response_format.json_schema.schema",
        "its $ref '#/$defs/nowhere' cannot be resolved",
    ),
    "unknown-draft": (
        _with_schema({"$schema": "https://example.com/my-draft", "type": "object"}),
        "response_format.json_schema.schema",
        "names in $schema a draft that is not known here",
    ),
    "nested-too-deeply": (
        _with_schema(_deep(150)),
        "response_format.json_schema.schema",
        "nested too deeply",
    ),
    "type-json-object": (
        {"type": "json_object", "json_schema": {"name": "move", "schema": SCHEMA}},
        "response_format.type",
        "Input should be 'json_schema'",
    ),
    "llama-cpp-form": (
        JSON_OBJECT_FORM,
        "response_format.type",
        "Input should be 'json_schema'",
    ),
    "a-string": ("json", "response_format", "Input should be a valid dictionary"),
    "missing-name": (
        {"type": "json_schema", "json_schema": {"schema": SCHEMA}},
        "response_format.json_schema.name",
        "Field required",
    ),
    "name-with-spaces": (
        {"type": "json_schema", "json_schema": {"name": "my move", "schema": SCHEMA}},
        "response_format.json_schema.name",
        "String should match pattern",
    ),
    "strict-not-a-bool": (
        _with_schema(SCHEMA, strict="yes"),
        "response_format.json_schema.strict",
        "Input should be a valid boolean",
    ),
    "unknown-field": (
        {**RESPONSE_FORMAT, "schema": SCHEMA},
        "response_format.schema",
        "unknown field",
    ),
}


@pytest.mark.parametrize("face", ["http", "websocket"])
@pytest.mark.parametrize("case", list(BAD_INPUT))
async def test_bad_response_format_is_invalid_request_and_nothing_is_sent(
    upstream: FakeUpstream, face: str, case: str
) -> None:
    response_format, field, said = BAD_INPUT[case]
    if face == "http":
        message = error_of(await post(body(response_format)), 422, "INVALID_REQUEST")
    else:
        frames = await ws_frames(body(response_format))
        assert kinds(frames) == ["error"] and frames[0]["code"] == "INVALID_REQUEST", frames
        message = frames[0]["message"]
    assert f"{field}: " in message, message
    assert said in message, message
    assert upstream.requests == []
    assert await Session.objects.acount() == 0


async def test_a_remote_ref_is_refused_and_never_fetched(upstream: FakeUpstream) -> None:
    """The server must not fetch what a client's schema points at (here: the fake itself)."""
    remote = f"{upstream.base_url}/schema.json"
    message = error_of(await post(body(_with_schema({"$ref": remote}))), 422, "INVALID_REQUEST")
    assert f"its $ref {remote!r} cannot be resolved" in message
    await asyncio.sleep(0.05)
    assert upstream.requests == []


# Stored, and shown ---------------------------------------------------------------------------


async def test_the_sessions_api_shows_response_format_and_output(
    structured_upstream: FakeUpstream,
) -> None:
    good = (await post(body())).json()["session_id"]
    plain = (await post(body(None))).json()["session_id"]
    structured_upstream.default = Reply(tokens=["not json"])
    error_of(await post(body(STRICT_FORMAT)), 502, "LLM_INVALID_OUTPUT")
    failed_session = await Session.objects.exclude(pk__in=[good, plain]).aget()
    failed = str(failed_session.pk)

    client = AsyncClient()
    shown = {}
    for session_id in (good, plain, failed):
        response = await client.get(f"/api/v1/sessions/{session_id}")
        assert response.status_code == 200, response.content
        shown[session_id] = response.json()
    assert shown[good]["response_format"] == RESPONSE_FORMAT
    assert shown[good]["output"] == MOVE
    assert shown[plain]["response_format"] is None and shown[plain]["output"] is None
    assert shown[failed]["response_format"] == STRICT_FORMAT
    assert shown[failed]["output"] is None
    assert shown[failed]["error"]["code"] == "LLM_INVALID_OUTPUT"
    assert shown[failed]["messages"][-1]["content"] == "not json"


async def test_a_continued_session_records_the_format_of_its_latest_reply(
    structured_upstream: FakeUpstream,
) -> None:
    session_id = (await post(body())).json()["session_id"]
    structured_upstream.default = Reply(tokens=["Fine", "."])
    response = await post(body(None, session_id=session_id))
    assert response.status_code == 200 and "output" not in response.json()
    session, _ = await stored(session_id)
    assert session.response_format is None and session.output is None

    structured_upstream.default = Reply(tokens=MOVE_TOKENS)
    response = await post(body(STRICT_FORMAT, session_id=session_id))
    assert response.status_code == 200 and response.json()["output"] == MOVE
    session, _ = await stored(session_id)
    assert session.response_format == STRICT_FORMAT and session.output == MOVE
    # The history went up with each turn; the format only with the turns that asked for one.
    last = structured_upstream.chat_requests[-1].body
    assert [m["content"] for m in last["messages"] if m["role"] == "assistant"] == [
        MOVE_TEXT,
        "Fine.",
    ]
    assert sent_forms(structured_upstream) == [RESPONSE_FORMAT, None, STRICT_FORMAT]


async def test_a_nul_in_the_output_is_stored_as_a_replacement_character(
    upstream: FakeUpstream,
) -> None:
    """PostgreSQL's jsonb refuses NUL: the stored output has U+FFFD, the client gets it as is."""
    reply = '{"message": "a\\u0000b", "action": "accept", "price": 1}'
    upstream.default = Reply(tokens=[reply])
    response = await post(body())
    assert response.status_code == 200, response.content
    assert response.json()["output"]["message"] == "a\x00b"
    session, text = await stored(response.json()["session_id"])
    assert session.output == {"message": "a\ufffdb", "action": "accept", "price": 1}
    assert text == reply


async def test_a_nul_in_the_schema_is_refused_before_it_costs_a_reply(
    structured_upstream: FakeUpstream,
) -> None:
    """PostgreSQL cannot store NUL: a schema holding one is refused, as NUL in message text is
    (stored, it would have failed the end of the reply, text and all)."""
    for schema in ({**SCHEMA, "description": "a\x00b"}, {**SCHEMA, "$comment\x00": "x"}):
        message = error_of(await post(body(_with_schema(schema))), 422, "INVALID_REQUEST")
        assert "response_format.json_schema.schema: " in message and "NUL" in message
    assert structured_upstream.requests == []
    # Not to be confused with a pattern that names NUL in its own text.
    pattern = {**SCHEMA, "properties": {"message": {"type": "string", "pattern": "^[^\\u0000]*$"}}}
    response = await post(body(_with_schema(pattern)))
    assert response.status_code == 200, response.content


async def test_the_admin_page_shows_response_format_and_output(
    structured_upstream: FakeUpstream, admin_user: Any
) -> None:
    session_id = (await post(body())).json()["session_id"]
    staff = AsyncClient()
    await staff.aforce_login(admin_user)
    response = await staff.get(f"/admin/llm/session/{session_id}/change/")
    assert response.status_code == 200
    html = html_unescape(response.content.decode())
    assert "Structured output" in html
    assert "Response format" in html and "Output" in html
    structured_part = html[html.index("Structured output") :]
    for shown in ('"type": "json_schema"', '"name": "move"', '"walk_away"'):
        assert shown in structured_part, shown
    for shown in ('"action": "offer"', '"price": 120', '\\"final\\"'):
        assert shown in structured_part, shown


# The OpenAPI document's example ----------------------------------------------------------------


async def test_the_openapi_example_with_response_format_runs_as_is(
    structured_upstream: FakeUpstream,
) -> None:
    document = (await AsyncClient().get("/api/v1/openapi.json")).json()
    examples = document["components"]["schemas"]["GenerateIn"]["examples"]
    structured_examples = [example for example in examples if "response_format" in example]
    assert len(structured_examples) == 1
    (example,) = structured_examples
    assert examples.index(example) == 1  # the second, after the plain one
    assert example["response_format"]["type"] == "json_schema"
    assert example["response_format"]["json_schema"]["schema"]["properties"]["message"] == {
        "type": "string"
    }

    response = await post(example)
    assert response.status_code == 200, response.content
    assert response.json()["output"] == MOVE
    (sent,) = structured_upstream.chat_requests
    assert sent.body["response_format"] == example["response_format"]
    assert sent.body["messages"] == example["messages"]
