"""Negotiations across server restarts, with real processes over real sockets (as
tests/llm/test_restart.py does for generations): daphne serving the project in front of the fake
upstream process (testkit/fake_upstream.py) writing each move's message slowly.

SIGKILL mid-negotiation: the next server marks it `interrupted` (ended_by restart) at start-up,
with every move stored before the kill, and `POST .../resume` finishes it with its turns going on
from the stored ones. A graceful stop (SIGTERM, SIGINT) stores it `interrupted` itself, as it
stops. Everything is read through the HTTP API, as a client would. On PostgreSQL the test runs in
a database of its own (created and dropped here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from testkit import servers
from testkit.servers import project_env
from tests.negotiation.ws import CUSTOM

pytestmark = pytest.mark.timeout(90)

# Each message: 12 tokens 50 ms apart, about 0.6 s a move.
UPSTREAM_ARGS = ("--tokens", "12", "--delay", "0.05")
MESSAGE = " ".join(f"t{i}" for i in range(12))


def said_the_move(move: dict[str, Any]) -> bool:
    """A narrated message says its move's price (the fake's words, no sentence, are dropped)."""
    return f"${move['price']:,.2f}" in move["message"]


BODY = {**CUSTOM, "max_turns": 6}
ENDED = ("deal", "no_deal")


@contextlib.contextmanager
def own_database(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """On PostgreSQL: `env` on a fresh database of the same server, dropped afterwards (SQLite:
    project_env already gave the test a file of its own)."""
    if not env["DATABASE_URL"].startswith("postgres"):
        yield env
        return
    import psycopg

    def on(database: str) -> str:
        return urlunsplit(urlsplit(env["DATABASE_URL"])._replace(path=f"/{database}"))

    name = f"negotiator_negotiation_restart_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(on("postgres"), autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield env | {"DATABASE_URL": on(name)}
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One upstream process and one migrated database for the module's servers."""
    logs = tmp_path_factory.mktemp("negotiation-restart")
    with servers.fake_upstream(logs, *UPSTREAM_ARGS) as upstream:
        base = project_env(
            logs,
            LM_STUDIO_BASE_URL=upstream,
            LM_STUDIO_DEFAULT_MODEL="fake-model",
            LLM_MAX_RETRIES="0",
            LLM_RETRY_DELAY="0",
        )
        with own_database(base) as env:
            servers.manage(env, "migrate", "--noinput", "-v0")
            yield env


async def read(http: httpx.AsyncClient, negotiation_id: str) -> dict[str, Any]:
    response = await http.get(f"/api/v1/negotiations/{negotiation_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def poll(
    http: httpx.AsyncClient,
    negotiation_id: str,
    condition: Callable[[dict[str, Any]], bool],
    timeout: float = 20,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        data = await read(http, negotiation_id)
        if condition(data):
            return data
        assert time.monotonic() < deadline, f"not within {timeout} s: {data}"
        await asyncio.sleep(0.05)


async def start(http: httpx.AsyncClient) -> str:
    response = await http.post("/api/v1/negotiations", json=BODY)
    assert response.status_code == 201, response.text
    started = response.json()
    assert started["status"] == "running"
    return str(started["id"])


async def resume_to_the_end(
    http: httpx.AsyncClient, negotiation_id: str, before: list[dict[str, Any]]
) -> dict[str, Any]:
    """Resume it; it finishes, its stored moves untouched and its turns going on from them."""
    response = await http.post(f"/api/v1/negotiations/{negotiation_id}/resume")
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "running"
    assert response.json()["moves"] == before
    done = await poll(http, negotiation_id, lambda data: data["status"] in ENDED)
    moves = done["moves"]
    assert moves[: len(before)] == before, "a stored move changed"
    assert [m["turn"] for m in moves] == list(range(1, len(moves) + 1)), "a turn lost or doubled"
    assert len(moves) > len(before), "nothing was played after the resume"
    for move in moves[len(before) :]:
        assert said_the_move(move) and move["session_id"], move
    assert done["ended_by"] in ("accept", "max_turns") and done["error"] is None
    assert done["metrics"]["turns"] == len(moves)
    # Resuming it again: it is over.
    again = await http.post(f"/api/v1/negotiations/{negotiation_id}/resume")
    assert again.status_code == 409 and again.json()["error"]["code"] == "NEGOTIATION_OVER"
    return done


def wait_exit(pid: int, timeout: float) -> float:
    """Seconds until process `pid` has exited (a zombie, not reaped yet, counts)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return time.monotonic() - started
        if state == "Z":
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs {timeout} s after it was told to stop")


async def test_sigkill_mid_negotiation_then_restart_and_resume(
    env: dict[str, str], tmp_path: Path
) -> None:
    with servers.daphne_process(env, tmp_path, migrate=False) as (base, pid):
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            negotiation_id = await start(http)
            seen = await poll(http, negotiation_id, lambda data: len(data["moves"]) >= 2)
            os.kill(pid, signal.SIGKILL)
    assert seen["status"] == "running", seen
    kept = seen["moves"]

    with servers.daphne_process(env, tmp_path, migrate=False) as (base, _pid):
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            data = await read(http, negotiation_id)
            assert (data["status"], data["ended_by"]) == ("interrupted", "restart"), data
            assert data["error"]["code"] == "INTERRUPTED" and data["finished_at"], data
            moves = data["moves"]
            assert moves[: len(kept)] == kept, "a move stored before the kill was lost or changed"
            assert [m["turn"] for m in moves] == list(range(1, len(moves) + 1))
            assert said_the_move(moves[-1])  # whole moves: none half-written
            listed = await http.get("/api/v1/negotiations", params={"status": "interrupted"})
            assert negotiation_id in [item["id"] for item in listed.json()["items"]]
            await resume_to_the_end(http, negotiation_id, moves)


async def test_a_graceful_stop_stores_the_negotiation_interrupted(
    env: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM stops the first server, SIGINT the second; the third resumes both negotiations."""
    stopped: dict[str, dict[str, Any]] = {}
    previous: str | None = None
    for signum in (signal.SIGTERM, signal.SIGINT, None):
        with servers.daphne_process(env, tmp_path, migrate=False) as (base, pid):
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                if previous is not None:
                    data = await read(http, previous)
                    assert (data["status"], data["ended_by"]) == ("interrupted", "restart"), data
                    # Stored by the stopping server itself (its end, its metrics), not by the
                    # start-up recovery of this one (which says INTERRUPTED, stores no metrics).
                    assert data["error"] is None, data
                    assert data["metrics"] is not None and data["metrics"]["deal"] is False
                    assert data["metrics"]["turns"] == len(data["moves"]) >= 2
                    stopped[previous] = data
                if signum is None:
                    ends = await asyncio.gather(
                        *(resume_to_the_end(http, i, d["moves"]) for i, d in stopped.items())
                    )
                    assert len(ends) == 2
                    break
                previous = await start(http)
                await poll(http, previous, lambda data: len(data["moves"]) >= 2)
                os.kill(pid, signum)
                took = await asyncio.to_thread(wait_exit, pid, 15)
        print(f"\ndaphne stopped {took:.2f} s after {signal.Signals(signum).name}")
