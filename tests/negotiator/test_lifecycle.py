"""`negotiator.lifecycle` under daphne, which has no ASGI lifespan: start-up work as the server
starts (before any request), the providers' clients closed as it stops."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llm.local_model import free_port
from tests import servers

pytestmark = pytest.mark.timeout(60)

DEAD_SESSION = """
import uuid
from llm.models import Message, Session
session = Session.objects.create(pk=uuid.UUID("{pk}"), provider="lm_studio", status="streaming",
                                 worker="{host}:999999:dead")
Message.objects.create(session=session, position=0, role="user", content="Hi")
Message.objects.create(session=session, position=1, role="assistant", content="Half a re")
"""


def status_of(database: Path, pk: str) -> str:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT status FROM llm_session WHERE id = ?", (pk.replace("-", ""),)).fetchone()[0]


def test_daphne_recovers_at_start_and_closes_its_clients_at_stop(tmp_path: Path) -> None:
    import socket
    import uuid

    database = tmp_path / "db.sqlite3"
    with servers.fake_upstream(tmp_path, "--tokens", "5") as upstream:
        env = servers.project_env(tmp_path, DATABASE_URL=f"sqlite:///{database}", LM_STUDIO_BASE_URL=upstream)
        servers.manage(env, "migrate", "--noinput", "-v0")
        pk = str(uuid.uuid4())
        servers.manage(env, "shell", "-c", DEAD_SESSION.format(pk=pk, host=socket.gethostname()))
        assert status_of(database, pk) == "streaming"

        port = free_port()
        log = tmp_path / "daphne.log"
        command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "negotiator.asgi:application"]
        proc = subprocess.Popen(command, cwd=servers.ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        try:
            # No request is sent: the server's start alone recovers the dead process's session.
            deadline = time.monotonic() + 20
            while status_of(database, pk) == "streaming" and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            assert status_of(database, pk) == "interrupted", log.read_text()

            body = {"messages": [{"role": "user", "content": "Hi"}]}
            reply = httpx.post(f"http://127.0.0.1:{port}/api/v1/llm/generate", json=body, timeout=10)
            assert reply.status_code == 200, reply.text  # its provider client is open now
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        output = log.read_text()
        assert "closed the providers' HTTP clients" in output, output
        assert "Traceback" not in output, output
        assert code == 0, output
