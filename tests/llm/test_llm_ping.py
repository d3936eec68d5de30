"""`manage.py llm_ping [--provider NAME] [--json]`.

Exit 0 reachable, 1 with the error code, bad settings -> check id.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import CommandError, call_command

from tests.conftest import OPENROUTER, OPENROUTER_KEY, UPSTREAM

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"object": "list", "data": [{"id": "test-model"}, {"id": "qwen2.5-7b-instruct"}]}


def ping(*args: str) -> tuple[int, str, str]:
    """Run the command; (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        call_command("llm_ping", *args, stdout=stdout, stderr=stderr)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:
        code = 0
    return code, stdout.getvalue(), stderr.getvalue()


def assert_no_key(*outputs: str) -> None:
    for output in outputs:
        assert OPENROUTER_KEY not in output
        assert "TESTKEY" not in output
        assert "Traceback" not in output


# Reachable -----------------------------------------------------------------------------------


def test_reachable_prints_provider_url_latency_and_models(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    route = respx_mock.get(f"{UPSTREAM}/models").respond(json=MODELS)
    code, out, err = ping()
    assert code == 0
    assert "lm_studio" in out
    assert UPSTREAM in out
    assert "ms" in out and "reachable" in out.lower()
    assert "test-model" in out and "qwen2.5-7b-instruct" in out
    assert route.call_count == 1
    assert_no_key(out, err)


def test_reachable_json(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    respx_mock.get(f"{UPSTREAM}/models").respond(json=MODELS)
    code, out, _err = ping("--json")
    assert code == 0
    result = json.loads(out)
    assert result["reachable"] is True
    assert result["provider"] == "lm_studio"
    assert result["base_url"] == UPSTREAM
    assert result["models"] == ["test-model", "qwen2.5-7b-instruct"]
    assert isinstance(result["latency_ms"], int | float) and result["latency_ms"] >= 0
    assert result["error"] is None


def test_reachable_with_no_models_listed(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    respx_mock.get(f"{UPSTREAM}/models").respond(json={"data": []})
    code, out, _ = ping()
    assert code == 0
    assert "lm_studio" in out


# Unreachable ---------------------------------------------------------------------------------


def test_unreachable_exits_1_with_the_code(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    llm_config(max_retries=3)
    route = respx_mock.get(f"{UPSTREAM}/models").mock(
        side_effect=httpx.ConnectError("Connection refused")
    )
    with pytest.raises(SystemExit) as exited:
        call_command("llm_ping", stdout=(out := io.StringIO()), stderr=(err := io.StringIO()))
    assert exited.value.code == 1
    text = out.getvalue() + err.getvalue()
    assert "LLM_UNAVAILABLE" in text
    assert "Traceback" not in text
    assert route.call_count == 1  # a ping is one look, not a retry loop


def test_unreachable_json(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    respx_mock.get(f"{UPSTREAM}/models").mock(side_effect=httpx.ConnectError("Connection refused"))
    code, out, _ = ping("--json")
    assert code == 1
    result = json.loads(out)
    assert result["reachable"] is False
    assert result["models"] == []
    assert result["error"]["code"] == "LLM_UNAVAILABLE"
    assert result["error"]["message"]


def test_timeout_exits_1_with_llm_timeout(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    respx_mock.get(f"{UPSTREAM}/models").mock(side_effect=httpx.ConnectTimeout("timed out"))
    code, out, err = ping()
    assert code == 1
    assert "LLM_TIMEOUT" in out + err


def test_bad_answer_exits_1_with_bad_gateway(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    respx_mock.get(f"{UPSTREAM}/models").respond(200, content=b"<html>hello</html>")
    code, out, err = ping()
    assert code == 1
    assert "LLM_BAD_GATEWAY" in out + err


# Providers -----------------------------------------------------------------------------------


def test_provider_option_selects_openrouter(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    route = respx_mock.get(f"{OPENROUTER}/models").respond(
        json={"data": [{"id": "openrouter/auto"}]}
    )
    code, out, err = ping("--provider", "openrouter", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["provider"] == "openrouter"
    assert result["base_url"] == OPENROUTER
    assert result["models"] == ["openrouter/auto"]
    assert route.calls.last.request.headers["Authorization"] == f"Bearer {OPENROUTER_KEY}"
    assert_no_key(out, err)


def test_openrouter_disabled_exits_1(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    llm_config(openrouter={"enabled": False})
    code, out, err = ping("--provider", "openrouter")
    assert code == 1
    assert "LLM_PROVIDER_DISABLED" in out + err
    assert not respx_mock.calls
    assert_no_key(out, err)


def test_openrouter_disabled_json(llm_config: Callable[..., Any], respx_mock: Any) -> None:
    llm_config(openrouter={"enabled": False})
    code, out, err = ping("--provider", "openrouter", "--json")
    assert code == 1
    assert json.loads(out)["error"]["code"] == "LLM_PROVIDER_DISABLED"
    assert_no_key(out, err)


def test_unknown_provider_option_names_the_check(llm_config: Callable[..., Any]) -> None:
    with pytest.raises(CommandError) as raised:
        call_command("llm_ping", "--provider", "banana", stdout=io.StringIO(), stderr=io.StringIO())
    assert "llm.E001" in str(raised.value)
    assert "banana" in str(raised.value)


def test_unknown_provider_setting_names_the_check(llm_config: Callable[..., Any]) -> None:
    llm_config(provider="banana")
    with pytest.raises(CommandError) as raised:
        call_command("llm_ping", stdout=io.StringIO(), stderr=io.StringIO())
    assert "llm.E001" in str(raised.value)


def test_openrouter_enabled_without_key_names_the_check(llm_config: Callable[..., Any]) -> None:
    llm_config(provider="openrouter", openrouter={"api_key": ""})
    with pytest.raises(CommandError) as raised:
        call_command("llm_ping", stdout=io.StringIO(), stderr=io.StringIO())
    assert "llm.E004" in str(raised.value)


# The key never shows --------------------------------------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
def test_openrouter_key_never_in_output(
    llm_config: Callable[..., Any], respx_mock: Any, as_json: bool
) -> None:
    llm_config(provider="openrouter")
    respx_mock.get(f"{OPENROUTER}/models").respond(
        401,
        json={"error": {"message": f"No auth credentials found for {OPENROUTER_KEY}", "code": 401}},
    )
    code, out, err = ping(*(["--json"] if as_json else []))
    assert code == 1
    assert "LLM_BAD_REQUEST" in out + err
    assert "401" in out + err
    assert_no_key(out, err)


def test_openrouter_key_never_in_output_when_reachable(
    llm_config: Callable[..., Any], respx_mock: Any
) -> None:
    llm_config(provider="openrouter")
    respx_mock.get(f"{OPENROUTER}/models").respond(json={"data": [{"id": "openrouter/auto"}]})
    for args in ((), ("--json",)):
        code, out, err = ping(*args)
        assert code == 0
        assert_no_key(out, err)


# As a real process (manage.py): exit status and no traceback ---------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLM_", "LM_STUDIO_", "OPENROUTER_"))
    }
    environ.update(LLM_LOCAL_MODEL="off", LLM_PING_TIMEOUT="3", **env)
    return subprocess.run(
        [sys.executable, "manage.py", "llm_ping", *args],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_manage_py_bad_provider_prints_the_check_id_without_traceback() -> None:
    done = _manage(LLM_PROVIDER="banana")
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "llm.E001" in output
    assert "Traceback" not in output


def test_manage_py_provider_down_exits_1_with_the_code() -> None:
    done = _manage(LM_STUDIO_BASE_URL=f"http://127.0.0.1:{_closed_port()}/v1")
    assert done.returncode == 1, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "LLM_UNAVAILABLE" in output
    assert "Traceback" not in output


def test_manage_py_never_prints_the_key() -> None:
    done = _manage(
        "--json",
        LLM_PROVIDER="openrouter",
        LLM_ENABLE_OPENROUTER="true",
        OPENROUTER_API_KEY=OPENROUTER_KEY,
        OPENROUTER_BASE_URL=f"http://127.0.0.1:{_closed_port()}/api/v1",
    )
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["code"] == "LLM_UNAVAILABLE"
    assert_no_key(done.stdout, done.stderr)


# Beside the provider: the database and (with REDIS_URL) the channel layer --------------------
# They are reported, and never change the exit code, which follows the provider alone.


@pytest.fixture
def probe_thread() -> Iterator[None]:
    """The database probe runs in asgiref's one sync thread: close the connection it opened there
    after the test (PostgreSQL cannot drop a test database someone is still connected to)."""
    yield
    from asgiref.sync import sync_to_async
    from django.db import connections

    asyncio.run(sync_to_async(connections.close_all, thread_sensitive=True)())


LIVE_REDIS = os.environ.get("SCALEOUT_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_LINE = re.compile(r"^Database: (\w+), ok \((\d+\.\d) ms\)$", re.M)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("probe_thread")
def test_database_is_reported_in_the_human_output(
    llm_config: Callable[..., Any], respx_mock: Any, settings: Any
) -> None:
    from django.db import connection

    settings.REDIS_URL = ""  # whatever the suite runs on: no channel layer to probe
    respx_mock.get(f"{UPSTREAM}/models").respond(json=MODELS)
    code, out, _ = ping()
    assert code == 0
    found = DATABASE_LINE.search(out)
    assert found, out
    assert found.group(1) == connection.vendor
    assert "Channels:" not in out  # without REDIS_URL the in-memory layer has nothing to probe


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("probe_thread")
def test_database_is_reported_in_json(
    llm_config: Callable[..., Any], respx_mock: Any, settings: Any
) -> None:
    from django.db import connection

    settings.REDIS_URL = ""
    respx_mock.get(f"{UPSTREAM}/models").mock(side_effect=httpx.ConnectError("Connection refused"))
    code, out, _ = ping("--json")
    assert code == 1  # the provider's verdict, though the database is fine
    report = json.loads(out)
    database = report["database"]
    assert database["status"] == "ok", database
    assert database["engine"] == connection.vendor
    assert isinstance(database["latency_ms"], int | float) and database["latency_ms"] >= 0
    assert "channel_layer" not in report


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("probe_thread")
@pytest.mark.parametrize("as_json", [False, True])
def test_a_database_failure_is_reported_but_does_not_change_the_exit_code(
    llm_config: Callable[..., Any], respx_mock: Any, monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    from django.db import OperationalError

    from health import probes

    def down(alias: str) -> None:
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(probes, "_select_one", down)
    respx_mock.get(f"{UPSTREAM}/models").respond(json=MODELS)
    code, out, err = ping(*(["--json"] if as_json else []))
    assert code == 0  # the provider is reachable
    if as_json:
        database = json.loads(out)["database"]
        assert database["status"] == "error" and database["latency_ms"] is None
        assert database["error"]["code"] == "DATABASE_UNAVAILABLE"
    else:
        assert re.search(r"^Database: \w+, DATABASE_UNAVAILABLE: ", out, re.M), out
    assert "Traceback" not in out + err


@pytest.fixture
def provider_up(tmp_path: Path) -> Any:
    """A fake upstream in its own process (a subprocess cannot see respx): its base URL."""
    from testkit import servers

    with servers.fake_upstream(tmp_path) as url:
        yield url


def _manage_with_layer(
    tmp_path: Path, redis_url: str, provider_url: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return _manage(
        *args,
        REDIS_URL=redis_url,
        LM_STUDIO_BASE_URL=provider_url,
        DATABASE_URL=f"sqlite:///{tmp_path / 'ping.sqlite3'}",
    )


@pytest.mark.scaleout
def test_manage_py_with_live_redis_reports_a_channel_layer_round_trip(
    tmp_path: Path, provider_up: str
) -> None:
    import redis

    try:
        redis.Redis.from_url(LIVE_REDIS, socket_connect_timeout=3).ping()
    except Exception as exc:
        pytest.fail(f"this test needs Redis at {LIVE_REDIS} ({exc}); .ci/run starts it")

    done = _manage_with_layer(tmp_path, LIVE_REDIS, provider_up, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["reachable"] is True
    layer = report["channel_layer"]
    assert layer["status"] == "ok", layer
    assert "Redis" in layer["backend"], layer  # channels-redis (or the project's subclass of it)
    assert isinstance(layer["latency_ms"], int | float) and layer["latency_ms"] >= 0
    assert "error" not in layer
    assert report["database"] == {
        "status": "ok",
        "engine": "sqlite",
        "latency_ms": report["database"]["latency_ms"],
    }

    human = _manage_with_layer(tmp_path, LIVE_REDIS, f"http://127.0.0.1:{_closed_port()}/v1")
    assert human.returncode == 1, (
        human.stdout + human.stderr
    )  # the provider is down: 1, Redis is fine
    assert re.search(r"^Channels: \w*Redis\w*, ok \(\d+\.\d ms\)$", human.stdout, re.M), (
        human.stdout
    )
    assert DATABASE_LINE.search(human.stdout), human.stdout
    assert "Traceback" not in human.stdout + human.stderr


def test_manage_py_with_redis_down_reports_it_and_exits_on_the_provider(
    tmp_path: Path, provider_up: str
) -> None:
    dead_redis = f"redis://127.0.0.1:{_closed_port()}/0"
    started = time.monotonic()
    done = _manage_with_layer(tmp_path, dead_redis, provider_up, "--json")
    assert done.returncode == 0, done.stdout + done.stderr  # the provider is reachable
    report = json.loads(done.stdout)
    assert report["reachable"] is True
    layer = report["channel_layer"]
    assert layer["status"] == "error" and layer["latency_ms"] is None, layer
    assert layer["error"]["code"] in ("CHANNEL_LAYER_UNAVAILABLE", "CHANNEL_LAYER_TIMEOUT"), layer
    assert layer["error"]["message"]
    assert report["database"]["status"] == "ok"

    human = _manage_with_layer(tmp_path, dead_redis, f"http://127.0.0.1:{_closed_port()}/v1")
    assert human.returncode == 1, human.stdout + human.stderr  # the provider is down: 1
    assert re.search(
        r"^Channels: \w+, CHANNEL_LAYER_(UNAVAILABLE|TIMEOUT): ", human.stdout, re.M
    ), human.stdout
    assert "LLM_UNAVAILABLE" in human.stdout
    output = done.stdout + done.stderr + human.stdout + human.stderr
    assert "Traceback" not in output
    assert time.monotonic() - started < 30  # each probe is bounded (2 s for the channel layer)
