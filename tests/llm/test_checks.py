"""System checks for the LLM settings (`llm/checks.py`), in the style of Django's own check tests.

Each test sets bad values through pytest-django's `settings` (via the `llm_config` fixture) and
compares what the check returns to exact `Error` / `Warning` objects. The last part runs the real
entry points (`manage.py check`, `manage.py llm_ping`, the ASGI app) as subprocesses with bad
environment variables: they must end with the check id and no traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core import checks
from django.core.checks import Error, Warning
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from llm.checks import (
    check_base_urls,
    check_database_url,
    check_logging,
    check_numbers,
    check_openrouter_key,
    check_provider,
    check_proxies,
    check_response_format,
    run_llm_checks,
)

Config = Callable[..., dict[str, Any]]

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def number_error(name: str, value: Any, kind: str, bound: str) -> Error:
    return Error(
        f"{name} is {value!r}; it must be {kind} {bound}.",
        hint=f"Set {name} to {kind} {bound}, or unset it to use the default.",
        id="llm.E003",
    )


POSITIVE = ("a number", "greater than 0")
NON_NEGATIVE = ("a number", "at least 0")
WHOLE_POSITIVE = ("a whole number", "greater than 0")
WHOLE_NON_NEGATIVE = ("a whole number", "at least 0")


# Defaults and registration ----------------------------------------------------------------------


def test_default_settings_produce_no_messages() -> None:
    assert check_provider() == []
    assert check_base_urls() == []
    assert check_numbers() == []
    assert check_openrouter_key() == []
    assert run_llm_checks() == []


def test_test_config_produces_no_messages(llm_config: Config) -> None:
    assert run_llm_checks() == []
    llm_config(provider="openrouter")
    assert run_llm_checks() == []


def test_checks_are_registered_with_the_llm_tag() -> None:
    registered = checks.registry.registry.get_checks()
    for check in (check_provider, check_base_urls, check_numbers, check_openrouter_key):
        assert check in registered
        # `register()` sets the attribute on the function at run time.
        assert "llm" in check.tags  # type: ignore[attr-defined]
    assert "llm" in checks.registry.registry.tags_available()


def test_run_checks_with_the_llm_tag_reports_a_bad_provider(llm_config: Config) -> None:
    llm_config(provider="banana")
    assert [m.id for m in checks.run_checks(tags=["llm"])] == ["llm.E001"]


def test_manage_check_passes_with_defaults() -> None:
    out = StringIO()
    call_command("check", stdout=out, stderr=StringIO())
    assert "no issues" in out.getvalue()


def test_manage_check_fails_on_a_bad_provider(llm_config: Config) -> None:
    llm_config(provider="banana")
    with pytest.raises(SystemCheckError) as info:
        call_command("check", stdout=StringIO(), stderr=StringIO())
    assert "llm.E001" in str(info.value)
    assert "LLM_PROVIDER is 'banana', which is not a provider." in str(info.value)


def test_manage_check_fails_on_a_bad_number(llm_config: Config) -> None:
    llm_config(max_retries=-1)
    with pytest.raises(SystemCheckError) as info:
        call_command("check", stdout=StringIO(), stderr=StringIO())
    assert "llm.E003" in str(info.value)
    assert "LLM_MAX_RETRIES" in str(info.value)


# llm.E001 / llm.E005 / llm.E006: provider selection ---------------------------------------------


@pytest.mark.parametrize("provider", ["banana", "", "LM_STUDIO", "openai"])
def test_e001_unknown_provider(llm_config: Config, provider: str) -> None:
    llm_config(provider=provider)
    assert check_provider() == [
        Error(
            f"LLM_PROVIDER is {provider!r}, which is not a provider.",
            hint="Set LLM_PROVIDER to one of: lm_studio, openrouter.",
            id="llm.E001",
        )
    ]


def test_e001_exact_banana(llm_config: Config) -> None:
    llm_config(provider="banana")
    assert check_provider() == [
        Error(
            "LLM_PROVIDER is 'banana', which is not a provider.",
            hint="Set LLM_PROVIDER to one of: lm_studio, openrouter.",
            id="llm.E001",
        )
    ]


@pytest.mark.parametrize("provider", ["lm_studio", "openrouter"])
def test_known_providers_pass(llm_config: Config, provider: str) -> None:
    llm_config(provider=provider)
    assert check_provider() == []


def test_e005_unknown_fallback(llm_config: Config) -> None:
    llm_config(fallbacks=["openrouter", "banana", "kiwi"])
    assert check_provider() == [
        Error(
            "LLM_FALLBACK_PROVIDERS names unknown providers: banana, kiwi.",
            hint="List only these, comma-separated: lm_studio, openrouter.",
            id="llm.E005",
        )
    ]


def test_known_fallbacks_pass(llm_config: Config) -> None:
    llm_config(fallbacks=["openrouter", "lm_studio"])
    assert check_provider() == []


def test_e001_and_e005_together(llm_config: Config) -> None:
    llm_config(provider="banana", fallbacks=["kiwi"])
    assert [m.id for m in check_provider()] == ["llm.E001", "llm.E005"]


@pytest.mark.parametrize("value", ["on", "yes", "", "true"])
def test_e006_local_model(llm_config: Config, settings: Any, value: str) -> None:
    settings.LLM = {**settings.LLM, "LOCAL_MODEL": value}
    assert check_provider() == [
        Error(
            f"LLM_LOCAL_MODEL is {value!r}.",
            hint="Set LLM_LOCAL_MODEL to 'auto' (start the bundled model when needed) or 'off'.",
            id="llm.E006",
        )
    ]


@pytest.mark.parametrize("value", ["auto", "off"])
def test_local_model_valid(settings: Any, value: str) -> None:
    settings.LLM = {**settings.LLM, "LOCAL_MODEL": value}
    assert check_provider() == []


@pytest.mark.parametrize("value", ["json-object", "JSON_SCHEMA", "", "grammar"])
def test_e012_response_format(llm_config: Config, value: str) -> None:
    """A typo must not silently mean "auto"."""
    llm_config(lm_studio={"response_format": value})
    [error] = check_response_format()
    assert error.id == "llm.E012" and error.msg == f"LM_STUDIO_RESPONSE_FORMAT is {value!r}."
    assert "json_object (llama-cpp-python)" in (error.hint or "")


@pytest.mark.parametrize("value", ["auto", "json_schema", "json_object"])
def test_response_format_valid(llm_config: Config, value: str) -> None:
    llm_config(lm_studio={"response_format": value})
    assert check_response_format() == []


# llm.E002: base URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["ftp://x", "localhost:1234", "", "http://", "1234/v1", "ws://host/v1"]
)
def test_e002_bad_lm_studio_base_url(llm_config: Config, url: str) -> None:
    llm_config(lm_studio={"base_url": url})
    assert check_base_urls() == [
        Error(
            f"LM_STUDIO_BASE_URL is {url!r}, which is not an http(s) URL.",
            hint="Set LM_STUDIO_BASE_URL to the server's OpenAI-compatible base URL, e.g. http://localhost:1234/v1.",
            id="llm.E002",
        )
    ]


def test_e002_bad_openrouter_base_url(llm_config: Config) -> None:
    llm_config(openrouter={"base_url": "ftp://x"})
    assert check_base_urls() == [
        Error(
            "OPENROUTER_BASE_URL is 'ftp://x', which is not an http(s) URL.",
            hint="Set OPENROUTER_BASE_URL to the server's OpenAI-compatible base URL, e.g. http://localhost:1234/v1.",
            id="llm.E002",
        )
    ]


def test_e002_both_base_urls(llm_config: Config) -> None:
    llm_config(lm_studio={"base_url": "localhost:1234"}, openrouter={"base_url": ""})
    assert [(m.id, m.msg.split(" ")[0]) for m in check_base_urls()] == [
        ("llm.E002", "LM_STUDIO_BASE_URL"),
        ("llm.E002", "OPENROUTER_BASE_URL"),
    ]


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:1234/v1",
        "https://openrouter.ai/api/v1",
        "http://127.0.0.1:8080",
        "http://[::1]:1234/v1",
    ],
)
def test_good_base_urls_pass(llm_config: Config, url: str) -> None:
    llm_config(lm_studio={"base_url": url}, openrouter={"base_url": url})
    assert check_base_urls() == []


# llm.E003: numbers ------------------------------------------------------------------------------

NUMERIC_OPTIONS = [
    # option, environment variable, kind/bound, bad values
    ("connect_timeout", "LLM_CONNECT_TIMEOUT", POSITIVE, [0, -1, -0.5, "abc", True, None]),
    ("idle_timeout", "LLM_STREAM_IDLE_TIMEOUT", POSITIVE, [0, -3, "abc", False]),
    ("ping_timeout", "LLM_PING_TIMEOUT", POSITIVE, [0, -1, "abc", True]),
    ("retry_delay", "LLM_RETRY_DELAY", NON_NEGATIVE, [-1, -0.1, "abc", True]),
    ("retry_after_max", "LLM_RETRY_AFTER_MAX", NON_NEGATIVE, [-1, "abc", True]),
    ("max_retries", "LLM_MAX_RETRIES", WHOLE_NON_NEGATIVE, [-1, 1.5, "abc", "3", True]),
    ("max_connections", "LLM_MAX_CONNECTIONS", WHOLE_POSITIVE, [0, -1, 2.5, "abc", True]),
    ("max_keepalive", "LLM_MAX_KEEPALIVE", WHOLE_NON_NEGATIVE, [-1, "abc", True]),
    ("max_tokens", "LLM_MAX_TOKENS", WHOLE_POSITIVE, [0, -5, 10.5, "abc", True]),
]

BAD_NUMBERS = [
    pytest.param(option, env, rule, value, id=f"{option}={value!r}")
    for option, env, rule, values in NUMERIC_OPTIONS
    for value in values
]


@pytest.mark.parametrize(("option", "env", "rule", "value"), BAD_NUMBERS)
def test_e003_bad_number(
    llm_config: Config, option: str, env: str, rule: tuple[str, str], value: Any
) -> None:
    llm_config(**{option: value})
    assert check_numbers() == [number_error(env, value, *rule)]


def test_e003_exact_messages(llm_config: Config) -> None:
    llm_config(connect_timeout=0)
    assert check_numbers() == [
        Error(
            "LLM_CONNECT_TIMEOUT is 0; it must be a number greater than 0.",
            hint="Set LLM_CONNECT_TIMEOUT to a number greater than 0, "
            "or unset it to use the default.",
            id="llm.E003",
        )
    ]
    llm_config(max_retries=-1)
    assert check_numbers() == [
        Error(
            "LLM_MAX_RETRIES is -1; it must be a whole number at least 0.",
            hint="Set LLM_MAX_RETRIES to a whole number at least 0, "
            "or unset it to use the default.",
            id="llm.E003",
        )
    ]
    llm_config(idle_timeout="abc")
    assert check_numbers() == [
        Error(
            "LLM_STREAM_IDLE_TIMEOUT is 'abc'; it must be a number greater than 0.",
            hint="Set LLM_STREAM_IDLE_TIMEOUT to a number greater than 0, "
            "or unset it to use the default.",
            id="llm.E003",
        )
    ]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("retry_delay", 0),
        ("retry_after_max", 0),
        ("max_retries", 0),
        ("max_keepalive", 0),
        ("connect_timeout", 0.25),
        ("idle_timeout", 1),
        ("max_tokens", 1),
        ("max_connections", 1),
    ],
)
def test_good_numbers_pass(llm_config: Config, option: str, value: Any) -> None:
    llm_config(**{option: value})
    assert check_numbers() == []


@pytest.mark.parametrize("value", [0, -1, "abc", True])
def test_e003_read_timeout_as_settings_sets_it(llm_config: Config, value: Any) -> None:
    # settings.py gives both providers the value of LM_STUDIO_TIMEOUT: one message, not two.
    llm_config(lm_studio={"read_timeout": value}, openrouter={"read_timeout": value})
    assert check_numbers() == [number_error("LM_STUDIO_TIMEOUT", value, *POSITIVE)]


def test_e003_lm_studio_read_timeout_alone(llm_config: Config) -> None:
    # The openrouter entry keeps a valid read_timeout; the bad lm_studio one must still be reported.
    llm_config(lm_studio={"read_timeout": 0})
    errors = check_numbers()
    assert [e.id for e in errors] == ["llm.E003"]
    assert errors[0].msg == "LM_STUDIO_TIMEOUT is 0; it must be a number greater than 0."


def test_e003_bad_default_not_hidden_by_one_providers_override(llm_config: Config) -> None:
    # DEFAULTS apply to every provider unless its CONFIG overrides them: openrouter still gets 0.
    llm_config(connect_timeout=0, lm_studio={"connect_timeout": 5})
    errors = check_numbers()
    assert [e.id for e in errors] == ["llm.E003"]
    assert errors[0].msg.startswith("LLM_CONNECT_TIMEOUT is 0;")


def test_e003_several_bad_numbers_each_reported(llm_config: Config) -> None:
    llm_config(connect_timeout=-1, max_retries="many", max_tokens=0)
    errors = check_numbers()
    assert {e.id for e in errors} == {"llm.E003"}
    assert sorted(e.msg.split(" ")[0] for e in errors) == [
        "LLM_CONNECT_TIMEOUT",
        "LLM_MAX_RETRIES",
        "LLM_MAX_TOKENS",
    ]


@pytest.mark.parametrize("value", [0, -1, "abc", 1.5, True])
def test_e003_max_request_bytes(llm_config: Config, settings: Any, value: Any) -> None:
    settings.LLM_MAX_REQUEST_BYTES = value
    assert check_numbers() == [number_error("LLM_MAX_REQUEST_BYTES", value, *WHOLE_POSITIVE)]


def test_max_request_bytes_valid(llm_config: Config, settings: Any) -> None:
    settings.LLM_MAX_REQUEST_BYTES = 1
    assert check_numbers() == []


# llm.E004 / llm.W001: OpenRouter ----------------------------------------------------------------

E004 = Error(
    "OpenRouter is selected and enabled but OPENROUTER_API_KEY is empty.",
    hint="Set OPENROUTER_API_KEY to a key from https://openrouter.ai/keys.",
    id="llm.E004",
)
W001 = Warning(
    "OpenRouter is selected but LLM_ENABLE_OPENROUTER is false, so every request "
    "to it fails with LLM_PROVIDER_DISABLED.",
    hint="Set LLM_ENABLE_OPENROUTER=true (and OPENROUTER_API_KEY), or pick another provider.",
    id="llm.W001",
)


def test_e004_openrouter_enabled_without_key(llm_config: Config) -> None:
    llm_config(provider="openrouter", openrouter={"enabled": True, "api_key": ""})
    assert check_openrouter_key() == [E004]


def test_e004_when_only_a_fallback(llm_config: Config) -> None:
    llm_config(
        provider="lm_studio", fallbacks=["openrouter"], openrouter={"enabled": True, "api_key": ""}
    )
    assert check_openrouter_key() == [E004]


def test_w001_openrouter_selected_but_disabled(llm_config: Config) -> None:
    llm_config(provider="openrouter", openrouter={"enabled": False, "api_key": "sk-or-v1-x"})
    assert check_openrouter_key() == [W001]


def test_w001_when_only_a_fallback(llm_config: Config) -> None:
    llm_config(fallbacks=["openrouter"], openrouter={"enabled": False, "api_key": ""})
    assert check_openrouter_key() == [W001]


def test_w001_is_not_serious(llm_config: Config) -> None:
    llm_config(provider="openrouter", openrouter={"enabled": False})
    (message,) = check_openrouter_key()
    assert not message.is_serious()
    out, err = StringIO(), StringIO()
    call_command("check", stdout=out, stderr=err)  # a warning does not fail the check
    assert "llm.W001" in out.getvalue() + err.getvalue()


def test_openrouter_not_in_use_needs_no_key(llm_config: Config) -> None:
    llm_config(provider="lm_studio", openrouter={"enabled": True, "api_key": ""})
    assert check_openrouter_key() == []
    llm_config(provider="lm_studio", openrouter={"enabled": False, "api_key": ""})
    assert check_openrouter_key() == []


def test_openrouter_with_key_passes(llm_config: Config) -> None:
    llm_config(provider="openrouter", openrouter={"enabled": True, "api_key": "sk-or-v1-abc"})
    assert check_openrouter_key() == []


def test_messages_never_contain_the_key(llm_config: Config) -> None:
    key = "sk-or-v1-SECRET-should-never-appear"
    llm_config(
        provider="banana",
        fallbacks=["openrouter", "kiwi"],
        lm_studio={"base_url": "nope"},
        openrouter={"api_key": key, "base_url": "ftp://x", "enabled": False},
        connect_timeout=0,
    )
    messages = run_llm_checks()
    assert {m.id for m in messages} >= {"llm.E001", "llm.E002", "llm.E003", "llm.E005", "llm.W001"}
    for message in messages:
        assert key not in message.msg
        assert key not in (message.hint or "")


# Settings of the process around the LLM: serving, database pool, logging --------------------------


@pytest.mark.parametrize(
    ("setting", "name", "value", "bound"),
    [
        ("SERVE_PORT", "PORT", "abc", "greater than 0"),
        ("SERVE_PORT", "PORT", 0, "greater than 0"),
        ("DATABASE_POOL_SIZE", "DATABASE_POOL_SIZE", 0, "greater than 0"),
        ("DJANGO_HSTS_SECONDS", "DJANGO_HSTS_SECONDS", "a year", "at least 0"),
    ],
)
def test_e003_process_numbers(
    settings: Any, setting: str, name: str, value: Any, bound: str
) -> None:
    setattr(settings, setting, value)
    assert check_numbers() == [number_error(name, value, "a whole number", bound)]


def test_e003_port_above_the_tcp_range(settings: Any) -> None:
    settings.SERVE_PORT = 70000
    assert check_numbers() == [
        Error(
            "PORT is 70000; a TCP port is at most 65535.",
            hint="Set PORT to a free TCP port, e.g. 8000.",
            id="llm.E003",
        )
    ]


def test_e008_log_level(settings: Any) -> None:
    settings.LOG_LEVEL = "VERBOSE"
    assert check_logging() == [
        Error(
            "LOG_LEVEL is 'VERBOSE', which is not a logging level.",
            hint="Set LOG_LEVEL to DEBUG, INFO, WARNING, ERROR or CRITICAL.",
            id="llm.E008",
        )
    ]


def test_e009_log_dir_that_cannot_be_written(settings: Any, tmp_path: Path) -> None:
    settings.LOG_DIR = str(tmp_path / "file")
    (tmp_path / "file").write_text("not a folder")
    assert check_logging() == [
        Error(
            f"LOG_DIR is {settings.LOG_DIR!r}, a folder this process cannot create or write in.",
            hint="Set LOG_DIR to a writable folder (it is created if missing), or unset it to log "
            "to the console only.",
            id="llm.E009",
        )
    ]
    settings.LOG_DIR = str(tmp_path)
    assert check_logging() == []


# Entry points as subprocesses -------------------------------------------------------------------


@pytest.fixture
def scratch_db(tmp_path: Path) -> str:
    """A throw-away SQLite file, so no subprocess touches the developer's or CI's database."""
    return f"sqlite:///{tmp_path / 'scratch.sqlite3'}"


def run_entry_point(args: list[str], db: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLM_", "LM_STUDIO_", "OPENROUTER_")) and k != "DJANGO_SETTINGS_MODULE"
    }
    env["DATABASE_URL"] = db
    env.update(env_vars)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# Each bad setting through one entry point, the three entry points in turn: every entry point
# meets every kind of check (settings read in settings.py, numbers, logging, the database URL),
# and the checks themselves are tested in-process above. (All 27 pairs cost 30 s a run.)
BAD_ENV = [
    pytest.param({"LLM_PROVIDER": "banana"}, "llm.E001", "llm_ping", id="provider=banana"),
    pytest.param({"LM_STUDIO_TIMEOUT": "abc"}, "llm.E003", "check", id="timeout=abc"),
    pytest.param({"PORT": "abc"}, "llm.E003", "serve", id="port=abc"),
    pytest.param({"DATABASE_POOL_SIZE": "many"}, "llm.E003", "llm_ping", id="pool=many"),
    pytest.param({"LOG_LEVEL": "verbose"}, "llm.E008", "check", id="log-level=verbose"),
    pytest.param(
        {"LOG_DIR": "/proc/negotiator-logs"}, "llm.E009", "serve", id="log-dir=unwritable"
    ),
    pytest.param({"LOG_DIR": "manage.py"}, "llm.E009", "llm_ping", id="log-dir=a-file"),
    pytest.param(
        {"DATABASE_URL": "mysql://u:SECRETPW@db:3306/x"}, "llm.E011", "check", id="database=mysql"
    ),
    pytest.param(
        {"DATABASE_URL": "postgres://u:SECRETPW@db:port/x"},
        "llm.E011",
        "serve",
        id="database=bad-port",
    ),
    pytest.param({"NEGOTIATION_BETA": "0"}, "negotiation.E003", "check", id="beta=0"),
]


@pytest.mark.parametrize(("env_vars", "check_id", "command"), BAD_ENV)
def test_manage_py_with_bad_env_prints_check_id(
    command: str, env_vars: dict[str, str], check_id: str, scratch_db: str
) -> None:
    result = run_entry_point(["manage.py", command], scratch_db, LLM_LOCAL_MODEL="off", **env_vars)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert check_id in output
    assert "Traceback" not in output
    assert "SECRETPW" not in output


def test_manage_py_timeout_abc_message_names_the_variable(scratch_db: str) -> None:
    result = run_entry_point(["manage.py", "check"], scratch_db, LM_STUDIO_TIMEOUT="abc")
    output = result.stdout + result.stderr
    assert "LM_STUDIO_TIMEOUT is 'abc'; it must be a number greater than 0." in output


def test_llm_ping_unknown_provider_option(scratch_db: str) -> None:
    result = run_entry_point(
        ["manage.py", "llm_ping", "--provider", "banana"], scratch_db, LLM_LOCAL_MODEL="off"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "llm.E001" in output
    assert "Traceback" not in output


def test_asgi_app_with_bad_provider_exits_with_check_id(scratch_db: str) -> None:
    result = run_entry_point(["-c", "import negotiator.asgi"], scratch_db, LLM_PROVIDER="banana")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "llm.E001" in output
    assert "Traceback" not in output


def test_asgi_app_imports_with_defaults(scratch_db: str) -> None:
    code = "import negotiator.asgi; print('application' in dir(negotiator.asgi))"
    result = run_entry_point(["-c", code], scratch_db)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


# The proxy the environment names -----------------------------------------------------------------


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


def test_e010_proxy_of_an_unknown_scheme(
    llm_config: Config, no_proxy_env: pytest.MonkeyPatch
) -> None:
    llm_config(lm_studio={"base_url": "http://lm-studio.internal:1234/v1"})
    no_proxy_env.setenv("HTTP_PROXY", "ftp://proxy.example.com:21")
    assert check_proxies() == [
        Error(
            "The proxy for provider 'lm_studio', 'ftp://proxy.example.com:21' "
            "(HTTPS_PROXY, HTTP_PROXY or ALL_PROXY), is not an http, https or socks5 URL.",
            hint="Set it to a URL like http://proxy.example.com:3128 "
            "(for SOCKS, install httpx[socks]), or list the provider's host in NO_PROXY.",
            id="llm.E010",
        )
    ]


def test_proxies_that_work_pass(llm_config: Config, no_proxy_env: pytest.MonkeyPatch) -> None:
    llm_config(lm_studio={"base_url": "http://lm-studio.internal:1234/v1"})
    assert check_proxies() == []
    no_proxy_env.setenv(
        "HTTP_PROXY", "proxy.example.com:3128"
    )  # no scheme: http, as httpx reads it
    no_proxy_env.setenv("HTTPS_PROXY", "http://proxy.example.com:3128")
    assert check_proxies() == []
    no_proxy_env.setenv("HTTP_PROXY", "ftp://proxy.example.com:21")
    no_proxy_env.setenv("NO_PROXY", "lm-studio.internal")  # that provider goes direct
    assert check_proxies() == []


def test_e010_socks_proxy_without_socksio(
    llm_config: Config, no_proxy_env: pytest.MonkeyPatch
) -> None:
    import importlib.util

    if importlib.util.find_spec("socksio") is not None:
        pytest.skip("socksio is installed here")
    llm_config(lm_studio={"base_url": "http://lm-studio.internal:1234/v1"})
    no_proxy_env.setenv("ALL_PROXY", "socks5://proxy.example.com:1080")
    assert [m.id for m in check_proxies()] == ["llm.E010"]
    assert "socksio" in check_proxies()[0].msg


def test_e011_database_url(settings: Any) -> None:
    settings.DATABASE_URL_PROBLEM = "it is neither a postgres:// nor a sqlite:// URL"
    assert check_database_url() == [
        Error(
            "DATABASE_URL is not a database URL this project can use: "
            "it is neither a postgres:// nor a sqlite:// URL.",
            hint="Set DATABASE_URL to postgres://user:password@host:5432/name "
            "or sqlite:///path/to/db.sqlite3, or unset it for the SQLite file beside manage.py.",
            id="llm.E011",
        )
    ]
