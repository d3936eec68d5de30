"""Restart (issue 6, hardening item 4): SIGKILL the server mid-stream and start it again.

Real processes over real sockets: daphne serving the project, the fake upstream
(testkit/fake_upstream.py) streaming what the model name asks for (`bench:tokens=...,delay=...`,
see `Reply.from_spec`).
The database is a SQLite file of the test's own, or the PostgreSQL of `DATABASE_URL` when the
suite runs on it; either way everything is read through the sessions API, as a user would.

The killed session must come back `interrupted` (error INTERRUPTED) with the partial text the
autosave wrote (a prefix of what its client received, at most one save interval behind), and
every session finished before the kill must read exactly as it did. Nothing else in the database
is lost or corrupt: every row of `llm_session`, `llm_message` and `auth_user` but the killed
session's is read straight from the database before the kill and must be identical after the
restart; the row counts add up, no message lacks its session, and SQLite's integrity check passes.
On PostgreSQL the test runs in a database of its own (created and dropped here), so other runs
sharing the server cannot change rows under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import websockets
from websockets.typing import Origin

from llm.autosave import SAVE_INTERVAL
from testkit import servers
from testkit.servers import project_env

pytestmark = pytest.mark.timeout(120)

TOKEN_DELAY = 0.02  # the slow reply: 50 tokens/s ...
SLOW = f"bench:tokens=3000,delay={TOKEN_DELAY},timestamps=1"  # ... for a minute, unless killed
SLACK = 0.75  # seconds: scheduling, the save's own write, the frames in flight


def ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/ws/llm/stream/"


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def until_end(ws: Any, timeout: float = 20) -> list[dict[str, Any]]:
    frames = []
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await ws.recv())
            assert "Traceback" not in json.dumps(frame), frame
            frames.append(frame)
            if frame["type"] in ("done", "error"):
                return frames


def text_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")


async def generate(
    base: str, model: str, messages: list[dict[str, str]], **fields: Any
) -> list[dict[str, Any]]:
    async with websockets.connect(ws_url(base), origin=Origin("http://localhost")) as ws:
        await ws.send(
            json.dumps({"type": "generate", "messages": messages, "model": model, **fields})
        )
        return await until_end(ws)


async def session(http: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    response = await http.get(f"/api/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def final(http: httpx.AsyncClient, session_id: str, timeout: float = 5) -> dict[str, Any]:
    """The session once it is no longer `streaming` (its end is stored just after the end frame)."""
    deadline = time.monotonic() + timeout
    while True:
        stored = await session(http, session_id)
        if stored["status"] != "streaming" or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.05)


def reply(stored: dict[str, Any]) -> str:
    last = stored["messages"][-1] if stored["messages"] else None
    return last["content"] if last and last["role"] == "assistant" else ""


def tokens_of(text: str) -> list[tuple[str, float]]:
    """(name, upstream send time) of each `" t<i>|<perf_counter>"` token of the slow reply."""
    found = []
    for part in text.split(" ")[1:]:
        name, _, sent = part.partition("|")
        found.append((name, float(sent)))
    return found


# The database, read directly (not through the app) -------------------------------------------

# Each table, and its column naming the session a row belongs to (None: no session).
TABLES = {"llm_session": "id", "llm_message": "session_id", "auth_user": None}
KEEPER = "keeper"  # a user created before the kill: auth_user must come through it untouched


def is_postgres(env: dict[str, str]) -> bool:
    return env["DATABASE_URL"].startswith("postgres")


@contextlib.contextmanager
def own_database(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """On PostgreSQL: `env` on a fresh database of the same server, dropped afterwards."""
    if not is_postgres(env):
        yield env
        return
    import psycopg

    name = f"negotiator_restart_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(env["DATABASE_URL"], autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield env | {
                "DATABASE_URL": urlunsplit(urlsplit(env["DATABASE_URL"])._replace(path=f"/{name}"))
            }
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def connect(env: dict[str, str]) -> Iterator[Any]:
    """A DB-API connection to the servers' database (read-only on SQLite)."""
    if is_postgres(env):
        import psycopg

        with psycopg.connect(env["DATABASE_URL"], autocommit=True, connect_timeout=5) as db:
            yield db
    else:
        path = env["DATABASE_URL"].removeprefix("sqlite:///")
        lite = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            yield lite
        finally:
            lite.close()


def snapshot(env: dict[str, str], killed: str) -> dict[str, list[tuple[tuple[str, Any], ...]]]:
    """Every row of TABLES, each as its (column, value) pairs, but those of the session `killed`."""
    killed_id = uuid.UUID(killed)
    tables = {}
    with connect(env) as db:
        for table, session_column in TABLES.items():
            cursor = db.cursor()
            cursor.execute(f"SELECT * FROM {table} ORDER BY id")
            names = [column[0] for column in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            tables[table] = [
                tuple(sorted(row.items()))
                for row in rows
                if session_column is None or uuid.UUID(str(row[session_column])) != killed_id
            ]
    return tables


def check_integrity(env: dict[str, str]) -> dict[str, int]:
    """The database is sound (SQLite's own check; every message's session exists; positions are
    unique): the row count of each table."""
    with connect(env) as db:
        cursor = db.cursor()
        if not is_postgres(env):
            cursor.execute("PRAGMA integrity_check")
            assert cursor.fetchall() == [("ok",)]
            cursor.execute("PRAGMA foreign_key_check")
            assert cursor.fetchall() == []
        cursor.execute(
            "SELECT COUNT(*) FROM llm_message m LEFT JOIN llm_session s ON s.id = m.session_id "
            "WHERE s.id IS NULL"
        )
        assert cursor.fetchone()[0] == 0, "messages without their session"
        cursor.execute(
            "SELECT session_id, position FROM llm_message GROUP BY session_id, position "
            "HAVING COUNT(*) > 1"
        )
        assert cursor.fetchall() == [], "two messages at one position"
        counts = {}
        for table in TABLES:
            cursor.execute(f"SELECT COUNT(*) FROM {table}")
            counts[table] = cursor.fetchone()[0]
    return counts


def assert_untouched(
    env: dict[str, str], killed: str, before: dict[str, list[Any]], killed_messages: int
) -> None:
    """Every row but the killed session's is as it was; the counts are those rows plus its own."""
    after = snapshot(env, killed)
    for table in TABLES:
        was = {dict(row)["id"]: dict(row) for row in before[table]}
        now = {dict(row)["id"]: dict(row) for row in after[table]}
        changed = {
            pk: {
                column: (value, now[pk].get(column))
                for column, value in row.items()
                if now[pk].get(column) != value
            }
            for pk, row in was.items()
            if pk in now and now[pk] != row
        }
        lost, new = (
            sorted(was.keys() - now.keys(), key=str),
            sorted(now.keys() - was.keys(), key=str),
        )
        assert not (changed or lost or new), (
            f"{table}: changed (before, after) {changed}, lost {lost}, new {new}"
        )
    counts = check_integrity(env)
    assert counts == {
        "llm_session": len(before["llm_session"]) + 1,
        "llm_message": len(before["llm_message"]) + killed_messages,
        "auth_user": len(before["auth_user"]),
    }, counts


async def test_sigkill_mid_stream_then_restart(tmp_path: Path) -> None:
    ids: list[str] = []
    with servers.fake_upstream(tmp_path) as upstream:
        shared = project_env(
            tmp_path,
            LM_STUDIO_BASE_URL=upstream,
            LM_STUDIO_DEFAULT_MODEL="fake-model",
            LLM_MAX_TOKENS="5000",
            LLM_STREAM_IDLE_TIMEOUT="1",
            LLM_MAX_RETRIES="0",
            LLM_RETRY_DELAY="0",
        )
        with own_database(shared) as env:
            await _kill_and_restart(env, tmp_path, ids)


async def _kill_and_restart(env: dict[str, str], tmp_path: Path, ids: list[str]) -> None:
    # 1. A first server: sessions that end normally, then one killed mid-stream. --------------
    with servers.daphne_process(env, tmp_path) as (base, pid):
        servers.manage(
            env | {"DJANGO_SUPERUSER_PASSWORD": uuid.uuid4().hex},
            "createsuperuser",
            "--noinput",
            "--username",
            KEEPER,
            "--email",
            "keeper@example.com",
        )
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            before = await _finished_sessions(base, http, ids)

            ws = await websockets.connect(ws_url(base), origin=Origin("http://localhost"))
            await ws.send(
                json.dumps(
                    {"type": "generate", "messages": user("Tell a long story"), "model": SLOW}
                )
            )
            start = json.loads(await ws.recv())
            assert start["type"] == "start", start
            slow_id = start["session_id"]
            ids.append(slow_id)
            received = ""
            reading_since = time.monotonic()
            while (
                time.monotonic() - reading_since < SAVE_INTERVAL + 0.8
            ):  # the autosave runs at 2 s
                frame = json.loads(await ws.recv())
                assert frame["type"] == "token", frame
                received += frame["text"]
            during = await session(http, slow_id)
            assert during["status"] == "streaming", during
            assert reply(during), (
                f"nothing autosaved after {SAVE_INTERVAL + 0.8:g} s: {during['messages']}"
            )

            rows = await asyncio.to_thread(snapshot, env, slow_id)
            assert len(rows["llm_session"]) == len(before)
            assert len(rows["llm_message"]) == sum(
                len(stored["messages"]) for stored in before.values()
            )
            assert [dict(user)["username"] for user in rows["auth_user"]] == [KEEPER]
            killed_at = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
        # The rest of what the server wrote before it died, then the dropped connection.
        try:
            async with asyncio.timeout(5):
                async for message in ws:
                    frame = json.loads(message)
                    assert frame["type"] == "token", f"an end frame from a killed server: {frame}"
                    received += frame["text"]
        except websockets.ConnectionClosed:
            pass
        assert ws.close_code != 1000, "the socket closed cleanly: was the server killed?"
    # Leaving the block reaped the killed process: its pid is free, as after a real crash.

    await asyncio.to_thread(
        check_integrity, env
    )  # sound straight after the kill, before any recovery

    # 2. A new server on the same database: recovery runs before its first request. ----------
    with servers.daphne_process(env, tmp_path) as (base, _pid):
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            killed = await session(http, slow_id)
            assert killed["status"] == "interrupted", killed
            assert killed["error"] is not None and killed["error"]["code"] == "INTERRUPTED", killed
            assert killed["finished_at"] is not None
            assert [m["role"] for m in killed["messages"]] == ["user", "assistant"], killed[
                "messages"
            ]
            assert killed["messages"][0]["content"] == "Tell a long story"
            saved = reply(killed)
            assert saved, "the partial reply was lost"
            assert received.startswith(saved), f"stored {saved[-80:]!r} is not what the client got"
            assert saved.startswith(reply(during))  # saves only ever grow the text
            # At most one save interval behind the moment of the kill (each token carries the
            # time the upstream sent it: perf_counter is the system's monotonic clock).
            stored_tokens, got_tokens = tokens_of(saved), tokens_of(received)
            assert [name for name, _ in stored_tokens] == [
                f"t{i}" for i in range(len(stored_tokens))
            ]
            behind = killed_at - stored_tokens[-1][1]
            assert behind <= SAVE_INTERVAL + SLACK, (
                f"the stored text ends {behind:.2f} s before the kill: {len(stored_tokens)} tokens "
                f"stored, {len(got_tokens)} received"
            )
            assert len(got_tokens) - len(stored_tokens) <= (SAVE_INTERVAL + SLACK) / TOKEN_DELAY
            print(
                f"killed {behind:.2f} s after the last saved token; "
                f"{len(stored_tokens)} tokens stored, {len(got_tokens)} received"
            )

            # Read straight from the database: the recovery touched the killed session alone.
            await asyncio.to_thread(assert_untouched, env, slow_id, rows, 2)

            for session_id, stored in before.items():
                assert await session(http, session_id) == stored, f"session {session_id} changed"

            listed = await http.get(
                "/api/v1/sessions", params={"status": "interrupted", "page_size": 100}
            )
            assert listed.status_code == 200, listed.text
            assert slow_id in {item["id"] for item in listed.json()["items"]}
            everything = await http.get("/api/v1/sessions")
            assert everything.status_code == 200 and everything.json()["count"] >= len(ids), (
                everything.text
            )

            # The interrupted conversation goes on: its stored history (with the partial reply)
            # first.
            frames = await generate(base, "bench:tokens=3", user("Go on"), session_id=slow_id)
            assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "stop", frames
            continued = await final(http, slow_id)
            assert continued["status"] == "completed", continued
            assert [m["content"] for m in continued["messages"]] == [
                "Tell a long story",
                saved,
                "Go on",
                " t0 t1 t2",
            ]
            for session_id, stored in before.items():  # still untouched
                assert await session(http, session_id) == stored, f"session {session_id} changed"
            await asyncio.to_thread(
                assert_untouched, env, slow_id, rows, 4
            )  # continuing wrote its own rows only


async def _finished_sessions(
    base: str, http: httpx.AsyncClient, ids: list[str]
) -> dict[str, dict[str, Any]]:
    """Sessions in each final state, as the API shows them once they ended."""
    made: dict[str, dict[str, Any]] = {}

    frames = await generate(base, "bench:tokens=30", user("Count to thirty"))
    assert frames[-1]["type"] == "done", frames
    first = frames[0]["session_id"]
    ids.append(first)
    frames = await generate(
        base, "bench:tokens=5", user("And to five"), session_id=first
    )  # a second turn
    assert frames[-1]["type"] == "done", frames
    made[first] = await final(http, first)
    assert made[first]["status"] == "completed", made[first]
    assert [m["content"] for m in made[first]["messages"]] == [
        "Count to thirty",
        "".join(f" t{i}" for i in range(30)),
        "And to five",
        " t0 t1 t2 t3 t4",
    ]

    async with websockets.connect(ws_url(base), origin=Origin("http://localhost")) as ws:
        ramble = {
            "type": "generate",
            "messages": user("Ramble"),
            "model": "bench:tokens=500,delay=0.01",
        }
        await ws.send(json.dumps(ramble))
        frames = [json.loads(await ws.recv()) for _ in range(4)]
        start = frames[0]
        assert [f["type"] for f in frames] == ["start", "token", "token", "token"], frames
        await ws.send(json.dumps({"type": "cancel"}))
        frames += await until_end(ws)
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "cancelled", frames[-1]
    ids.append(start["session_id"])
    made[start["session_id"]] = cancelled = await final(http, start["session_id"])
    assert cancelled["status"] == "cancelled" and reply(cancelled) == text_of(frames), cancelled

    frames = await generate(
        base, "bench:tokens=5,ttft=3", user("Stall")
    )  # > LLM_STREAM_IDLE_TIMEOUT
    end = frames[-1]
    assert (end["type"], end["code"]) == ("error", "LLM_TIMEOUT"), frames
    ids.append(end["session_id"])
    made[end["session_id"]] = failed = await final(http, end["session_id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "LLM_TIMEOUT", failed
    return made
