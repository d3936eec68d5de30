"""`manage.py serve`, what `make run` runs after migrate, as a real process on a random port.

Its environment is cleaned of the developer's settings (`testkit.servers.project_env`), its database
is a migrated scratch SQLite file (or the suite's PostgreSQL), and its console is a file, not a
terminal (no PYTHONUNBUFFERED), as under docker, systemd or `make run | tee`. The local model URL is
a free port: nothing answers there unless a test puts something there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llm.local_model import MODEL_ALIAS, answers, free_port
from testkit import servers
from testkit.servers import ROOT, default_signals, manage, project_env, wait_http

# What `curl -N -X POST localhost:8000/api/v1/llm/generate -d '{...}'` sends (curl 7.88): `-d`
# means a form content type, not JSON.
CURL_HEADERS = {
    "User-Agent": "curl/7.88.1",
    "Accept": "*/*",
    "Content-Type": "application/x-www-form-urlencoded",
}
HI = {"messages": [{"role": "user", "content": "Hi"}]}
STARTING = f"starting the bundled {MODEL_ALIAS}"
STOPPING = "Stopping the bundled model."


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    base: str
    log: Path

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def stop(self, signum: int, timeout: float = 20) -> int:
        """Signal serve alone (its children get nothing from the test) and wait for its exit."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            name = signal.Signals(signum).name
            pytest.fail(f"serve did not exit within {timeout:g} s of {name}:\n{self.console()}")


@contextmanager
def serve(tmp_path: Path, **overrides: str) -> Iterator[Serve]:
    """`manage.py serve` until the block ends; waits until daphne answers (so after the model)."""
    defaults = {"LLM_PROVIDER": "lm_studio", "LLM_LOCAL_MODEL": "auto"}
    env = project_env(tmp_path, **defaults | overrides)
    env.pop("PYTHONUNBUFFERED", None)
    manage(env, "migrate", "--noinput", "-v0")
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    command = [sys.executable, "manage.py", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=default_signals,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/", process, log, timeout=90)
        yield Serve(process, f"http://127.0.0.1:{port}", log)
    finally:
        # Whatever happened: nothing of this test outlives it (serve, or a model it left behind).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def local_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def refused(base_url: str) -> bool:
    try:
        httpx.get(base_url + "/models", timeout=1)
    except httpx.ConnectError:
        return True
    return False


def wait_refused(base_url: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if refused(base_url):
            return True
        time.sleep(0.1)
    return False


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def frames_of(text: str) -> list[dict]:
    lines = text.splitlines()
    return [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]


def curl_generate(
    base: str, body: dict, timeout: float = 60
) -> tuple[httpx.Response, bytes, list[float]]:
    """POST like `curl -N ... -d '<body>'`, read as it arrives: (response, body, when each SSE
    event arrived)."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    content = b""
    arrivals: list[float] = []
    url = base + "/api/v1/llm/generate"
    with httpx.stream("POST", url, content=raw, headers=CURL_HEADERS, timeout=timeout) as r:
        for chunk in r.iter_raw():
            content += chunk
            arrivals += [time.monotonic()] * (content.count(b"\n\n") - len(arrivals))
    return r, content, arrivals


def assert_streamed(response: httpx.Response, content: bytes, model: str) -> list[dict]:
    assert response.status_code == 200, content
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = frames_of(content.decode())
    kinds = [frame["type"] for frame in frames]
    assert kinds[0] == "start" and kinds[-1] == "done", frames
    assert set(kinds[1:-1]) == {"token"}, frames
    assert frames[0]["provider"] == "lm_studio" and frames[0]["model"] == model
    assert "".join(frame["text"] for frame in frames[1:-1]).strip()
    assert frames[-1]["finish_reason"] in ("stop", "length")
    return frames


def assert_started_no_model(server: Serve, model_url: str | None) -> None:
    console = server.console()
    assert "Serving on" in console, console  # the console is live, so the next line means something
    assert STARTING not in console and "bundled" not in console, console
    assert server.children() == []
    if model_url is not None:
        assert refused(model_url)


def assert_stops_cleanly(server: Serve) -> None:
    assert server.stop(signal.SIGINT) == 0
    assert STOPPING not in server.console()


@pytest.mark.smollm2
@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_starts_the_bundled_model_streams_from_it_and_stops_it(
    tmp_path: Path, signum: int
) -> None:
    model_url = local_url()
    assert refused(model_url)
    with serve(tmp_path, LM_STUDIO_BASE_URL=model_url, LLM_MAX_TOKENS="64") as server:
        # Said on the console while serving, before daphne listens.
        console = server.console()
        start_line = f"Nothing answers at {model_url}: {STARTING} there"
        assert start_line in console, console
        assert f"The bundled model answers at {model_url}." in console
        assert console.index(start_line) < console.index("Listening on TCP address"), console
        assert STOPPING not in console
        [model_pid] = server.children()

        # The bundled model answers where LM Studio was expected.
        models = httpx.get(model_url + "/models", timeout=5).json()
        assert MODEL_ALIAS in [model["id"] for model in models["data"]]

        if signum == signal.SIGINT:  # once is enough: the streaming path is the same for both
            response, content, arrivals = curl_generate(server.base, HI | {"stream": True})
            frames = assert_streamed(response, content, MODEL_ALIAS)
            # Streamed as the model wrote it (a forward pass or more between the first token and
            # the end), not one buffered body.
            assert len(arrivals) == len(frames), (arrivals, frames)
            assert arrivals[-1] - arrivals[1] > 0.005, (arrivals, frames)

        # SIGINT: Ctrl-C in `make run` (a terminal sends it to the model too; here serve alone
        # gets it, so serve itself must stop the model). SIGTERM: docker stop, systemd, kill.
        began = time.monotonic()
        assert server.stop(signum) == 0
        assert STOPPING in server.console()
        assert wait_refused(model_url), "the bundled model still answers after serve exited"
        deadline = time.monotonic() + 10
        while not gone(model_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(model_pid)
        assert time.monotonic() - began < 20


@pytest.mark.timeout(60)
def test_serve_with_local_model_off_starts_nothing_and_generate_is_unavailable(
    tmp_path: Path,
) -> None:
    model_url = local_url()
    off = {"LLM_LOCAL_MODEL": "off", "LLM_MAX_RETRIES": "0"}  # no retry backoff to wait through
    with serve(tmp_path, LM_STUDIO_BASE_URL=model_url, **off) as server:
        assert_started_no_model(server, model_url)

        response, content, _ = curl_generate(server.base, HI)
        assert response.status_code == 503, content
        error = json.loads(content)["error"]
        assert error["code"] == "LLM_UNAVAILABLE" and error["message"], error
        assert set(json.loads(content)) == {"error"}

        response, content, _ = curl_generate(server.base, HI | {"stream": True})
        frames = frames_of(content.decode())
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "LLM_UNAVAILABLE", frames
        assert "token" not in [frame["type"] for frame in frames]

        assert refused(model_url)  # still nothing there
        assert_stops_cleanly(server)


@pytest.mark.timeout(60)
def test_serve_with_a_remote_base_url_starts_nothing(tmp_path: Path) -> None:
    with serve(tmp_path, LM_STUDIO_BASE_URL="http://lm-studio.invalid:1234/v1") as server:
        assert_started_no_model(server, None)
        assert_stops_cleanly(server)


@pytest.mark.timeout(60)
def test_serve_uses_what_already_answers_at_the_local_url(tmp_path: Path) -> None:
    port = free_port()
    with servers.fake_upstream(tmp_path, "--tokens", "5", port=port) as upstream:
        assert upstream == f"http://127.0.0.1:{port}/v1"
        with serve(tmp_path, LM_STUDIO_BASE_URL=upstream) as server:
            assert_started_no_model(server, None)
            response, content, _ = curl_generate(server.base, HI | {"stream": True})
            assert_streamed(response, content, "fake-model")
            assert_stops_cleanly(server)
        assert answers(upstream)  # serve's exit did not touch what it did not start
