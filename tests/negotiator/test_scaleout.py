"""Scale-out for real: two daphne workers sharing PostgreSQL and Redis, never mocks.

These tests always use the real servers (`SCALEOUT_DATABASE_URL` / `SCALEOUT_REDIS_URL`, by
default the local PostgreSQL and Redis), whatever database the rest of the suite runs on, and
fail loudly when they do not answer. Each run creates and drops its own database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis
import websockets

from llm.local_model import free_port
from tests import servers

PG_URL = os.environ.get("SCALEOUT_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SCALEOUT_REDIS_URL", "redis://127.0.0.1:6379/0")
POOL_SIZE = 3
TOKENS, DELAY = 60, 0.02

pytestmark = [pytest.mark.scaleout, pytest.mark.timeout(180)]


@dataclass
class Cluster:
    workers: list[str]  # base URLs
    database_url: str
    database: str
    admin_password: str


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        pytest.fail(
            f"The scale-out tests need PostgreSQL at {PG_URL} and Redis at {REDIS_URL} ({exc}). "
            "Start them (.ci/run does), or run `make test PYTEST_ARGS=\"-m 'not scaleout'\"`."
        )
    name = f"negotiator_scaleout_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    logs = tmp_path_factory.mktemp("scaleout")
    upstream_port, password = free_port(), uuid.uuid4().hex
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "LM_STUDIO_", "OPENROUTER_"))},
        "DATABASE_URL": _with_db(PG_URL, name),
        "REDIS_URL": REDIS_URL,
        "DATABASE_POOL_SIZE": str(POOL_SIZE),
        "LM_STUDIO_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "LLM_RATE_LIMIT": "off",
        "LLM_LOCAL_MODEL": "off",
        "API_TOKEN": "",
        "DJANGO_SUPERUSER_PASSWORD": password,
    }
    try:
        with contextlib.ExitStack() as running:
            servers.manage(env, "migrate", "--noinput", "-v0")
            servers.manage(env, "createsuperuser", "--noinput", "--username", "staff", "--email", "staff@example.com")
            running.enter_context(servers.fake_upstream(
                logs, "--tokens", str(TOKENS), "--delay", str(DELAY), "--timestamps", port=upstream_port
            ))
            workers = [running.enter_context(servers.daphne(env, logs, migrate=False)) for _ in range(2)]
            yield Cluster(workers, env["DATABASE_URL"], name, password)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws/llm/stream/"


GENERATE = json.dumps({"type": "generate", "messages": [{"role": "user", "content": "Hi"}]})


def sent_at(text: str) -> list[float]:
    """The fake upstream's send times embedded in token text (`" t3|12.345678"`)."""
    return [float(stamp) for stamp in re.findall(r"\|(\d+\.\d+)", text)]


async def read_until_end(ws: Any, arrivals: list[tuple[float, str]] | None = None) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = json.loads(await ws.recv())
        if arrivals is not None and frame["type"] == "token":
            arrivals.append((time.perf_counter(), frame["text"]))
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            return frames


def token_text(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")


async def test_watch_on_worker_b_follows_a_generation_on_worker_a(cluster: Cluster) -> None:
    worker_a, worker_b = cluster.workers
    async with asyncio.timeout(60):
        async with websockets.connect(ws_url(worker_a)) as generator, websockets.connect(ws_url(worker_b)) as watcher:
            await generator.send(GENERATE)
            start = json.loads(await generator.recv())
            first = json.loads(await generator.recv())
            await watcher.send(json.dumps({"type": "watch", "session_id": start["session_id"]}))
            a_arrivals: list[tuple[float, str]] = [(time.perf_counter(), first["text"])]
            b_arrivals: list[tuple[float, str]] = []
            a_frames, b_frames = await asyncio.gather(
                read_until_end(generator, a_arrivals), read_until_end(watcher, b_arrivals)
            )

    reply = first["text"] + token_text(a_frames)
    watching, *b_live = b_frames
    assert watching["type"] == "watching" and watching["status"] == "streaming"
    assert watching["text"] + token_text(b_live) == reply  # nothing missing or doubled, in order
    assert b_live[-1] == a_frames[-1]  # the same end frame
    assert len(sent_at(reply)) == TOKENS

    # Watch latency across workers: when B shows a token, against when A showed it.
    a_seen = {stamp: at for at, text in a_arrivals for stamp in sent_at(text)}
    b_seen = {stamp: at for at, text in b_arrivals for stamp in sent_at(text)}
    lags = sorted((b_seen[s] - a_seen[s]) * 1000 for s in b_seen if s in a_seen)
    assert lags, "the watcher saw no live token"
    print(f"\nwatch latency B-A over {len(lags)} tokens: p50 {statistics.median(lags):.1f} ms, "
          f"max {lags[-1]:.1f} ms")
    assert statistics.median(lags) < 100

    # What A stored is readable through B: the sessions API and the admin.
    async with httpx.AsyncClient(base_url=worker_b) as http:
        stored = (await http.get(f"/api/v1/sessions/{start['session_id']}")).json()
        assert stored["status"] == "completed" and stored["messages"][-1]["content"] == reply
        login = await http.get("/admin/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text).group(1)
        await http.post("/admin/login/?next=/admin/", data={
            "csrfmiddlewaretoken": token, "username": "staff", "password": cluster.admin_password,
        }, headers={"Referer": worker_b + "/admin/login/"})
        page = await http.get(f"/admin/llm/session/{start['session_id']}/change/")
    assert page.status_code == 200
    assert "completed" in page.text and reply.split("|")[0].strip() in page.text


async def test_a_stalled_or_vanished_watcher_does_not_slow_the_generator(cluster: Cluster) -> None:
    worker_a, worker_b = cluster.workers

    async def generate_alone() -> float:
        async with websockets.connect(ws_url(worker_a)) as generator:
            started = time.perf_counter()
            await generator.send(GENERATE)
            frames = await read_until_end(generator)
            assert frames[-1]["type"] == "done"
            return time.perf_counter() - started

    async with asyncio.timeout(90):
        baseline = await generate_alone()
        async with websockets.connect(ws_url(worker_a)) as generator:
            started = time.perf_counter()
            await generator.send(GENERATE)
            start = json.loads(await generator.recv())
            # Three watchers on B: one never reads, one leaves abruptly, one reads normally.
            stalled = await websockets.connect(ws_url(worker_b), max_queue=1)
            vanished = await websockets.connect(ws_url(worker_b))
            reader = await websockets.connect(ws_url(worker_b))
            for ws in (stalled, vanished, reader):
                await ws.send(json.dumps({"type": "watch", "session_id": start["session_id"]}))
            vanished.transport.abort()  # no close frame: the TCP connection just goes
            frames, watched = await asyncio.gather(read_until_end(generator), read_until_end(reader))
            elapsed = time.perf_counter() - started
            await stalled.close()
            await reader.close()
    assert frames[-1]["type"] == "done" and watched[-1] == frames[-1]
    assert elapsed < baseline * 1.5 + 0.5, (elapsed, baseline)


async def test_connections_stay_within_the_pool_under_100_concurrent_generations(cluster: Cluster) -> None:
    peak = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        async with await psycopg.AsyncConnection.connect(_with_db(PG_URL, "postgres"), autocommit=True) as conn:
            while not stop.is_set():
                cursor = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (cluster.database,)
                )
                peak = max(peak, (await cursor.fetchone())[0])
                await asyncio.sleep(0.02)

    async def one(index: int) -> dict[str, Any]:
        async with websockets.connect(ws_url(cluster.workers[index % 2])) as ws:
            await ws.send(GENERATE)
            return (await read_until_end(ws))[-1]

    async with asyncio.timeout(120):
        sampler = asyncio.create_task(sample())
        ends = await asyncio.gather(*(one(i) for i in range(100)))
        stop.set()
        await sampler
    assert [end["type"] for end in ends] == ["done"] * 100
    print(f"\npeak PostgreSQL connections for 100 concurrent generations on 2 workers: {peak} "
          f"(bound {2 * POOL_SIZE})")
    assert 0 < peak <= 2 * POOL_SIZE
