"""Every frame the pipeline emits matches the schema the OpenAPI document publishes for it.

The frames are defined once (`llm.frames`); the document's `text/event-stream` schema is built
from that definition. Here each kind of outcome is run for real (fake upstream, WebSocket and
SSE) and every frame is validated, with jsonschema, against the schema as served at
`/api/v1/openapi.json`, so a frame and its documentation cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from django.test import AsyncClient

from llm.frames import ServerFrame, frame_schema
from llm.local_model import free_port
from testkit.fake_upstream import FakeUpstream, Reply

from .ws_client import generate, open_socket, recv, tokens, until_end

pytestmark = pytest.mark.django_db(transaction=True)

CLOSED = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


@pytest.fixture
async def published() -> jsonschema.protocols.Validator:
    """A validator for one frame, from the schema the API serves for its SSE events."""
    response = await AsyncClient().get("/api/v1/openapi.json")
    document = response.json()
    generate_op = document["paths"]["/api/v1/llm/generate"]["post"]
    event = generate_op["responses"]["200"]["content"]["text/event-stream"]["schema"]
    schema = event["properties"]["data"]["contentSchema"]
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def assert_valid(validator: jsonschema.protocols.Validator, frames: list[dict[str, Any]]) -> None:
    for frame in frames:
        errors = [error.message for error in validator.iter_errors(frame)]
        assert not errors, f"{frame} does not match the published schema: {errors}"


async def ws_frames(**fields: Any) -> list[dict[str, Any]]:
    comm = await open_socket()
    await generate(comm, **fields)
    frames = await until_end(comm)
    await comm.disconnect()
    return frames


async def sse_frames(**fields: Any) -> list[dict[str, Any]]:
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, **fields}
    response = await AsyncClient().post(
        "/api/v1/llm/generate", json.dumps(body), content_type="application/json"
    )
    text = b"".join([part async for part in response.streaming_content]).decode()
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]


@pytest.mark.parametrize("face", [ws_frames, sse_frames], ids=["websocket", "sse"])
async def test_every_outcome_emits_only_documented_frames(
    face: Callable[..., Any],
    published: jsonschema.protocols.Validator,
    upstream: FakeUpstream,
    llm_config: Callable[..., Any],
) -> None:
    outcomes: dict[str, list[dict[str, Any]]] = {}
    upstream.default = Reply(tokens=tokens(5))
    outcomes["stop"] = await face()
    upstream.default = Reply(tokens=tokens(50))
    outcomes["length"] = await face(max_tokens=3)
    upstream.default = Reply(tokens=tokens(5), cut_after=2)
    outcomes["error after tokens"] = await face()
    upstream.default = Reply(status=400)
    outcomes["error before tokens"] = await face()
    upstream.default = Reply(tokens=tokens(3))
    llm_config(
        fallbacks=["openrouter"],
        max_retries=0,
        lm_studio={"base_url": CLOSED},
        openrouter={"base_url": upstream.base_url, "default_model": "backup"},
    )
    outcomes["fallback"] = await face()

    kinds = {name: [f["type"] for f in frames] for name, frames in outcomes.items()}
    assert kinds["stop"][-1] == "done" and outcomes["stop"][-1]["finish_reason"] == "stop"
    assert outcomes["length"][-1]["finish_reason"] == "length", kinds
    assert kinds["error after tokens"][-1] == "error" and "token" in kinds["error after tokens"]
    assert kinds["error before tokens"] == ["error"], kinds
    assert outcomes["fallback"][0]["tried"][0]["provider"] == "lm_studio", outcomes["fallback"]
    for frames in outcomes.values():
        assert_valid(published, frames)


async def test_a_cancelled_reply_and_a_watchers_frames_are_documented(
    published: jsonschema.protocols.Validator, upstream: FakeUpstream
) -> None:
    upstream.default = Reply(tokens=tokens(200), delay=0.01)
    generator = await open_socket()
    await generate(generator)
    start = await recv(generator)
    watcher = await open_socket()
    await watcher.send_json_to({"type": "watch", "session_id": start["session_id"]})
    watching = await recv(watcher)
    await generator.send_json_to({"type": "cancel"})
    frames = [start, *await until_end(generator)]
    watched = await until_end(watcher)
    await generator.disconnect()
    await watcher.disconnect()

    assert frames[-1]["finish_reason"] == "cancelled", frames[-1]
    assert watched[-1] == frames[-1]
    assert_valid(published, frames + watched)
    # The watching frame is a server frame of the socket only (SSE has no watch).
    server = jsonschema.Draft202012Validator(frame_schema(ServerFrame))
    assert watching["type"] == "watching" and not list(server.iter_errors(watching)), watching


def test_a_frame_that_breaks_the_definition_is_refused_by_the_published_schema() -> None:
    """The check above can fail: frames the definition does not allow are refused."""
    validator = jsonschema.Draft202012Validator(frame_schema())
    for wrong in (
        {"type": "done", "session_id": "s", "finish_reason": "content_filter", "usage": {}},
        {"type": "token"},
        {"type": "start", "session_id": "s", "provider": "p"},
        {"type": "error", "code": "X"},
        {"type": "watching", "session_id": "s", "status": "streaming", "text": ""},
    ):
        assert list(validator.iter_errors(wrong)), wrong


async def test_the_published_schema_uses_only_json_schema_bounds() -> None:
    """pydantic names bounds `ge`/`le` where it cannot place them; JSON Schema ignores those, so
    a bound the server enforces would be missing from the document (schemathesis found
    `max_tokens` over 1,000,000 schema-valid yet refused)."""
    document = (await AsyncClient().get("/api/v1/openapi.json")).json()
    foreign = {"ge", "le", "gt", "lt", "min_length", "max_length", "multiple_of"}
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in foreign and path.split("/")[-1] != "properties":
                    found.append(f"{path}/{key}")
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}/{index}")

    walk(document, "")
    assert not found, found
    max_tokens = document["components"]["schemas"]["GenerateIn"]["properties"]["max_tokens"]
    assert {"type": "integer", "minimum": 1, "maximum": 1_000_000} in max_tokens["anyOf"]
