"""Real server processes for end-to-end tests and benchmarks: daphne serving the project, the
fake upstream. Each starts on a random port and stops when its block ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from llm.local_model import free_port


def default_signals() -> None:
    """In the child, before exec: SIGINT and SIGTERM act as in a terminal. A runner started in
    the background (CI, pytest-xdist's workers) has SIGINT ignored, and children inherit that, so
    a test that stops a server with Ctrl-C would otherwise wait for nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class ServerDidNotStart(RuntimeError):
    """A server process exited, or did not answer in time; the message ends with its log."""


ROOT = Path(__file__).resolve().parents[1]
# Variables of the developer's shell that must not leak into a server a test configures.
FOREIGN = ("LLM_", "LM_STUDIO_", "OPENROUTER_", "API_TOKEN", "DJANGO_")


def project_env(database_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of a test server: a fresh SQLite file unless the suite runs on PostgreSQL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)}
    env |= {"LLM_RATE_LIMIT": "off", "LLM_LOCAL_MODEL": "off"}
    if not env.get("DATABASE_URL", "").startswith("postgres"):
        env["DATABASE_URL"] = f"sqlite:///{database_dir / 'db.sqlite3'}"
    return env | overrides


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise ServerDidNotStart(f"{url} did not start:\n{log.read_text(errors='replace')[-3000:]}")


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True
    )


@contextmanager
def process(
    command: list[str], env: dict[str, str], log: Path, ready_url: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` from the project root until the block ends; wait until `ready_url` answers."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=default_signals,
    )
    try:
        wait_http(ready_url, proc, log)
        # Another process may have taken the port between `free_port()` and the bind: then it is
        # that one answering, and ours exits at once (address in use). Not a server of ours.
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ServerDidNotStart(
                f"{ready_url} answered, but not from {command[:3]} (it exited with "
                f"{proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}"
            )
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def daphne_process(
    env: dict[str, str], log_dir: Path, *, migrate: bool = True
) -> Iterator[tuple[str, int]]:
    """The project under daphne on a random port, on its migrated database: (base URL, pid)."""
    if migrate:
        manage(env, "migrate", "--noinput", "-v0")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
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
    with process(command, env, log_dir / f"daphne-{port}.log", base + "/") as proc:
        yield base, proc.pid


@contextmanager
def daphne(env: dict[str, str], log_dir: Path, *, migrate: bool = True) -> Iterator[str]:
    with daphne_process(env, log_dir, migrate=migrate) as (base, _pid):
        yield base


@contextmanager
def fake_upstream(log_dir: Path, *args: str, port: int | None = None) -> Iterator[str]:
    """`testkit/fake_upstream.py` in its own process: its base URL (`.../v1`)."""
    port = port or free_port()
    command = [sys.executable, "-m", "testkit.fake_upstream", "--port", str(port), *args]
    base = f"http://127.0.0.1:{port}/v1"
    with process(command, dict(os.environ), log_dir / f"upstream-{port}.log", base + "/models"):
        yield base
