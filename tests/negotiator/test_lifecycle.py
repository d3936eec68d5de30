"""`negotiator.lifecycle` under daphne, which has no ASGI lifespan: start-up work as the server
starts (before any request), generations ended and clients closed as it stops."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import websockets

from llm.local_model import free_port
from testkit import servers

pytestmark = pytest.mark.timeout(60)

DEAD_SESSION = """
import uuid
from llm.models import Message, Session
session = Session.objects.create(pk=uuid.UUID("{pk}"), provider="lm_studio", status="streaming",
                                 worker="{host}:999999:dead")
Message.objects.create(session=session, position=0, role="user", content="Hi")
Message.objects.create(session=session, position=1, role="assistant", content="Half a re")
"""
SLOW = "bench:tokens=400,delay=0.02"  # 8 s
SLOW_REPLY = "".join(f" t{i}" for i in range(400))


def status_of(database: Path, pk: str) -> str:
    with sqlite3.connect(database) as db:
        return db.execute(
            "SELECT status FROM llm_session WHERE id = ?", (pk.replace("-", ""),)
        ).fetchone()[0]


def reply_of(database: Path, pk: str) -> str:
    with sqlite3.connect(database) as db:
        row = db.execute(
            "SELECT content FROM llm_message WHERE session_id = ? AND role = 'assistant'",
            (pk.replace("-", ""),),
        ).fetchone()
    return row[0] if row else ""


@contextmanager
def site(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """The fake upstream, and the environment of a server on a migrated SQLite file of its own."""
    database = tmp_path / "db.sqlite3"
    with servers.fake_upstream(tmp_path, "--tokens", "5") as upstream:
        env = servers.project_env(
            tmp_path, DATABASE_URL=f"sqlite:///{database}", LM_STUDIO_BASE_URL=upstream
        )
        servers.manage(env, "migrate", "--noinput", "-v0")
        yield env, database


def start_daphne(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "negotiator.asgi:application",
    ]
    return subprocess.Popen(
        command, cwd=servers.ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    ), port


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_daphne_recovers_at_start_and_closes_its_clients_at_stop(tmp_path: Path) -> None:
    with site(tmp_path) as (env, database):
        pk = str(uuid.uuid4())
        servers.manage(env, "shell", "-c", DEAD_SESSION.format(pk=pk, host=socket.gethostname()))
        assert status_of(database, pk) == "streaming"

        log = tmp_path / "daphne.log"
        proc, port = start_daphne(env, log)
        try:
            # No request is sent: the server's start alone recovers the dead process's session.
            deadline = time.monotonic() + 20
            while (
                status_of(database, pk) == "streaming"
                and time.monotonic() < deadline
                and proc.poll() is None
            ):
                time.sleep(0.1)
            assert status_of(database, pk) == "interrupted", log.read_text()

            body = {"messages": [{"role": "user", "content": "Hi"}]}
            reply = httpx.post(
                f"http://127.0.0.1:{port}/api/v1/llm/generate", json=body, timeout=10
            )
            assert reply.status_code == 200, reply.text  # its provider client is open now
        finally:
            code = stop(proc)
        output = log.read_text()
        stopped = "stopped 0 negotiation(s) and 0 generation(s); closed the providers' HTTP clients"
        assert stopped in output, output
        assert "Traceback" not in output, output
        assert code == 0, output


def test_a_reply_under_way_when_daphne_stops_is_stored_cancelled(tmp_path: Path) -> None:
    """Not cut from under it (LLM_BAD_GATEWAY) by the closing clients, nor left `streaming` to be
    found `interrupted` at the next start: ended as if its client had left, with its text."""
    with site(tmp_path) as (env, database):
        log = tmp_path / "daphne.log"
        proc, port = start_daphne(env, log)
        try:
            servers.wait_http(f"http://127.0.0.1:{port}/", proc, log)
            session_id, received = asyncio.run(start_a_slow_reply(port))
        finally:
            stop(proc)
        # The exit code is not checked: CPython 3.11 can crash (SIGSEGV) collecting the tasks
        # of a channels consumer whose socket closes as daphne stops (python/cpython#113566),
        # after everything here has been stored.
        output = log.read_text()
        stopped = "stopped 0 negotiation(s) and 1 generation(s); closed the providers' HTTP clients"
        assert stopped in output, output
        assert "LLM_BAD_GATEWAY" not in output, output
        assert status_of(database, session_id) == "cancelled"
        stored = reply_of(database, session_id)
        assert stored.startswith(received) and len(stored) < len(SLOW_REPLY), (stored, received)


async def start_a_slow_reply(port: int) -> tuple[str, str]:
    """Start an 8 s reply over a WebSocket and read a few tokens: its session id and the text so
    far. The socket is left open (the server's stop must end the reply)."""
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws/llm/stream/")
    await ws.send(
        json.dumps(
            {"type": "generate", "model": SLOW, "messages": [{"role": "user", "content": "Hi"}]}
        )
    )
    start = json.loads(await ws.recv())
    received = ""
    while len(received) < 20:
        received += json.loads(await ws.recv())["text"]
    ws.transport.pause_reading()
    return start["session_id"], received
