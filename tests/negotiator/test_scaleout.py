"""Scale-out for real: two daphne workers sharing PostgreSQL and Redis, never mocks.

These tests always use the real servers (`SCALEOUT_DATABASE_URL` / `SCALEOUT_REDIS_URL`, by
default the local PostgreSQL and Redis), whatever database the rest of the suite runs on, and
fail loudly when they do not answer. Each run creates and drops its own databases: one migrated
template, copied for each two-worker cluster (the main one, and one with a rate limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import socket
import statistics
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import websockets

from testkit import servers
from tests.raw_websocket import logged_at, open_stalled_socket, server_frames
from tests.scaleout import PG_URL, REDIS_URL, admin_connection

POOL_SIZE = 3
TOKENS, DELAY = 60, 0.02
SEND_BUFFER = 64 * 1024  # LLM_MAX_SEND_BUFFER_BYTES of the main cluster
# A reply that fills any socket buffer: 600 frames of 10 KiB (6 MB) in about 3.5 s.
FLOOD = "bench:tokens=600,size=10240,delay=0.005,timestamps=1"
FLOOD_TOKENS = 600
RATE = 3  # LLM_RATE_LIMIT of the rate-limited cluster, per minute

pytestmark = [pytest.mark.scaleout, pytest.mark.timeout(180)]


@dataclass
class Cluster:
    workers: list[str]  # base URLs
    logs: list[Path]  # each worker's daphne log
    database_url: str
    database: str
    admin_password: str


@dataclass
class Shared:
    """What every cluster of this module shares: a migrated template database and the upstream."""

    admin: psycopg.Connection[Any]
    template: str
    upstream: str  # base URL (.../v1)
    logs: Path
    admin_password: str


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _env(database_url: str, upstream: str, password: str, **overrides: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(servers.FOREIGN)},
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "DATABASE_POOL_SIZE": str(POOL_SIZE),
        "LM_STUDIO_BASE_URL": upstream,
        "LLM_RATE_LIMIT": "off",
        "LLM_LOCAL_MODEL": "off",
        "API_TOKEN": "",
        "DJANGO_SUPERUSER_PASSWORD": password,
        **overrides,
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """Migrated once into a template database.

    Each cluster starts on a copy (0.3 s, not a migrate).
    """
    admin = admin_connection()
    template = f"negotiator_scaleout_{uuid.uuid4().hex[:8]}_template"
    admin.execute(f'CREATE DATABASE "{template}"')
    logs = tmp_path_factory.mktemp("scaleout")
    password = uuid.uuid4().hex
    try:
        env = _env(_with_db(PG_URL, template), "http://127.0.0.1:9/v1", password)
        servers.manage(env, "migrate", "--noinput", "-v0")
        servers.manage(
            env,
            "createsuperuser",
            "--noinput",
            "--username",
            "staff",
            "--email",
            "staff@example.com",
        )
        with servers.fake_upstream(
            logs, "--tokens", str(TOKENS), "--delay", str(DELAY), "--timestamps"
        ) as upstream:
            yield Shared(admin, template, upstream, logs, password)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        admin.close()


@contextlib.contextmanager
def running_cluster(shared: Shared, **overrides: str) -> Iterator[Cluster]:
    """Two daphne workers on a fresh copy of the template database.

    They share Redis and the upstream.
    """
    name = f"negotiator_scaleout_{uuid.uuid4().hex[:8]}"
    shared.admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{shared.template}"')
    env = _env(_with_db(PG_URL, name), shared.upstream, shared.admin_password, **overrides)
    try:
        with contextlib.ExitStack() as running:
            workers = [
                running.enter_context(servers.daphne(env, shared.logs, migrate=False))
                for _ in range(2)
            ]
            logs = [shared.logs / f"daphne-{base.rsplit(':', 1)[1]}.log" for base in workers]
            yield Cluster(workers, logs, env["DATABASE_URL"], name, shared.admin_password)
    finally:
        shared.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def cluster(shared: Shared) -> Iterator[Cluster]:
    # A low send-buffer bound, so a watcher that stops reading is cut within a reply of a few MB.
    with running_cluster(shared, LLM_MAX_SEND_BUFFER_BYTES=str(SEND_BUFFER)) as running:
        yield running


@pytest.fixture(scope="module")
def limited_cluster(shared: Shared) -> Iterator[Cluster]:
    with running_cluster(shared, LLM_RATE_LIMIT=f"{RATE}/m") as running:
        yield running


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws/llm/stream/"


GENERATE = json.dumps({"type": "generate", "messages": [{"role": "user", "content": "Hi"}]})


def sent_at(text: str) -> list[float]:
    """The fake upstream's send times embedded in token text (`" t3|12.345678"`)."""
    return [float(stamp) for stamp in re.findall(r"\|(\d+\.\d+)", text)]


async def read_until_end(
    ws: Any, arrivals: list[tuple[float, str]] | None = None
) -> list[dict[str, Any]]:
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
        async with (
            websockets.connect(ws_url(worker_a)) as generator,
            websockets.connect(ws_url(worker_b)) as watcher,
        ):
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
    print(
        f"\nwatch latency B-A over {len(lags)} tokens: p50 {statistics.median(lags):.1f} ms, "
        f"max {lags[-1]:.1f} ms"
    )
    assert statistics.median(lags) < 100

    # What A stored is readable through B: the sessions API and the admin.
    async with httpx.AsyncClient(base_url=worker_b) as http:
        stored = (await http.get(f"/api/v1/sessions/{start['session_id']}")).json()
        assert stored["status"] == "completed" and stored["messages"][-1]["content"] == reply
        login = await http.get("/admin/login/")
        found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', login.text)
        assert found is not None, login.text
        token = found.group(1)
        await http.post(
            "/admin/login/?next=/admin/",
            data={
                "csrfmiddlewaretoken": token,
                "username": "staff",
                "password": cluster.admin_password,
            },
            headers={"Referer": worker_b + "/admin/login/"},
        )
        page = await http.get(f"/admin/llm/session/{start['session_id']}/change/")
    assert page.status_code == 200
    assert "completed" in page.text and reply.split("|")[0].strip() in page.text


def flood_frame(**fields: Any) -> str:
    return json.dumps(
        {
            "type": "generate",
            "model": FLOOD,
            "max_tokens": 100_000,
            "messages": [{"role": "user", "content": "Hi"}],
            **fields,
        }
    )


async def drain(sock: socket.socket, quiet: float = 3) -> tuple[bytes, str]:
    """Read what the server still sends on `sock`, as fast as it comes: (bytes, how it ended:
    "closed", "reset", or "open" when nothing came for `quiet` seconds)."""
    loop = asyncio.get_running_loop()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setblocking(False)
    received = b""
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), quiet)
        except TimeoutError:
            return received, "open"
        except ConnectionResetError:
            return received, "reset"
        if not chunk:
            return received, "closed"
        received += chunk


async def test_a_watcher_that_stops_reading_is_cut_and_slows_neither_generator_nor_other_watchers(
    cluster: Cluster,
) -> None:
    worker_a, worker_b = cluster.workers

    async def generate_alone() -> tuple[float, str]:
        async with websockets.connect(ws_url(worker_a), max_size=None) as generator:
            started = time.perf_counter()
            await generator.send(flood_frame())
            frames = await read_until_end(generator)
            assert frames[-1]["type"] == "done", frames[-1]
            return time.perf_counter() - started, token_text(frames)

    def cut_lines(port: int) -> list[str]:
        return [
            line
            for line in cluster.logs[1].read_text(errors="replace").splitlines()
            if "reads too slowly" in line and f", {port}]" in line
        ]

    async def read_once_cut(sock: socket.socket) -> tuple[list[str], bytes, str]:
        """Once worker B logs the cut, read what it still sends, within its 1 s close handshake."""
        port = sock.getsockname()[1]
        while not cut_lines(port):
            await asyncio.sleep(0.05)
        received, ending = await drain(sock)
        return cut_lines(port), received, ending

    async with asyncio.timeout(120):
        baseline, alone = await generate_alone()
        assert len(sent_at(alone)) == FLOOD_TOKENS
        async with websockets.connect(ws_url(worker_a), max_size=None) as generator:
            started, started_at = time.perf_counter(), time.time()
            await generator.send(flood_frame())
            start = json.loads(await generator.recv())
            generating = asyncio.create_task(read_until_end(generator))  # read A at once, all along
            watch = json.dumps({"type": "watch", "session_id": start["session_id"]})
            # Three watchers on B: one never reads, one leaves abruptly, one reads normally.
            stalled = await asyncio.to_thread(
                open_stalled_socket, worker_b, {"type": "watch", "session_id": start["session_id"]}
            )
            cutting = asyncio.create_task(read_once_cut(stalled))
            vanished = await websockets.connect(ws_url(worker_b))
            reader = await websockets.connect(ws_url(worker_b), max_size=None)
            await vanished.send(watch)
            await reader.send(watch)
            vanished.transport.abort()  # no close frame: the TCP connection just goes
            frames, watched = await asyncio.gather(generating, read_until_end(reader))
            elapsed = time.perf_counter() - started
            await reader.close()
        try:
            cut, received, ending = await asyncio.wait_for(cutting, 15)
        except TimeoutError:
            received, ending = await drain(stalled)
            lagged = b'"WATCH_LAGGED"' in received  # a frame of its stream was lost on the way
            pytest.fail(
                f"worker B never cut the watcher that stops reading; it got {len(received)} bytes "
                f"({ending}){', then WATCH_LAGGED' if lagged else ''}: {received[-120:]!r}"
            )
        finally:
            stalled.close()

    # The generator and the normal watcher on B got the whole reply and the same end frame.
    reply = token_text(frames)
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "stop"
    assert len(sent_at(reply)) == FLOOD_TOKENS
    watching, *live = watched
    assert watching["type"] == "watching"
    assert watching["text"] + token_text(live) == reply and live[-1] == frames[-1]

    # The stalled watcher was cut by worker B's send-buffer bound, with close code 4008, while
    # the reply still streamed: what it got before is part of the reply, with no end frame and no
    # WATCH_LAGGED (the channel layer never had to drop it).
    cut_after = logged_at(cut[0]) - started_at
    assert cut_after < elapsed, "the stalled watcher was only dropped when the reply ended"
    sent = list(server_frames(received))
    texts = [json.loads(payload) for opcode, payload in sent if opcode == 0x1]
    assert texts and texts[0]["type"] == "watching", texts[:1]
    assert {f["type"] for f in texts[1:]} <= {"token"}, texts[-1]
    assert (texts[0]["text"] + token_text(texts[1:])) in reply
    codes = [struct.unpack("!H", payload[:2])[0] for opcode, payload in sent if opcode == 0x8]
    assert codes == [4008], (codes, ending, len(received))
    print(
        f"\ngenerator with a stalled, a vanished and a reading watcher: {elapsed:.2f} s, alone "
        f"{baseline:.2f} s; the stalled watcher was cut (close 4008) {cut_after:.2f} s in, "
        f"after {len(received) / 1e6:.1f} MB"
    )
    assert elapsed < baseline * 1.5 + 0.5, (elapsed, baseline)


async def test_a_reading_watcher_is_not_dropped_while_other_sockets_on_its_worker_use_the_database(
    cluster: Cluster,
) -> None:
    worker_a, worker_b = cluster.workers
    stop = asyncio.Event()

    async def rewatch(session_id: str) -> None:  # each `watch` of a finished session: one ORM read
        async with websockets.connect(ws_url(worker_b)) as ws:
            while not stop.is_set():
                await ws.send(json.dumps({"type": "watch", "session_id": session_id}))
                assert json.loads(await ws.recv())["status"] == "completed"

    async with asyncio.timeout(60):
        async with websockets.connect(ws_url(worker_a)) as ws:
            await ws.send(
                json.dumps(
                    {
                        "type": "generate",
                        "model": "bench:tokens=3",
                        "messages": [{"role": "user", "content": "Hi"}],
                    }
                )
            )
            finished = (await read_until_end(ws))[-1]["session_id"]
        async with (
            websockets.connect(ws_url(worker_a), max_size=None) as generator,
            websockets.connect(ws_url(worker_b), max_size=None) as reader,
        ):
            await generator.send(flood_frame())
            start = json.loads(await generator.recv())
            generating = asyncio.create_task(read_until_end(generator))
            await reader.send(json.dumps({"type": "watch", "session_id": start["session_id"]}))
            others = [asyncio.create_task(rewatch(finished)) for _ in range(20)]
            frames, watched = await asyncio.gather(generating, read_until_end(reader))
            stop.set()
            await asyncio.gather(*others)
    assert watched[-1] == frames[-1], watched[-1]
    assert watched[0]["text"] + token_text(watched[1:]) == token_text(frames)


async def test_connections_stay_within_the_pool_under_100_concurrent_generations(
    cluster: Cluster,
) -> None:
    """WebSocket, SSE and JSON generations, a third each, over both workers: HTTP requests run
    their ORM calls each in a thread of its own, so only the pool bounds their connections."""
    peak = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        async with await psycopg.AsyncConnection.connect(
            _with_db(PG_URL, "postgres"), autocommit=True
        ) as conn:
            while not stop.is_set():
                cursor = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (cluster.database,)
                )
                row = await cursor.fetchone()
                assert row is not None
                peak = max(peak, row[0])
                await asyncio.sleep(0.02)

    body = {"messages": [{"role": "user", "content": "Hi"}]}

    async def over_websocket(base: str) -> tuple[str, str]:
        async with websockets.connect(ws_url(base)) as ws:
            await ws.send(GENERATE)
            frames = await read_until_end(ws)
            return "ws", frames[-1]["type"]

    async def over_sse(http: httpx.AsyncClient, base: str) -> tuple[str, str]:
        async with http.stream(
            "POST", base + "/api/v1/llm/generate", json=body | {"stream": True}
        ) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    frame = json.loads(line.removeprefix("data: "))
                    if frame["type"] in ("done", "error"):
                        return "sse", frame["type"]
        return "sse", "cut"

    async def over_json(http: httpx.AsyncClient, base: str) -> tuple[str, str]:
        response = await http.post(base + "/api/v1/llm/generate", json=body)
        ok = response.status_code == 200 and response.json()["finish_reason"] == "stop"
        return "json", "done" if ok else response.text

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with asyncio.timeout(120), httpx.AsyncClient(limits=limits, timeout=60) as http:
        sampler = asyncio.create_task(sample())
        runs = []
        for i in range(100):
            base = cluster.workers[i % 2]
            kind = i % 3
            runs.append(
                over_websocket(base)
                if kind == 0
                else over_sse(http, base)
                if kind == 1
                else over_json(http, base)
            )
        ends = await asyncio.gather(*runs)
        stop.set()
        await sampler
    assert sorted(ends) == sorted(
        [("ws", "done")] * 34 + [("sse", "done")] * 33 + [("json", "done")] * 33
    )
    print(
        f"\npeak PostgreSQL connections for 100 concurrent generations (34 WebSocket, 33 SSE, "
        f"33 JSON) on 2 workers: {peak} (bound {2 * POOL_SIZE})"
    )
    assert 0 < peak <= 2 * POOL_SIZE


async def test_the_rate_limit_counts_across_workers(limited_cluster: Cluster) -> None:
    """LLM_RATE_LIMIT=3/m, counted in Redis: 3 generates over A and B pass, the 4th fails on
    either worker, over HTTP (429 + Retry-After) and WebSocket (an error frame)."""
    worker_a, worker_b = limited_cluster.workers
    # A client address of its own (any 127.x.y.z reaches the workers): no count of another run
    # or test in the shared Redis is in its key.
    ip, other_ip = (f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{n}" for n in (1, 2))
    body = {"messages": [{"role": "user", "content": "Hi"}], "model": "bench:tokens=3"}
    frame = json.dumps({"type": "generate", **body})
    left = 60 - time.time() % 60  # the limit counts in fixed one-minute windows: stay in one
    if left < 10:
        await asyncio.sleep(left + 0.1)
    window = int(time.time() // 60)

    async def over_websocket(base: str) -> dict[str, Any]:
        async with websockets.connect(ws_url(base), local_addr=(ip, 0)) as ws:
            await ws.send(frame)
            return (await read_until_end(ws))[-1]

    transport = httpx.AsyncHTTPTransport(local_address=ip)
    async with asyncio.timeout(30), httpx.AsyncClient(transport=transport, timeout=10) as http:
        first = await http.post(worker_a + "/api/v1/llm/generate", json=body)
        second = await over_websocket(worker_b)
        third = await http.post(worker_a + "/api/v1/llm/generate", json=body | {"stream": True})
        assert first.status_code == 200 and first.json()["finish_reason"] == "stop", first.text
        assert second["type"] == "done", second
        assert third.status_code == 200 and '"type":"done"' in third.text.replace(" ", ""), (
            third.text
        )
        # Worker A has counted 2, worker B 1: only a shared count refuses the 4th on both.
        refused = [
            await http.post(base + "/api/v1/llm/generate", json=body)
            for base in (worker_a, worker_b)
        ]
        frames = [await over_websocket(base) for base in (worker_b, worker_a)]
    assert int(time.time() // 60) == window, "the run straddled a rate-limit window"
    for response in refused:
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "RATE_LIMITED"
        assert 1 <= int(response.headers["Retry-After"]) <= 60, response.headers
    for refusal in frames:
        assert refusal["type"] == "error" and refusal["code"] == "RATE_LIMITED", refusal
    # Another client is not limited by this one's count.
    other_transport = httpx.AsyncHTTPTransport(local_address=other_ip)
    async with httpx.AsyncClient(transport=other_transport, timeout=10) as other:
        assert (await other.post(worker_b + "/api/v1/llm/generate", json=body)).status_code == 200
