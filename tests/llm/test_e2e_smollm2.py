"""End to end against the real bundled SmolLM2-135M-Instruct (llama-cpp-python server, random port).

The `smollm2` fixture starts the server once per session and points the LLM settings at it, with
no default model, so the model is the one the server lists first, as in production.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from typing import Any

import pytest
from django.core.management import call_command
from django.test import AsyncClient

MODEL = "SmolLM2-135M-Instruct"
PROMPT = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "Say hello."},
]

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(120),
    pytest.mark.usefixtures("close_clients"),
]


async def generate(**body: Any) -> Any:
    return await AsyncClient().post(
        "/api/v1/llm/generate",
        data=json.dumps({"messages": PROMPT, "max_tokens": 24, "temperature": 0, **body}),
        content_type="application/json",
    )


async def read_frames(response: Any) -> list[dict[str, Any]]:
    parts = [part async for part in response.streaming_content]
    text = b"".join(parts).decode()
    return [
        json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")
    ]


async def test_stream_a_real_completion(smollm2: str) -> None:
    response = await generate(stream=True)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    frames = await read_frames(response)
    kinds = [frame["type"] for frame in frames]
    assert kinds[0] == "start", frames
    assert kinds[-1] == "done", frames
    assert kinds.count("token") >= 1
    assert set(kinds[1:-1]) == {"token"}
    start, done = frames[0], frames[-1]
    uuid.UUID(start["session_id"])
    assert start["provider"] == "lm_studio"
    assert start["model"] == MODEL  # as the server reports it
    text = "".join(frame["text"] for frame in frames[1:-1])
    assert text.strip()
    assert done["session_id"] == start["session_id"]
    assert done["finish_reason"] in ("stop", "length")
    usage = done["usage"]
    assert usage["estimated"] is True  # llama.cpp's server sends no usage
    assert usage["completion_tokens"] >= 1
    assert usage["prompt_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_two_concurrent_streams_both_finish(smollm2: str) -> None:
    """The second stream starts while the first is mid-reply; both end with `done` and a real finish
    reason. llama.cpp's server, unless started with `--interrupt_requests false`, cuts the running
    stream when another request arrives: `[DONE]` without a finish reason, LLM_BAD_GATEWAY here."""
    story = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    first_is_streaming = asyncio.Event()
    second_began: list[float] = []
    arrivals: dict[str, list[tuple[float, dict[str, Any]]]] = {"first": [], "second": []}

    async def stream(name: str) -> None:
        if name == "second":
            await first_is_streaming.wait()
        response = await generate(stream=True, messages=story, max_tokens=64)
        assert response.status_code == 200
        if name == "second":
            second_began.append(time.monotonic())  # its upstream requests go out from here
        async for part in response.streaming_content:
            for line in part.decode().splitlines():
                if line.startswith("data: "):
                    frame = json.loads(line[len("data: ") :])
                    arrivals[name].append((time.monotonic(), frame))
                    if frame["type"] == "token":
                        first_is_streaming.set()

    async with asyncio.timeout(90):
        await asyncio.gather(stream("first"), stream("second"))

    for name, timed in arrivals.items():
        frames = [frame for _, frame in timed]
        assert frames[0]["type"] == "start", (name, frames)
        assert frames[-1]["type"] == "done", (name, frames)
        assert frames[-1]["finish_reason"] in ("stop", "length"), (name, frames)
        assert [frame["type"] for frame in frames[1:-1]].count("token") >= 1, (name, frames)
    # They overlapped: the first kept streaming after the second had gone upstream.
    [began] = second_began
    tokens_after = [f for at, f in arrivals["first"] if at > began and f["type"] == "token"]
    assert len(tokens_after) >= 3, arrivals["first"]


async def test_json_real_completion(smollm2: str) -> None:
    response = await generate()
    assert response.status_code == 200, response.content
    body = response.json()
    uuid.UUID(body["session_id"])
    assert body["provider"] == "lm_studio"
    assert body["model"] == MODEL
    assert body["content"].strip()
    assert body["finish_reason"] in ("stop", "length")
    assert body["usage"]["estimated"] is True
    assert body["usage"]["completion_tokens"] >= 1


async def test_max_tokens_bounds_the_real_reply(smollm2: str) -> None:
    response = await AsyncClient().post(
        "/api/v1/llm/generate",
        data=json.dumps(
            {
                "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "max_tokens": 3,
            }
        ),
        content_type="application/json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["finish_reason"] == "length"
    assert body["content"]
    assert body["usage"]["completion_tokens"] <= 10


def test_llm_ping_json_reaches_the_real_model(smollm2: str) -> None:
    out = io.StringIO()
    call_command("llm_ping", "--json", stdout=out, stderr=io.StringIO())  # exit 0: no SystemExit
    result = json.loads(out.getvalue())
    assert result["reachable"] is True
    assert result["provider"] == "lm_studio"
    assert result["base_url"] == smollm2.rstrip("/")
    assert MODEL in result["models"]
    assert result["latency_ms"] >= 0
    assert result["error"] is None


def test_llm_ping_human_output(smollm2: str) -> None:
    out = io.StringIO()
    call_command("llm_ping", stdout=out, stderr=io.StringIO())
    assert MODEL in out.getvalue()
    assert "reachable" in out.getvalue().lower()


async def test_health_is_healthy_with_the_real_model(smollm2: str) -> None:
    response = await AsyncClient().get("/api/v1/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy", body
    assert body["checks"]["llm"]["reachable"] is True
    assert body["checks"]["database"]["status"] == "ok"


async def test_llm_status_lists_the_real_model(smollm2: str) -> None:
    response = await AsyncClient().get("/api/v1/llm/status")
    assert response.status_code == 200
    body = response.json()
    assert body["reachable"] is True
    assert MODEL in body["models"]
    assert body["error"] is None
