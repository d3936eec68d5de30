"""End to end over real sockets: daphne serving the project, the real SmolLM2 server behind it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets
from websockets.typing import Origin

from testkit import servers
from testkit.servers import project_env

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def daphne(smollm2_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`daphne negotiator.asgi:application` on a random port, on its own migrated database."""
    logs = tmp_path_factory.mktemp("daphne")
    env = project_env(logs, LM_STUDIO_BASE_URL=smollm2_server, LLM_MAX_TOKENS="48")
    with servers.daphne(env, logs) as base:
        yield base


async def frames_until_end(ws: Any, timeout: float = 30) -> list[dict[str, Any]]:
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await ws.recv())
            frames.append(frame)
            if frame["type"] in ("done", "error"):
                return frames


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws/llm/stream/"


GENERATE = {"type": "generate", "messages": [{"role": "user", "content": "Tell me about the sea."}]}


async def test_real_socket_streams_a_real_reply_and_stores_it(daphne: str) -> None:
    async with websockets.connect(ws_url(daphne), origin=Origin("http://localhost")) as ws:
        await ws.send(json.dumps(GENERATE))
        frames = await frames_until_end(ws)
    start, *tokens, done = frames
    assert start["type"] == "start" and start["model"] == "SmolLM2-135M-Instruct"
    assert tokens and all(f["type"] == "token" for f in tokens)
    assert done["type"] == "done" and done["finish_reason"] in ("stop", "length")
    reply = "".join(f["text"] for f in tokens)

    async with httpx.AsyncClient(base_url=daphne) as http:
        stored = (await http.get(f"/api/v1/sessions/{start['session_id']}")).json()
    assert stored["status"] == "completed"
    assert stored["messages"][-1] == stored["messages"][-1] | {
        "role": "assistant",
        "content": reply,
    }
    assert stored["ttft_ms"] > 0 and stored["tokens_per_second"] > 0
    assert stored["usage"]["estimated"] is True


@pytest.mark.timeout(90)
async def test_watch_from_a_second_socket_and_cancel_by_closing(daphne: str) -> None:
    async with asyncio.timeout(60):
        await _watch_and_cancel_by_closing(daphne)


async def _watch_and_cancel_by_closing(daphne: str) -> None:
    long = GENERATE | {
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Write a long story."}],
    }
    generator = await websockets.connect(ws_url(daphne))
    await generator.send(json.dumps(long))
    start = json.loads(await generator.recv())
    first = json.loads(await generator.recv())
    assert first["type"] == "token"
    received = first["text"]

    async with websockets.connect(ws_url(daphne)) as watcher:
        await watcher.send(json.dumps({"type": "watch", "session_id": start["session_id"]}))
        watching = json.loads(await watcher.recv())
        assert watching["type"] == "watching" and watching["status"] == "streaming"
        seen = watching["text"]
        for _ in range(5):
            frame = json.loads(await watcher.recv())
            assert frame["type"] == "token"
            seen += frame["text"]
        for _ in range(10):
            received += json.loads(await generator.recv())["text"]
        await generator.close()  # mid-reply: cancels the generation and stores the partial text

        end = (await frames_until_end(watcher))[-1]
        assert end["type"] == "done" and end["finish_reason"] == "cancelled"

    async with httpx.AsyncClient(base_url=daphne) as http:
        for _ in range(50):
            stored = (await http.get(f"/api/v1/sessions/{start['session_id']}")).json()
            if stored["status"] != "streaming":
                break
            await asyncio.sleep(0.1)
    assert stored["status"] == "cancelled"
    text = stored["messages"][-1]["content"]
    assert text.startswith(received) and text.startswith(seen)
