"""Structured output end to end on the real bundled SmolLM2 (llama-cpp-python's server).

Nothing is configured for the form: the provider asks in OpenAI's form, the server refuses it
naming `response_format`, and from then on it is asked in llama-cpp-python's own form. Twenty
replies of a small schema, over every face (HTTP JSON and SSE, WebSocket, Python streaming and
not), must all parse and validate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from django.test import AsyncClient

from llm import ChatRequest, Generation, get_provider
from llm.generation import Done, Failed
from llm.models import Session
from llm.structured import ResponseFormat, known_form
from llm.types import Message

from .ws_client import open_socket, until_end

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(300),
    pytest.mark.usefixtures("close_clients"),
]

# A message first (so it can stream), an action from a list, a number: an agent's move.
SCHEMA = {
    "type": "object",
    "properties": {
        "message": {"type": "string", "maxLength": 80},
        "action": {"enum": ["offer", "accept", "reject", "walk_away"]},
        "price": {"type": "number"},
    },
    "required": ["message", "action", "price"],
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "move", "schema": SCHEMA}}
MAX_TOKENS = 96  # room for the longest reply the schema allows: it is never cut short
PROMPTS = [
    "The seller asks {price} dollars for a used bicycle. Make your move as JSON.",
    "You are buying a lamp listed at {price} dollars. Answer with your move in JSON.",
]


def messages(i: int) -> list[Message]:
    prompt = PROMPTS[i % len(PROMPTS)].format(price=100 + 7 * i)
    return [
        {"role": "system", "content": "You are a buyer in a negotiation. Reply in JSON only."},
        {"role": "user", "content": prompt},
    ]


def body(i: int, **extra: Any) -> str:
    return json.dumps(
        {
            "messages": messages(i),
            "max_tokens": MAX_TOKENS,
            "temperature": 0.8,
            "response_format": RESPONSE_FORMAT,
            **extra,
        }
    )


async def over_http(i: int) -> Any:
    response = await AsyncClient().post(
        "/api/v1/llm/generate", body(i), content_type="application/json"
    )
    assert response.status_code == 200, response.content
    reply = response.json()
    return reply["content"], reply["output"], reply["session_id"]


async def over_sse(i: int) -> Any:
    response = await AsyncClient().post(
        "/api/v1/llm/generate", body(i, stream=True), content_type="application/json"
    )
    text = b"".join([part async for part in response.streaming_content]).decode()
    frames = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]
    assert frames[-1]["type"] == "done", frames[-1]
    content = "".join(f["text"] for f in frames if f["type"] == "token")
    return content, frames[-1]["output"], frames[-1]["session_id"]


async def over_websocket(i: int) -> Any:
    comm = await open_socket()
    await comm.send_json_to({"type": "generate", **json.loads(body(i))})
    frames = await until_end(comm, timeout=60)
    await comm.disconnect()
    assert frames[-1]["type"] == "done", frames[-1]
    content = "".join(f["text"] for f in frames if f["type"] == "token")
    return content, frames[-1]["output"], frames[-1]["session_id"]


def python_request(i: int) -> ChatRequest:
    return ChatRequest(
        messages=messages(i),
        max_tokens=MAX_TOKENS,
        temperature=0.8,
        response_format=ResponseFormat("move", SCHEMA),
    )


async def over_python_streaming(i: int) -> Any:
    generation = Generation(python_request(i))
    events = [event async for event in generation.events()]
    end = events[-1]
    assert isinstance(end, Done), end
    return generation.text, end.output, end.session_id


async def over_python_whole(i: int) -> Any:
    """The provider's non-streaming call (no session), validated the same way."""
    request = python_request(i)
    completion = await get_provider().generate(request)
    assert request.response_format is not None
    return completion.content, request.response_format.validate(completion.content), None


FACES: list[Callable[[int], Any]] = [
    over_http,
    over_sse,
    over_websocket,
    over_python_streaming,
    over_python_whole,
]


@pytest.mark.slow
async def test_twenty_real_replies_parse_and_validate_on_every_face(smollm2: str) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    results = []
    for i in range(20):
        face = FACES[i % len(FACES)]
        content, output, session_id = await face(i)
        assert json.loads(content) == output, (face.__name__, content)
        assert not list(validator.iter_errors(output)), (face.__name__, output)
        results.append((face.__name__, output, session_id))
    # Found by asking, without configuration, and remembered for the server's base URL.
    assert known_form(smollm2) == "json_object"
    stored = [
        await Session.objects.aget(pk=session_id) for _, _, session_id in results if session_id
    ]
    assert len(stored) == 16
    for session in stored:
        assert session.status == "completed" and session.response_format == RESPONSE_FORMAT
        assert not list(validator.iter_errors(session.output))


async def test_a_reply_cut_short_is_invalid_output_and_its_text_is_kept(smollm2: str) -> None:
    """max_tokens too small for the schema: the model's JSON is cut, so it cannot validate."""
    generation = Generation(
        ChatRequest(
            messages=messages(1),
            max_tokens=4,
            response_format=ResponseFormat("move", SCHEMA),
        )
    )
    events = [event async for event in generation.events()]
    end = events[-1]
    assert isinstance(end, Failed) and end.error.code == "LLM_INVALID_OUTPUT", end
    session = await Session.objects.aget(pk=generation.session_id)
    assert session.status == "failed" and session.error_code == "LLM_INVALID_OUTPUT"
    reply = await session.messages.filter(role="assistant").afirst()
    assert reply is not None and reply.content == generation.text and reply.content
